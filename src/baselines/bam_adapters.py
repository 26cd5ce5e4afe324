"""BAM with adapters — the frozen-model variant of BAM (Zhang et al. 2024, "BAM! Just Like That: Simple and
Efficient Parameter Upcycling for Mixture of Experts", arXiv 2408.08274) used as a merging baseline by the BTS
paper (§3.3, docs/design.md §2). The seed and experts stay frozen (bit-identical); only routers and adapters train.

Forward (``M = n + 1`` models, seed = model 0; one shared residual stream ``h``):

```
h = embed_seed(input_ids)
for each layer l:
    r   = softmax(R^attn_l(norm^in_{seed,l}(h)))                      # [B, T, M]
    h   = h + sum_m r_m * A^attn_{l,m}( attn_{m,l}(norm^in_{m,l}(h)) )
    r'  = softmax(R^ffn_l(norm^post_{seed,l}(h)))
    h   = h + sum_m r'_m * A^ffn_{l,m}( ffn_{m,l}(norm^post_{m,l}(h)) )
logits = lm_head_seed(norm_seed(h))
```

- each model's attention / FFN reads the shared stream through its **own** pre-norm (as inside that model);
- routers ``R`` are bias-free linear maps ``d -> M`` of the seed's pre-norm output (the seed is the common ancestor
  of all models), initialised to zero by default (uniform mixture at step 0; ``router_init_std`` > 0 draws
  ``N(0, std^2)`` from ``router_seed``);
- adapters ``A`` are bias-free ``d x d`` linear maps, one per (layer, model, attention|FFN), initialised to the
  identity, so with identical models the initial network is the dense model;
- embeddings, final norm and LM head are the seed's (frozen); the experts' own embeddings / heads are unused and
  not held (they are not part of the method's parameters).

``BAMAdaptersModule`` trains it with next-token CE through the shared ``LMTrainingModule`` loop (the optimizer only
sees routers and adapters). Artifact: ``bam_adapters.safetensors`` (routers + adapters) + ``bam_adapters.json``
(source directories), reloaded by ``load_bam_adapters``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from transformers import PreTrainedModel

from baselines.moe import (
    BaselineLM,
    check_family,
    load_family,
    read_json,
    router_weight,
)
from bts.core import tree_attention
from bts.core.hf_compat import causal_masks
from bts.core.io import BTSError, atomic_write_json
from bts.core.params import ParamCounts, count_params
from bts.core.tree_attention import TreeRows
from bts.dense.modeling import decoder_parts, freeze
from bts.training import flops
from bts.training.module import LMTrainingModule
from bts.training.optimizer import OptimizerArgs, Unpack


def identity_adapter(d: int, dtype: torch.dtype, device) -> nn.Linear:
    lin = nn.Linear(d, d, bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d, dtype=dtype, device=device))
    return lin


class BAMAdaptersModel(BaselineLM):
    """BAM with adapters (Zhang et al. 2024, arXiv 2408.08274; frozen-model variant of the BTS paper §3.3): see
    the module docstring for the exact forward."""

    def __init__(self, models: Sequence[PreTrainedModel], router_init_std: float = 0.0, router_seed: int = 0):
        super().__init__()
        check_family(models)
        parts = [decoder_parts(m) for m in models]
        seed = parts[0]
        self.config = seed.config
        self.embed_tokens, self.rotary_emb, self.norm, self.lm_head = (
            seed.embed_tokens,
            seed.rotary_emb,
            seed.norm,
            seed.lm_head,
        )
        self.model_layers = nn.ModuleList([p.layers for p in parts])  # [model][layer]
        for m in self.frozen_modules():
            freeze(m)
        n_models, n_layers, d = len(models), len(seed.layers), seed.config.hidden_size
        w = next(models[0].parameters())
        gen = torch.Generator().manual_seed(router_seed)

        def router() -> nn.Linear:
            lin = nn.Linear(d, n_models, bias=False, dtype=w.dtype, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(router_weight(n_models, d, router_init_std, gen))
            return lin

        def adapters() -> nn.ModuleList:
            return nn.ModuleList([identity_adapter(d, w.dtype, w.device) for _ in range(n_models)])

        self.attn_routers = nn.ModuleList([router() for _ in range(n_layers)])
        self.ffn_routers = nn.ModuleList([router() for _ in range(n_layers)])
        self.attn_adapters = nn.ModuleList([adapters() for _ in range(n_layers)])
        self.ffn_adapters = nn.ModuleList([adapters() for _ in range(n_layers)])
        self.router_init_std = router_init_std

    def frozen_modules(self) -> list[nn.Module]:
        return [self.embed_tokens, self.rotary_emb, self.norm, self.lm_head, self.model_layers]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {
            "attn_routers": self.attn_routers,
            "ffn_routers": self.ffn_routers,
            "attn_adapters": self.attn_adapters,
            "ffn_adapters": self.ffn_adapters,
        }

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()  # frozen models never switch dropout on
        return self

    def forward(self, input_ids: torch.LongTensor, tree: TreeRows | None = None) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if tree is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            masks = causal_masks(self.config, h, position_ids)
        else:  # packed rows: their positions and 4D mask (bts.core.tree_attention)
            position_ids = tree.position_ids
            masks = [tree.attention_mask(self.config, h.dtype)] * len(self.attn_routers)
        position_embeddings = self.rotary_emb(h, position_ids)
        for i in range(len(self.attn_routers)):
            layers = [model_layers[i] for model_layers in self.model_layers]
            # attention: h = h + sum_m r_m A_m(attn_m(norm^in_m(h)))
            normed = [layer.input_layernorm(h) for layer in layers]
            outs = [
                layer.self_attn(
                    hidden_states=x,
                    attention_mask=masks[i],
                    position_ids=position_ids,
                    position_embeddings=position_embeddings,
                )[0]
                for layer, x in zip(layers, normed)
            ]
            h = h + self._mix(normed[0], outs, self.attn_routers[i], self.attn_adapters[i])
            # FFN: h = h + sum_m r'_m A'_m(ffn_m(norm^post_m(h)))
            normed = [layer.post_attention_layernorm(h) for layer in layers]
            outs = [layer.mlp(x) for layer, x in zip(layers, normed)]
            h = h + self._mix(normed[0], outs, self.ffn_routers[i], self.ffn_adapters[i])
        return self.lm_head(self.norm(h))

    def forward_tree(self, input_ids: torch.LongTensor, tree: TreeRows) -> torch.Tensor:
        """Logits of packed rows; the routers and adapters are token-wise, so they see no packing."""
        return self(input_ids, tree)

    def supports_tree_attention(self) -> bool:
        return tree_attention.supports(self.config)

    @staticmethod
    def _mix(router_input, outs, router: nn.Linear, adapters: nn.ModuleList) -> torch.Tensor:
        """``sum_m softmax(router(router_input))_m * adapter_m(outs[m])`` (accumulated in float32)."""
        weights = torch.softmax(router(router_input).float(), dim=-1)
        mixed = torch.zeros(router_input.shape, dtype=torch.float32, device=router_input.device)
        for m, (out, adapter) in enumerate(zip(outs, adapters)):
            mixed = mixed + adapter(out).float() * weights[..., m, None]
        return mixed.to(router_input.dtype)

    def param_counts(self) -> ParamCounts:
        """trained = routers + adapters; total = those + the frozen models' used parameters (all layers of every
        model, the seed's embeddings / final norm / head); active = total (everything is soft-mixed)."""
        total = count_params(self)
        return ParamCounts(trained=count_params(self, trainable_only=True), total=total, active=total)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.{k}": v.detach().contiguous()
            for prefix, mod in self.trainable_modules().items()
            for k, v in mod.state_dict().items()
        }

    def save(self, out_dir: str | Path, extra: dict | None = None) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(self.trainable_state(), str(out_dir / "bam_adapters.safetensors"))
        meta = {
            "method": "bam_adapters",
            "num_models": len(self.model_layers),
            "router_init_std": self.router_init_std,
            "params": self.param_counts().to_dict(),
        } | (extra or {})
        atomic_write_json(out_dir / "bam_adapters.json", meta)


def load_bam_adapters(path: str | Path) -> BAMAdaptersModel:
    """Rebuild a trained BAM-with-adapters model: the frozen models from the recorded source directories, the
    routers and adapters from ``bam_adapters.safetensors``."""
    path = Path(path)
    meta = read_json(path / "bam_adapters.json")
    if "seed" not in meta or "experts" not in meta:
        raise BTSError(f"{path}/bam_adapters.json does not record the source model directories")
    models = load_family(meta["seed"], meta["experts"])
    net = BAMAdaptersModel(models)
    state = safetensors.torch.load_file(str(path / "bam_adapters.safetensors"))
    for prefix, mod in net.trainable_modules().items():
        sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        mod.load_state_dict(sub, strict=True)
    return net.eval()


class BAMAdaptersModule(LMTrainingModule):
    """Trains BAM with adapters (Zhang et al. 2024, "BAM! Just Like That", arXiv 2408.08274; the frozen-model
    variant of the BTS paper §3.3): frozen seed + experts, soft-routed mixtures of all models' attention and FFN
    outputs per layer, each through its own identity-initialised ``d x d`` adapter. Only routers and adapters
    train (the optimizer never sees a frozen weight, so they stay bit-identical)."""

    artifact_kind = "bam_adapters"

    def __init__(
        self,
        seed_model: str,
        experts: list[str],
        router_init_std: float = 0.0,
        router_seed: int = 0,
        output_dir: str | None = None,
        **optimizer: Unpack[OptimizerArgs],
    ):
        """
        Args:
            seed_model: Hugging Face directory of the seed (model 0; its embeddings, final norm and LM head are used).
            experts: Hugging Face directories of the experts branched from the seed (models 1..n).
            router_init_std: std of the normal init of the routers (0 = zero routers: uniform mixtures).
            router_seed: seed of the router initialisation.
            output_dir: where the trained routers/adapters (+ json naming the frozen models) are written.
            optimizer: ``lr``, ``warmup_steps``, ``min_lr_ratio``, ``weight_decay``, ``betas``
                (``bts.training.optimizer.OptimizerArgs``).
        """
        super().__init__(output_dir, **optimizer)
        self.save_hyperparameters()
        self.net = BAMAdaptersModel(load_family(seed_model, experts), router_init_std, router_seed)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.net(input_ids)

    def flops_per_token(self, seq_len: int) -> float:
        """Every model's attention and FFN per layer, two ``d x d`` adapters per model and layer; the backward is
        the input gradients of everything after the first attention adapter (the stream depends on it from there
        on) and the adapters' weight gradients. Routers left out."""
        cfg = self.net.config
        e, layers, d = len(self.net.model_layers), cfg.num_hidden_layers, cfg.hidden_size
        adapters = e * layers * 2 * (2 * d * d)
        head = flops.head_forward_flops(cfg)
        ffn = flops.layer_forward_flops(cfg, seq_len) - flops.layer_forward_flops(cfg, seq_len, ffn_experts=0)
        first_attention = flops.layer_input_backward_flops(cfg, seq_len) - ffn  # reads the embeddings: no gradient
        forward = e * layers * flops.layer_forward_flops(cfg, seq_len) + adapters + head
        backward = e * (layers * flops.layer_input_backward_flops(cfg, seq_len) - first_attention)
        return forward + backward + 2 * adapters - e * 2 * d * d + head  # the first adapters' inputs: no gradient

    def param_counts(self) -> ParamCounts:
        return self.net.param_counts()

    def save_artifact(self, out_dir: Path) -> None:
        self.net.save(
            out_dir, extra={"seed": str(self.hparams.seed_model), "experts": [str(e) for e in self.hparams.experts]}
        )

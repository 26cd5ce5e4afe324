"""Expert routing — routing each sequence to one frozen model from its prompt prefix, the routing baseline of the
BTS paper (Zhang et al. 2025, arXiv 2502.00075, §3.3; docs/design.md §2), in the spirit of domain routing over branched
experts (Li et al. 2022, "Branch-Train-Merge", arXiv 2208.03306, and Gururangan et al. 2023, "Scaling Expert
Language Models with Unsupervised Domain Discovery", arXiv 2303.14177).

- Models: the seed and the ``n`` experts, frozen (``M = n + 1`` candidates, seed = index 0).
- Router: a bias-free linear map ``R in R^{d x M}`` over the mean **input embedding** (the seed's embedding table)
  of the first ``t`` tokens of a sequence. Zero-initialised by default (uniform over models). With
  ``normalize_features`` (default) the mean embedding is divided by its RMS before the linear map (no parameters):
  input embeddings are small (init std 0.02) and their mean shrinks with ``t``, which would otherwise make the
  router's effective learning rate depend on the embedding scale and on the prefix length.
- Training target: the model with the lowest LM loss (mean next-token NLL over the whole sequence), computed
  without gradients; objective: cross-entropy of the router logits against that index. ``t`` is sampled per
  example uniformly in ``[min_prefix, T]`` so the router learns to decide from prefixes of any length. Only the
  router trains. The training loss logged as ``train/loss`` is this router CE (``train/router_acc`` is the
  fraction of sequences routed to their best model).
- Inference (``forward``): causal routing, so that the router never reads a token that is then scored with the
  model it picked. With ``P = route_prefix`` (default 32), the logits at position ``t`` (the prediction of token
  ``t + 1``) are those of the model the router picks from tokens ``0..min(t, P - 1)``, i.e. from the first
  ``min(t + 1, P)`` tokens. From position ``P - 1`` on the choice is fixed (routed on the whole P-token prompt
  prefix) and is the model that scores every later token; before that, each token is predicted by the model routed
  on the tokens before it. The output is therefore an ordinary causal LM (logits at ``t`` depend only on tokens
  ``<= t``), every method is scored on the same tokens (the evaluation suite and ``val/<domain>/ppl`` score every
  token but the first of a block, for every method), and ``forward(x)[:, t]`` equals the last-position logits of
  ``forward(x[:, :t + 1])``, which is what ``generate`` uses. ``route(input_ids)`` is the decision at the last
  position (from the first ``min(P, T)`` tokens), ``route_positions`` the decision at every position.
  (Before this rule, the whole block was scored with the model routed on its first P tokens, so the predictions
  of tokens ``1..P-1`` used a routing decision that had read them: an optimistic perplexity.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from baselines.moe import (
    BaselineLM,
    check_family,
    load_family,
    read_json,
    router_weight,
)
from bts.core.io import BTSError, atomic_write_json
from bts.core.params import ParamCounts, count_params
from bts.dense.modeling import decoder_parts, freeze
from bts.training import flops
from bts.training.module import LMTrainingModule
from bts.training.optimizer import OptimizerArgs, Unpack


class ExpertRouter(BaselineLM):
    """Sequence-level router over frozen models (BTS paper §3.3 "expert routing" baseline; see module docstring)."""

    def __init__(
        self,
        models: Sequence[PreTrainedModel],
        route_prefix: int = 32,
        router_init_std: float = 0.0,
        router_seed: int = 0,
        normalize_features: bool = True,
    ):
        super().__init__()
        check_family(models)
        if route_prefix < 1:
            raise BTSError(f"route_prefix must be >= 1, got {route_prefix}")
        self.models = nn.ModuleList([freeze(m) for m in models])
        self.route_prefix = route_prefix
        self.normalize_features = normalize_features
        d = models[0].config.hidden_size
        w = next(models[0].parameters())
        self.router = nn.Linear(d, len(models), bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(router_seed)
            self.router.weight.copy_(router_weight(len(models), d, router_init_std, gen))

    @property
    def embed_tokens(self) -> nn.Module:
        return decoder_parts(self.models[0]).embed_tokens

    def train(self, mode: bool = True):
        super().train(mode)
        self.models.eval()  # frozen models never switch dropout on
        return self

    # --- routing -------------------------------------------------------------------------------------------------
    def prefix_features(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Router features ``[B, T, d]`` (float32): at position ``t`` the mean input embedding of tokens ``0..t``
        (RMS-normalised with ``normalize_features``); no gradient (the embedding table is frozen)."""
        with torch.no_grad():
            emb = self.embed_tokens(input_ids).float()
            counts = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device, dtype=emb.dtype)
            feats = emb.cumsum(dim=1) / counts[None, :, None]
            if self.normalize_features:
                feats = feats * torch.rsqrt(feats.pow(2).mean(-1, keepdim=True) + 1e-12)
        return feats

    def router_logits(self, input_ids: torch.LongTensor, lengths: torch.LongTensor) -> torch.Tensor:
        """Router logits ``[B, M]`` from the mean input embedding of the first ``lengths[b]`` tokens of row ``b``."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        feats = self.prefix_features(input_ids)[rows, lengths - 1]
        return self.router(feats.to(self.router.weight.dtype)).float()

    def route_positions(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """``[B, T]``: the model that predicts the token after position ``t``, routed on the first
        ``min(t + 1, route_prefix)`` tokens (constant from position ``route_prefix - 1`` on; module docstring)."""
        b, t = input_ids.shape
        p = min(self.route_prefix, t)
        feats = self.prefix_features(input_ids[:, :p])  # [B, p, d]
        choice = self.router(feats.to(self.router.weight.dtype)).float().argmax(dim=-1)  # [B, p]
        return torch.cat([choice, choice[:, -1:].expand(b, t - p)], dim=1)

    def route(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """``[B]``: the model each sequence is routed to from its first ``min(route_prefix, T)`` tokens (the choice
        at the last position, which scores every token after the routing prefix)."""
        return self.route_positions(input_ids)[:, -1]

    @torch.no_grad()
    def sequence_losses(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Mean next-token NLL of every model on every sequence, ``[B, M]``."""
        losses = []
        for m in self.models:
            logits = m(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
            losses.append(nll.mean(dim=1))
        return torch.stack(losses, dim=1)

    def router_loss(
        self, input_ids: torch.LongTensor, min_prefix: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cross-entropy, accuracy)`` of the router on prefixes of random length ``t ~ U[min_prefix, T]``
        against the lowest-loss model of each sequence."""
        b, t = input_ids.shape
        if t < 2:
            raise BTSError("expert routing needs sequences of at least 2 tokens")
        lo = max(1, min(min_prefix, t))
        lengths = torch.randint(lo, t + 1, (b,), device=input_ids.device)
        target = self.sequence_losses(input_ids).argmin(dim=1)
        logits = self.router_logits(input_ids, lengths)
        return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()

    # --- LanguageModel ---------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Logits ``[B, T, V]``: at position ``t``, those of the model ``route_positions`` picks for ``t`` (causal
        routing; module docstring). Each model runs once, on the rows that use it, up to the last position it
        scores (the models are causal, so a shorter run gives the same logits)."""
        choice = self.route_positions(input_ids)  # [B, T]
        chosen = choice.unique().tolist()
        if len(chosen) == 1:
            return self.models[chosen[0]](input_ids=input_ids, use_cache=False).logits
        out = None
        for m in chosen:
            mask = choice == m  # [B, T]
            rows = mask.any(dim=1).nonzero(as_tuple=True)[0]
            length = int(mask.any(dim=0).nonzero().max()) + 1
            logits = self.models[m](input_ids=input_ids[rows, :length], use_cache=False).logits
            if out is None:
                out = logits.new_empty((*input_ids.shape, logits.shape[-1]))
            r, c = mask[rows, :length].nonzero(as_tuple=True)
            out[rows[r], c] = logits[r, c]
        return out

    def param_counts(self) -> ParamCounts:
        """trained = router; total = router + all models; active = router + one model (the largest)."""
        router = count_params(self.router)
        return ParamCounts(
            trained=count_params(self, trainable_only=True),
            total=count_params(self),
            active=router + max(count_params(m) for m in self.models),
        )

    def save(self, out_dir: str | Path, extra: dict | None = None) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(
            {"router.weight": self.router.weight.detach().contiguous()},
            str(out_dir / "expert_routing.safetensors"),
        )
        meta = {
            "method": "expert_routing",
            "num_models": len(self.models),
            "route_prefix": self.route_prefix,
            "normalize_features": self.normalize_features,
            "params": self.param_counts().to_dict(),
        } | (extra or {})
        atomic_write_json(out_dir / "expert_routing.json", meta)


def load_expert_router(path: str | Path, route_prefix: int | None = None) -> ExpertRouter:
    """Rebuild a trained router: the frozen models from the recorded source directories (relative paths resolve
    against the working directory), the router weights from ``expert_routing.safetensors``."""
    path = Path(path)
    meta = read_json(path / "expert_routing.json")
    if "seed" not in meta or "experts" not in meta:
        raise BTSError(f"{path}/expert_routing.json does not record the source model directories")
    net = ExpertRouter(
        load_family(meta["seed"], meta["experts"]),
        route_prefix or meta["route_prefix"],
        normalize_features=meta.get("normalize_features", True),
    )
    state = safetensors.torch.load_file(str(path / "expert_routing.safetensors"))
    net.router.load_state_dict({"weight": state["router.weight"]}, strict=True)
    return net.eval()


class ExpertRoutingModule(LMTrainingModule):
    """Trains the expert-routing baseline of the BTS paper (Zhang et al. 2025, arXiv 2502.00075, §3.3): a linear
    sequence router over frozen seed + experts (``ExpertRouter``). Only the router trains; its training objective
    is the router cross-entropy (``lm_loss`` is overridden), while validation / test report the routed model's LM
    perplexity per domain through ``forward``."""

    artifact_kind = "expert_routing"

    def __init__(
        self,
        seed_model: str,
        experts: list[str],
        route_prefix: int = 32,
        min_prefix: int = 1,
        router_init_std: float = 0.0,
        router_seed: int = 0,
        normalize_features: bool = True,
        output_dir: str | None = None,
        **optimizer: Unpack[OptimizerArgs],
    ):
        """
        Args:
            seed_model: Hugging Face directory of the seed (candidate 0; its embedding table gives the router features).
            experts: Hugging Face directories of the experts (candidates 1..n).
            route_prefix: number of prompt tokens the router reads at inference (capped at the sequence length).
            min_prefix: smallest prefix length ``t`` sampled in training (``t ~ U[min_prefix, T]`` per example).
            router_init_std: std of the normal router init (0 = zero router: uniform over models).
            router_seed: seed of the router initialisation.
            normalize_features: divide the mean embedding by its RMS before the router (see module docstring).
            output_dir: where the router weights (+ json naming the frozen models) are written.
            optimizer: ``lr``, ``warmup_steps``, ``min_lr_ratio``, ``weight_decay``, ``betas``
                (``bts.training.optimizer.OptimizerArgs``).
        """
        super().__init__(output_dir, **optimizer)
        self.save_hyperparameters()
        if min_prefix < 1:
            raise BTSError(f"min_prefix must be >= 1, got {min_prefix}")
        self.min_prefix = min_prefix
        self.net = ExpertRouter(
            load_family(seed_model, experts), route_prefix, router_init_std, router_seed, normalize_features
        )

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.net(input_ids)

    def flops_per_token(self, seq_len: int) -> float:
        """Every model's forward (the lowest-loss model is the router's target); the router itself is left out."""
        return sum(flops.dense_forward_flops(m.config, seq_len) for m in self.net.models)

    def lm_loss(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The training objective of this module: the router cross-entropy (not an LM loss; the models are frozen)."""
        loss, acc = self.net.router_loss(input_ids, self.min_prefix)
        if self._trainer is not None:
            self.log("train/router_acc", acc, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def param_counts(self) -> ParamCounts:
        return self.net.param_counts()

    def save_artifact(self, out_dir: Path) -> None:
        self.net.save(
            out_dir, extra={"seed": str(self.hparams.seed_model), "experts": [str(e) for e in self.hparams.experts]}
        )

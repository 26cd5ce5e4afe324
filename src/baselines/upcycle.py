"""The upcycled mixture-of-experts networks shared by BTX (``baselines.btx``) and BAM (``baselines.bam``).

``build_btx`` (the BTX construction, which BAM extends with attention experts), the inference models ``BTXModel``
/ ``BAMModel`` / ``MixtralLM`` and the artifact loader ``load_btx`` (both methods' non-Mixtral artifacts are rebuilt
by ``moe_skeleton``) live here so that ``baselines.btx`` and ``baselines.bam`` each import this module and neither
imports the other. The routed blocks themselves (``MoEFFN``, ``AttentionMixture``) are in ``baselines.moe``. The
public names stay importable from ``baselines.btx`` / ``baselines.bam`` (configs, entry points and tests use them).
See ``baselines.btx`` for the BTX method and ``baselines.bam`` for BAM.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from baselines.moe import (
    AttentionMixture,
    BaselineLM,
    MoEFFN,
    check_family,
    clone_module,
    load_family,
    mean_tensor,
    read_json,
    router_weight,
    switch_load_balancing_loss,
)
from bts.core.io import BTSError, atomic_write_json
from bts.core.language_model import HFTreeAttention
from bts.core.params import ParamCounts, count_params
from bts.dense.modeling import decoder_parts, load_causal_lm
from bts.dense.module import hf_hidden_and_head
from bts.training.module import LMTrainingModule

Variant = Literal["sample", "soft", "top2"]
ROUTING_OF_VARIANT = {"sample": "gumbel", "soft": "soft", "top2": "topk"}
MIXTRAL_EXPORTABLE_TYPES = ("llama", "mistral")


class BTXModel(HFTreeAttention, BaselineLM):
    """A BTX mixture-of-experts LM (Sukhbaatar et al. 2024, arXiv 2403.07816): ``model`` is a Hugging Face causal
    LM whose layers' ``mlp`` are ``MoEFFN`` blocks. ``forward(input_ids) -> logits``; ``aux_loss()`` is the
    load-balancing loss of the last forward (top2 only)."""

    method = "btx"

    def __init__(self, model: PreTrainedModel, variant: Variant, load_balance_coef: float = 0.01):
        super().__init__()
        if variant not in ROUTING_OF_VARIANT:
            raise BTSError(f"unknown BTX variant {variant!r}; expected one of {sorted(ROUTING_OF_VARIANT)}")
        self.model = model
        self.variant = variant
        self.load_balance_coef = load_balance_coef
        self.model.config.use_cache = False

    # --- structure ---------------------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoEFFN]:
        return [layer.mlp for layer in decoder_parts(self.model).layers]

    @property
    def num_experts(self) -> int:
        return self.moe_layers()[0].num_experts

    @property
    def top_k(self) -> int:
        return self.moe_layers()[0].top_k

    # --- LanguageModel --------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def aux_loss(self) -> torch.Tensor | None:
        if self.variant != "top2" or self.load_balance_coef == 0:
            return None
        moes = self.moe_layers()
        if moes[0].last_router_logits is None:
            return None
        lb = switch_load_balancing_loss(
            [m.last_router_logits for m in moes], [m.last_top_k_index for m in moes], self.num_experts
        )
        return self.load_balance_coef * lb

    def param_counts(self) -> ParamCounts:
        """trained = parameters with grad; total = all; active = total minus the FFN experts a token skips
        (per layer: all experts but the ``top_k`` it is routed to; soft: none)."""
        total = count_params(self)
        inactive = 0
        for moe in self.moe_layers():
            sizes = sorted(count_params(e) for e in moe.experts)
            inactive += sum(sizes[: len(sizes) - moe.top_k])
        return ParamCounts(
            trained=count_params(self, trainable_only=True), total=total, active=total - inactive
        )

    # --- artifacts ---------------------------------------------------------------------------------------------
    def mixtral_export_problem(self) -> str | None:
        """Why this model cannot be saved as a Mixtral checkpoint (None when it can)."""
        cfg = self.model.config
        if cfg.model_type not in MIXTRAL_EXPORTABLE_TYPES:
            return f"model_type {cfg.model_type!r} (Mixtral export supports {MIXTRAL_EXPORTABLE_TYPES})"
        if any(isinstance(layer.self_attn, AttentionMixture) for layer in decoder_parts(self.model).layers):
            return "attention experts (Mixtral has one attention per layer)"
        biases = [n for n, _ in self.model.named_parameters() if n.endswith(".bias")]
        if biases:
            return f"bias parameters ({biases[0]}, ...), which Mixtral lacks"
        for moe in self.moe_layers():
            for e in moe.experts:
                if not all(hasattr(e, a) for a in ("gate_proj", "up_proj", "down_proj")):
                    return f"FFN {type(e).__name__} is not a gated (gate/up/down) MLP"
        return None

    def to_mixtral(self) -> MixtralForCausalLM:
        """The same network as a ``MixtralForCausalLM`` (copies of the weights)."""
        problem = self.mixtral_export_problem()
        if problem is not None:
            raise BTSError(f"cannot export this {self.method.upper()} model as Mixtral: {problem}")
        src = self.model.config
        cfg = MixtralConfig(
            vocab_size=src.vocab_size,
            hidden_size=src.hidden_size,
            intermediate_size=src.intermediate_size,
            num_hidden_layers=src.num_hidden_layers,
            num_attention_heads=src.num_attention_heads,
            num_key_value_heads=src.num_key_value_heads,
            head_dim=getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads,
            hidden_act=src.hidden_act,
            max_position_embeddings=src.max_position_embeddings,
            initializer_range=src.initializer_range,
            rms_norm_eps=src.rms_norm_eps,
            use_cache=True,
            pad_token_id=src.pad_token_id,
            bos_token_id=src.bos_token_id,
            eos_token_id=src.eos_token_id,
            tie_word_embeddings=src.tie_word_embeddings,
            sliding_window=getattr(src, "sliding_window", None) if src.model_type == "mistral" else None,
            attention_dropout=src.attention_dropout,
            num_experts_per_tok=self.top_k,
            num_local_experts=self.num_experts,
            router_aux_loss_coef=self.load_balance_coef,
            router_jitter_noise=0.0,
            rope_parameters=copy.deepcopy(src.rope_parameters),
        )
        cfg._attn_implementation = src._attn_implementation
        dtype = next(self.model.parameters()).dtype
        with no_init_weights():
            mixtral = MixtralForCausalLM(cfg)
        mixtral.tie_weights()  # no_init_weights skips init_weights, which is where transformers 5 ties the head
        state = {k: v for k, v in self.model.state_dict().items() if ".mlp." not in k}
        for i, moe in enumerate(self.moe_layers()):
            pre = f"model.layers.{i}.mlp."
            state[pre + "gate.weight"] = moe.router.weight
            state[pre + "experts.gate_up_proj"] = torch.stack(
                [torch.cat([e.gate_proj.weight, e.up_proj.weight], dim=0) for e in moe.experts]
            )
            state[pre + "experts.down_proj"] = torch.stack([e.down_proj.weight for e in moe.experts])
        mixtral.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
        return mixtral.to(dtype).eval()

    def metadata(self) -> dict:
        return {
            "method": self.method,
            "variant": self.variant,
            "routing": ROUTING_OF_VARIANT[self.variant],
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "load_balance_coef": self.load_balance_coef,
            "gumbel_temperature": self.moe_layers()[0].temperature,
            "params": self.param_counts().to_dict(),
        }

    def save(self, out_dir: str | Path, extra: dict | None = None) -> None:
        """Mixtral HF directory when exportable, else ``btx.safetensors`` + ``base_config.json``; ``btx.json``
        records the variant, the format and ``extra`` (e.g. the source directories)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = self.metadata() | (extra or {})
        problem = self.mixtral_export_problem()
        if problem is None:
            self.to_mixtral().save_pretrained(out_dir)
            meta["format"] = "mixtral"
            if self.variant == "sample":
                meta["note"] = "Gumbel top-1 in training; Mixtral top-1 (weight 1) = our evaluation routing"
        else:
            self.model.config.save_pretrained(out_dir)
            (out_dir / "config.json").rename(out_dir / "base_config.json")  # not a loadable dense HF dir
            safetensors.torch.save_model(self.model, str(out_dir / f"{self.method}.safetensors"))
            meta["format"] = "safetensors"
            meta["why_not_mixtral"] = problem
        atomic_write_json(out_dir / f"{self.method}.json", meta)


class BAMModel(BTXModel):
    """A BAM mixture (Zhang et al. 2024, arXiv 2408.08274): a ``BTXModel`` whose layers' ``self_attn`` are
    ``AttentionMixture`` blocks."""

    method = "bam"

    # param_counts (inherited): attention experts are soft-routed, so all of them count as active.

    def attention_layers(self) -> list[AttentionMixture]:
        return [layer.self_attn for layer in decoder_parts(self.model).layers]


def build_btx(
    seed_model: PreTrainedModel,
    expert_models: Sequence[PreTrainedModel],
    variant: Variant = "top2",
    router_init_std: float = 0.02,
    router_seed: int = 0,
    load_balance_coef: float = 0.01,
    gumbel_temperature: float = 1.0,
) -> BTXModel:
    """Upcycle ``[seed, *experts]`` into a BTX MoE (see the module docstring). The inputs are not modified.
    ``expert_models`` may be empty (a one-expert MoE equal to the dense seed)."""
    models = [seed_model, *expert_models]
    check_family(models)
    routing = ROUTING_OF_VARIANT.get(variant)
    if routing is None:
        raise BTSError(f"unknown BTX variant {variant!r}; expected one of {sorted(ROUTING_OF_VARIANT)}")
    model = copy.deepcopy(seed_model)
    hidden = model.config.hidden_size
    layers = decoder_parts(model).layers
    if not all(hasattr(layer, "mlp") for layer in layers):
        raise BTSError(f"{type(model).__name__} layers have no `mlp` FFN to upcycle")
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    gen = torch.Generator().manual_seed(router_seed)
    with torch.no_grad():
        sources = [dict(m.named_parameters()) for m in models]
        for name, p in model.named_parameters():  # tied weights appear once
            if ".mlp." not in name:
                p.copy_(mean_tensor([s[name] for s in sources]))
        for i, layer in enumerate(layers):
            experts = [clone_module(decoder_parts(m).layers[i].mlp) for m in models]
            moe = MoEFFN(experts, hidden, routing=routing, top_k=2, temperature=gumbel_temperature)
            moe.router.weight.copy_(router_weight(len(models), hidden, router_init_std, gen))
            layer.mlp = moe.to(device=device, dtype=dtype)
    model.requires_grad_(True)
    return BTXModel(model, variant, load_balance_coef)


class MixtralLM(HFTreeAttention, BaselineLM):
    """A Mixtral checkpoint (e.g. an exported BTX) behind the LanguageModel interface, with Table 2 counts."""

    def __init__(self, model: MixtralForCausalLM):
        super().__init__()
        self.model = model.eval()

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def param_counts(self) -> ParamCounts:
        cfg = self.model.config
        total = count_params(self)
        per_layer = sum(
            layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()
            for layer in self.model.model.layers
        )
        inactive = per_layer * (cfg.num_local_experts - cfg.num_experts_per_tok) // cfg.num_local_experts
        return ParamCounts(
            trained=count_params(self, trainable_only=True), total=total, active=total - inactive
        )


def moe_skeleton(
    base_config: dict, num_experts: int, routing: str, top_k: int, temperature: float, attention_experts: bool
) -> PreTrainedModel:
    """An uninitialised BTX/BAM network of the given base architecture (to load saved weights into)."""
    cfg_dict = dict(base_config)
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    # no_init_weights also skips the tying of lm_head to embed_tokens (transformers 5 ties in init_weights); without
    # it a tied model's artifact (saved by safetensors.save_model with one name per shared tensor) cannot load
    model.tie_weights()
    hidden = cfg.hidden_size
    for layer in decoder_parts(model).layers:
        layer.mlp = MoEFFN(
            [clone_module(layer.mlp) for _ in range(num_experts)], hidden, routing, top_k, temperature
        )
        if attention_experts:
            layer.self_attn = AttentionMixture(
                [clone_module(layer.self_attn) for _ in range(num_experts)], hidden
            )
    return model


def load_btx(path: str | Path) -> BaselineLM:
    """Load a saved BTX (or BAM) artifact: a ``MixtralLM`` for Mixtral exports, else the rebuilt network."""
    path = Path(path)
    meta_file = next((path / f"{m}.json" for m in ("btx", "bam") if (path / f"{m}.json").is_file()), None)
    if meta_file is None:
        raise BTSError(f"not a BTX/BAM artifact (no btx.json or bam.json): {path}")
    meta = read_json(meta_file)
    if meta.get("format") == "mixtral":
        return MixtralLM(load_causal_lm(path))
    base = read_json(path / "base_config.json")
    model = moe_skeleton(
        base,
        meta["num_experts"],
        meta["routing"],
        meta["top_k"],
        meta.get("gumbel_temperature", 1.0),
        attention_experts=meta["method"] == "bam",
    )
    missing, unexpected = safetensors.torch.load_model(model, str(path / f"{meta['method']}.safetensors"))
    if missing or unexpected:
        raise BTSError(
            f"{path}: weights do not match the recorded architecture ({missing[:2]}, {unexpected[:2]})"
        )
    if meta["method"] == "bam":
        return BAMModel(model, meta["variant"], meta["load_balance_coef"]).eval()
    return BTXModel(model, meta["variant"], meta["load_balance_coef"]).eval()


class UpcycledMoEModule(LMTrainingModule):
    """What training BTX and BAM shares: the upcycled network ``self.net`` (built by ``build_net``), its forward,
    its load-balancing loss, its parameter counts and its artifact. Subclasses give the typed constructor (the
    config schema) and the FLOP count."""

    artifact_kind = "btx"

    def build_net(self, build, seed_model: str, experts: list[str], *routing) -> None:
        """``self.net = build(seed, experts, *routing)`` over the models loaded from their directories."""
        models = load_family(seed_model, experts)
        self.net = build(models[0], models[1:], *routing)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.net(input_ids)

    def hidden_and_head(self, input_ids: torch.LongTensor):
        return hf_hidden_and_head(self.net.model, input_ids)

    def extra_loss(self) -> torch.Tensor | None:
        return self.net.aux_loss()

    def param_counts(self) -> ParamCounts:
        return self.net.param_counts()

    def save_artifact(self, out_dir: Path) -> None:
        self.net.save(
            out_dir, extra={"seed": str(self.hparams.seed_model), "experts": [str(e) for e in self.hparams.experts]}
        )

"""BAM — Branch-Attend-Mix (Zhang et al. 2024, "BAM! Just Like That: Simple and Efficient Parameter Upcycling for
Mixture of Experts", arXiv 2408.08274), an expert-upcycling baseline of the BTS paper (§3.3, docs/design.md §2).

BAM is BTX-soft plus attention experts. Construction (``build_bam``):

- FFN: exactly ``build_btx(..., variant=ffn_variant)`` (default ``soft``: every FFN expert weighted by the router
  softmax; ``top2`` / ``sample`` are available as ablations, with BTX's load balancing for ``top2``).
- Attention: per layer, the ``self_attn`` module of every model (seed first, then experts; each keeps its own
  q/k/v/o weights) is an attention expert. A new bias-free linear attention router ``d -> E`` on the layer's
  input-normed hidden state ``x = input_layernorm(h)`` gives soft weights ``r = softmax(router(x))`` and the
  attention output is ``sum_m r_m attn_m(x)`` (``baselines.moe.AttentionMixture``). The residual stream, the
  norms, the embeddings and the LM head are BTX's averaged ones.
- Routers (FFN and attention) are initialised ``N(0, router_init_std^2)`` from ``router_seed`` (0 → zeros).

All parameters train (``BAMModule``). With identical models (or one model) BAM equals the dense model up to float
rounding of the router weights summing to one. No KV cache (generation re-runs the sequence). Not exportable to a
standard ``transformers`` class (Mixtral has one attention per layer): saved as ``bam.safetensors`` +
``base_config.json`` + ``bam.json`` and reloaded by ``load_bam``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel

from baselines.moe import (
    AttentionMixture,
    BaselineLM,
    clone_module,
    router_weight,
)
from baselines.upcycle import BAMModel, UpcycledMoEModule, build_btx, load_btx
from bts.dense.modeling import decoder_parts
from bts.training import flops
from bts.training.optimizer import OptimizerArgs, Unpack

__all__ = ["BAMModel", "BAMModule", "build_bam", "load_bam"]


def build_bam(
    seed_model: PreTrainedModel,
    expert_models: Sequence[PreTrainedModel],
    ffn_variant: Literal["soft", "top2", "sample"] = "soft",
    router_init_std: float = 0.02,
    router_seed: int = 0,
    load_balance_coef: float = 0.01,
    gumbel_temperature: float = 1.0,
) -> BAMModel:
    """Upcycle ``[seed, *experts]`` into BAM (see the module docstring). The inputs are not modified."""
    models = [seed_model, *expert_models]
    btx = build_btx(
        seed_model,
        expert_models,
        ffn_variant,
        router_init_std,
        router_seed,
        load_balance_coef,
        gumbel_temperature,
    )
    model = btx.model
    hidden = model.config.hidden_size
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    gen = torch.Generator().manual_seed(router_seed + 1_000_003)  # independent of the FFN routers' stream
    with torch.no_grad():
        for i, layer in enumerate(decoder_parts(model).layers):
            mix = AttentionMixture(
                [clone_module(decoder_parts(m).layers[i].self_attn) for m in models], hidden
            )
            mix.router.weight.copy_(router_weight(len(models), hidden, router_init_std, gen))
            layer.self_attn = mix.to(device=device, dtype=dtype)
    model.requires_grad_(True)
    return BAMModel(model, ffn_variant, load_balance_coef)


def load_bam(path: str | Path) -> BaselineLM:
    """Load what ``BAMModule`` wrote (``bam.json`` + ``bam.safetensors`` + ``base_config.json``)."""
    return load_btx(path)


class BAMModule(UpcycledMoEModule):
    """Trains BAM (Zhang et al. 2024, "BAM! Just Like That", arXiv 2408.08274): BTX-soft FFN experts plus
    soft-routed attention experts (``build_bam``); every parameter trains with next-token CE through the shared
    ``LMTrainingModule`` loop. Artifact: ``bam.safetensors`` + ``base_config.json`` + ``bam.json``."""

    def __init__(
        self,
        seed_model: str,
        experts: list[str],
        ffn_variant: Literal["soft", "top2", "sample"] = "soft",
        router_init_std: float = 0.02,
        router_seed: int = 0,
        load_balance_coef: float = 0.01,
        gumbel_temperature: float = 1.0,
        output_dir: str | None = None,
        **optimizer: Unpack[OptimizerArgs],
    ):
        """
        Args:
            seed_model: Hugging Face directory of the seed model (FFN and attention expert 0).
            experts: Hugging Face directories of the experts branched from the seed (experts 1..n).
            ffn_variant: FFN routing as in BTX; ``soft`` (docs/design.md: BTX-soft) by default.
            router_init_std: std of the normal init of the new FFN and attention routers (0 = zero routers).
            router_seed: seed of the router initialisation.
            load_balance_coef: Switch load-balancing coefficient (only used when ``ffn_variant`` is ``top2``).
            gumbel_temperature: Gumbel-softmax temperature (only used when ``ffn_variant`` is ``sample``).
            output_dir: where the trained BAM (``bam.safetensors`` + configs) is written when ``fit`` ends.
            optimizer: ``lr``, ``warmup_steps``, ``min_lr_ratio``, ``weight_decay``, ``betas``
                (``bts.training.optimizer.OptimizerArgs``).
        """
        super().__init__(output_dir, **optimizer)
        self.save_hyperparameters()
        self.build_net(build_bam, seed_model, experts, ffn_variant, router_init_std, router_seed, load_balance_coef,
                       gumbel_temperature)

    def flops_per_token(self, seq_len: int) -> float:
        """Every token runs every attention expert (soft attention routing) and ``top_k`` FFN experts."""
        cfg, e = self.net.model.config, self.net.num_experts
        ffn_share = self.net.top_k / e  # the FFN part of a layer scales with top_k, the attention part with E
        layer = flops.layer_forward_flops(cfg, seq_len)
        ffn = flops.layer_forward_flops(cfg, seq_len) - flops.layer_forward_flops(cfg, seq_len, ffn_experts=0)
        per_layer = e * (layer - ffn) + e * ffn_share * ffn
        return 3 * (cfg.num_hidden_layers * per_layer + flops.head_forward_flops(cfg))

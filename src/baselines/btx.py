"""BTX — Branch-Train-MiX (Sukhbaatar et al. 2024, "Branch-Train-MiX: Mixing Expert LLMs into a
Mixture-of-Experts LLM", arXiv 2403.07816), the expert-upcycling baseline of the BTS paper (§3.3, docs/design.md §2).

Construction (``build_btx``): per transformer layer, the FFNs of the seed and of the ``n`` experts become the
``E = n + 1`` FFN experts of an MoE layer (expert 0 = the seed's FFN, expert ``i`` = expert ``i``'s); every other
parameter (attention, norms, embeddings, LM head) is the uniform mean over seed and experts; each layer gets a new
bias-free linear router ``d -> E`` on the FFN input, initialised ``N(0, router_init_std^2)`` from a generator
seeded with ``router_seed`` (default std 0.02 = the seed's ``initializer_range``; std 0 gives zero routers, i.e.
uniform soft weights and index-order ties for top-k). Then all parameters train (``BTXModule``).

Variants (``MoEFFN`` holds the exact routing math):

- ``top2`` (the BTX paper's default): top-2 of the router softmax, renormalised (Mixtral), plus the Switch
  load-balancing loss ``coef * E * sum_e f_e P_e`` (averaged over layers; see
  ``baselines.moe.switch_load_balancing_loss``), exposed through ``extra_loss``. With ``E = 1`` it is top-1.
- ``soft``: every expert, weighted by the router softmax.
- ``sample``: top-1 via Gumbel-softmax with a straight-through estimator in training (temperature
  ``gumbel_temperature``, default 1.0; the forward weight is exactly 1, the temperature shapes only the router
  gradient), argmax of the router logits at evaluation.

The model is the seed's own Hugging Face class with each layer's ``mlp`` replaced by an ``MoEFFN`` wrapping the
source FFN modules, so it works for every decoder of docs/design.md §5 (Llama, Qwen2, Mistral). Export
(``export_mixtral``): for bias-free Llama/Mistral models the artifact is a Mixtral checkpoint that
``transformers`` loads as ``MixtralForCausalLM`` (``num_local_experts = E``; ``num_experts_per_tok`` = 2 for
top2, ``E`` for soft, 1 for sample — Mixtral's top-1 renormalised weight is exactly 1, which is our evaluation
routing) with logits equal to ours up to float summation order. Other architectures (e.g. Qwen2's attention
biases, which Mixtral lacks) are saved as ``btx.safetensors`` + ``base_config.json`` and reloaded by ``load_btx``.

The network, its construction and the artifact loader are shared with BAM and live in ``baselines.upcycle``
(re-exported here); this module adds the training module ``BTXModule`` and ``export_mixtral``. ``baselines.btx``
and ``baselines.bam`` do not import each other.
"""

from __future__ import annotations

from pathlib import Path

from baselines.upcycle import (
    MIXTRAL_EXPORTABLE_TYPES,
    ROUTING_OF_VARIANT,
    BTXModel,
    MixtralLM,
    UpcycledMoEModule,
    Variant,
    build_btx,
    load_btx,
    moe_skeleton,
)
from bts.training import flops
from bts.training.optimizer import OptimizerArgs, Unpack

__all__ = [
    "MIXTRAL_EXPORTABLE_TYPES",
    "ROUTING_OF_VARIANT",
    "BTXModel",
    "BTXModule",
    "MixtralLM",
    "Variant",
    "build_btx",
    "export_mixtral",
    "load_btx",
    "moe_skeleton",
]


def export_mixtral(module: BTXModule | BTXModel, out_dir: str | Path) -> Path:
    """Save a BTX model (or module) as a Hugging Face Mixtral directory (``AutoModelForCausalLM`` loads it)."""
    net = module.net if isinstance(module, BTXModule) else module
    out_dir = Path(out_dir)
    net.to_mixtral().save_pretrained(out_dir)
    return out_dir


class BTXModule(UpcycledMoEModule):
    """Trains BTX (Sukhbaatar et al. 2024, "Branch-Train-MiX", arXiv 2403.07816): the seed and experts upcycled
    into an MoE (``build_btx``), then every parameter fine-tuned with next-token CE (+ load balancing for top2) by
    the shared ``LMTrainingModule`` loop. The artifact (``output_dir``) is a Mixtral HF directory when the
    architecture allows it (``export_mixtral``), plus ``btx.json`` and ``training.json``."""

    def __init__(
        self,
        seed_model: str,
        experts: list[str],
        variant: Variant = "top2",
        router_init_std: float = 0.02,
        router_seed: int = 0,
        load_balance_coef: float = 0.01,
        gumbel_temperature: float = 1.0,
        output_dir: str | None = None,
        **optimizer: Unpack[OptimizerArgs],
    ):
        """
        Args:
            seed_model: Hugging Face directory of the seed model (its FFN becomes MoE expert 0).
            experts: Hugging Face directories of the experts branched from the seed (FFN experts 1..n).
            variant: routing: ``top2`` (top-2 + load balancing, the BTX default), ``soft`` (all experts, softmax
                weights) or ``sample`` (top-1 Gumbel-softmax straight-through in training, argmax at eval).
            router_init_std: std of the normal init of the new routers (0 = zero routers).
            router_seed: seed of the router initialisation.
            load_balance_coef: coefficient of the Switch load-balancing loss (``top2`` only; 0 disables it).
            gumbel_temperature: Gumbel-softmax temperature of ``sample`` (affects only the router gradient).
            output_dir: where the trained artifact is written at the end of ``fit``.
            optimizer: ``lr``, ``warmup_steps``, ``min_lr_ratio``, ``weight_decay``, ``betas``
                (``bts.training.optimizer.OptimizerArgs``).
        """
        super().__init__(output_dir, **optimizer)
        self.save_hyperparameters()
        self.build_net(build_btx, seed_model, experts, variant, router_init_std, router_seed, load_balance_coef,
                       gumbel_temperature)

    def flops_per_token(self, seq_len: int) -> float:
        """Dense training FLOPs with ``top_k`` FFN experts per token (every expert for ``soft``); routers left out."""
        return flops.dense_train_flops(self.net.model.config, seq_len, ffn_experts=self.net.top_k)

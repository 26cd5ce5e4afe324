"""``CausalLMModule``: a dense Llama-architecture model on the shared training loop (``bts.training.module``):
seed pretraining, and expert continued pretraining when ``init_from`` points at the seed's Hugging Face directory
(branching = loading the seed).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from bts.core.io import BTSError
from bts.dense.modeling import LlamaArch, build_llama, check_tokenizer_fits, decoder_parts, load_causal_lm
from bts.training import flops
from bts.training.module import LMTrainingModule
from bts.training.optimizer import OptimizerArgs, Unpack


class CausalLMModule(LMTrainingModule):
    """A dense causal LM: the seed (built from ``arch``) or an expert branched from ``init_from``."""

    def __init__(
        self,
        arch: LlamaArch | dict | None = None,
        init_from: str | None = None,
        seed: int = 0,
        output_dir: str | None = None,
        freeze: list[str] | None = None,
        **optimizer: Unpack[OptimizerArgs],
    ):
        """
        Args:
            arch: architecture of a model trained from scratch (ignored when ``init_from`` is set).
            init_from: Hugging Face directory to continue from (branching an expert from the seed).
            seed: seed of the random initialisation.
            output_dir: where the final Hugging Face directory (model + tokenizer, safetensors) is written.
            freeze: parts that keep the loaded weights, among ``FREEZABLE`` ("embeddings", "final_norm", "head"):
                an expert whose final norm and head stay the seed's stays readable by the hub's head (docs/design.md §7;
                an approximation of the paper's very low expert lr). With tied embeddings (``tie_word_embeddings``)
                "embeddings" and "head" are one tensor: freeze both or neither (one alone is refused).
            optimizer: ``lr``, ``warmup_steps``, ``min_lr_ratio``, ``weight_decay``, ``betas``
                (``bts.training.optimizer.OptimizerArgs``).
        """
        super().__init__(output_dir, **optimizer)
        freeze = list(freeze or [])
        bad = [f for f in freeze if f not in FREEZABLE]
        if bad:
            raise BTSError(f"model.init_args.freeze: unknown part {bad[0]!r} (known: {', '.join(FREEZABLE)})")
        arch = LlamaArch(**arch) if isinstance(arch, dict) else (arch or LlamaArch())
        # hparams hold the architecture as a plain dict so Lightning checkpoints load with weights_only=True.
        self.save_hyperparameters(ignore=["arch"])
        self.hparams["arch"] = asdict(arch)
        if init_from is not None:
            self.model = load_causal_lm(init_from)
        else:
            self.model = build_llama(arch, seed=seed)
        self.model.config.use_cache = False
        tied = self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight
        if tied and len({"embeddings", "head"} & set(freeze)) == 1:
            one, other = ("head", "embeddings") if "head" in freeze else ("embeddings", "head")
            raise BTSError(
                f"model.init_args.freeze: {one!r} without {other!r} on a model with tied input/output embeddings "
                f"(tie_word_embeddings): they are one tensor, so freezing {one!r} would also freeze {other!r}; "
                "freeze both or neither"
            )
        for part in freeze:
            for p in _freezable_part(self.model, part).parameters():
                p.requires_grad_(False)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def hidden_and_head(self, input_ids: torch.LongTensor):
        return hf_hidden_and_head(self.model, input_ids)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward, input gradients, and weight gradients of every matrix that trains (a frozen head: none)."""
        total = flops.dense_train_flops(self.model.config, seq_len)
        if not self.model.get_output_embeddings().weight.requires_grad:
            total -= flops.head_forward_flops(self.model.config)
        return total

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        check_tokenizer_fits(getattr(dm, "tokenizer", None), self.model.config.vocab_size, "model")

    def save_artifact(self, out_dir: Path) -> None:
        self.model.config.use_cache = True
        self.model.save_pretrained(out_dir, safe_serialization=True)
        if self.hparams.init_from is not None:
            (out_dir / "branched_from.json").write_text(json.dumps({"init_from": str(self.hparams.init_from)}))


FREEZABLE = ("embeddings", "final_norm", "head")

# configs whose logits are not just head(hidden): they keep the plain logits loss
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def hf_hidden_and_head(model, input_ids: torch.LongTensor) -> tuple[torch.Tensor, nn.Linear] | None:
    """``LMTrainingModule.hidden_and_head`` for a Hugging Face causal LM: its decoder's final states and its head,
    or None when its logits are more than ``head(hidden)``."""
    head = model.get_output_embeddings()
    if not _plain_head(model, head):
        return None
    return model.model(input_ids=input_ids, use_cache=False).last_hidden_state, head


def _plain_head(model, head) -> bool:
    """Whether ``model``'s logits are exactly ``head(last_hidden_state)`` (a bias-free linear head, nothing after)."""
    if not isinstance(head, nn.Linear) or head.bias is not None or not hasattr(model, "model"):
        return False
    return not any(getattr(model.config, k, None) not in (None, 1.0) for k in _LOGIT_TRANSFORMS)


def _freezable_part(model, part: str) -> nn.Module:
    if part == "embeddings":
        return model.get_input_embeddings()
    if part == "head":
        return model.get_output_embeddings()
    return decoder_parts(model).norm

"""The one training loop. ``LMTrainingModule`` is what every trainable method shares (seed, experts, BTS stitch
layers, trained baselines): next-token cross-entropy, AdamW over the parameters that require grad (groups from
``optimizer_groups``), the paper's warmup + cosine-to-1 % schedule, per-domain held-out perplexity
(``val/<domain>/ppl``), throughput (tokens/s and MFU) and the artifact written at the end of fit.

Fault handling: a non-finite loss (``training_step``) or a non-finite gradient norm (``on_before_optimizer_step``,
skipped under fp16 loss scaling, which handles overflow itself) raises ``BTSError`` naming the step; the stage
stops before the optimizer step, so the last Lightning checkpoint written stays the last good one and no artifact
is written. Resumability: the torch RNG is re-seeded at every training batch from ``(base seed, global step,
batch index, rank)`` (the base seed, ``torch.initial_seed()`` when the module was built, is stored in Lightning
checkpoints), so dropout/sampling noise after a resume equals the uninterrupted run's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from bts.core.io import BTSError, atomic_dir, atomic_write_json, ensure_writable_dir
from bts.core.language_model import greedy_or_sample_uncached
from bts.core.params import ParamCounts, count_params
from bts.training.losses import DEFAULT_CHUNK_TOKENS, linear_cross_entropy
from bts.training.optimizer import OPTIMIZER_DEFAULTS, OptimizerArgs, Unpack, resolve_optimizer_args
from bts.training.perplexity import DomainPerplexity, token_nll
from bts.training.schedule import warmup_cosine
from bts.training.throughput import StageClock, compute_dtype, matmul_peak, mfu


class LMTrainingModule(L.LightningModule):
    """Base class: subclasses implement ``forward(input_ids) -> logits [B, T, V]`` and may override
    ``extra_loss`` (e.g. a load-balancing loss), ``save_artifact`` and ``param_counts``.

    ``artifact_kind`` names the loader (entry point group ``bts.artifacts``) that reads the saved artifact back
    for evaluation; ``None`` means the artifact is a plain Hugging Face directory.
    """

    artifact_kind: ClassVar[str | None] = None
    loss_chunk_tokens: ClassVar[int] = DEFAULT_CHUNK_TOKENS
    """Tokens per chunk of the LM-head cross-entropy when the module exposes ``hidden_and_head``."""

    optimizer_defaults: ClassVar[OptimizerArgs] = OPTIMIZER_DEFAULTS
    """What a subclass's optimiser arguments default to (``bts.training.optimizer``)."""

    def __init__(self, output_dir: str | None = None, **optimizer: Unpack[OptimizerArgs]):
        super().__init__()
        self.optimizer_args = resolve_optimizer_args(optimizer, self.optimizer_defaults)
        self.lr = self.optimizer_args["lr"]
        self.warmup_steps = self.optimizer_args["warmup_steps"]
        self.min_lr_ratio = self.optimizer_args["min_lr_ratio"]
        self.weight_decay = self.optimizer_args["weight_decay"]
        self.betas = self.optimizer_args["betas"]
        self.output_dir = output_dir
        self._ppl: dict[str, DomainPerplexity] = {}
        self._tokens_seen = 0
        self._seq_len: int | None = None
        self._clock = StageClock()
        self._clock_paused_for_eval = False
        self._loss_finite: torch.Tensor | None = None  # device flag over the micro-batches of the current step
        self._last_loss: torch.Tensor | None = None
        self._last_batch_idx = 0
        self._rng_base_seed = int(torch.initial_seed()) % (2**63)
        if output_dir is not None:
            ensure_writable_dir(Path(output_dir).parent)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """``trainer.gradient_clip_val`` under FSDP too: FSDP shards the gradients, so the global norm comes from the
        root FSDP module's ``clip_grad_norm_`` (a collective), which Lightning's FSDP precision plugin refuses to
        call itself."""
        from lightning.pytorch.strategies import FSDPStrategy

        if (gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm"
                and isinstance(self.trainer.strategy, FSDPStrategy)):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # --- interface -------------------------------------------------------------------------------------------
    def extra_loss(self) -> torch.Tensor | None:
        """Auxiliary loss of the last forward (None if the method has none)."""
        return None

    def param_counts(self) -> ParamCounts:
        n = count_params(self)
        return ParamCounts(trained=count_params(self, trainable_only=True), total=n, active=n)

    def save_artifact(self, out_dir: Path) -> None:
        """Write the trained artifact into ``out_dir`` (a fresh temporary directory)."""

    def hidden_and_head(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, nn.Linear] | None:
        """The final hidden states ``[B, T, d]`` and the bias-free LM head they feed, so that the loss applies the
        head chunk by chunk (``bts.training.losses``); None (the default): the loss reads ``forward``'s logits."""
        return None

    def flops_per_token(self, seq_len: int) -> float | None:
        """Model FLOPs of one training token at context ``seq_len`` (``bts.training.flops``), for MFU; None: not counted."""
        return None

    def optimizer_groups(self) -> list[dict]:
        """AdamW parameter groups: weight decay on matrices, none on vectors (norm gains)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, eos_token_id=None, do_sample=False, temperature=1.0, generator=None):
        return greedy_or_sample_uncached(self, input_ids, max_new_tokens, eos_token_id, do_sample, temperature, generator)

    # --- training --------------------------------------------------------------------------------------------
    def lm_loss(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Mean next-token cross-entropy (plus ``extra_loss``); through ``hidden_and_head`` when the module has it."""
        targets = input_ids[:, 1:].flatten()
        out = self.hidden_and_head(input_ids)
        if out is not None:
            hidden, head = out
            loss = linear_cross_entropy(hidden[:, :-1].flatten(0, 1), head, targets, self.loss_chunk_tokens)
        else:
            loss = F.cross_entropy(self(input_ids)[:, :-1].flatten(0, 1).float(), targets)
        extra = self.extra_loss()
        return loss if extra is None else loss + extra

    def training_step(self, batch, batch_idx):
        input_ids = batch["input_ids"]
        loss = self.lm_loss(input_ids)
        # checked once per optimizer step with the gradients (one host sync, on_before_optimizer_step)
        finite = torch.isfinite(loss.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self._last_loss, self._last_batch_idx = loss.detach(), batch_idx
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        self._tokens_seen += input_ids.numel()
        self._seq_len = int(input_ids.shape[1])
        return loss

    def setup(self, stage: str) -> None:
        """Train mode for what trains, before the model summary and fit (subclasses call ``super().setup``):
        Hugging Face models load in eval mode and Lightning keeps each module's mode, so without this a loaded model
        would continue pretraining with its dropout off. Frozen parts stay in eval mode (the models' ``train``
        overrides keep them there); Lightning's warning about modules in eval mode is silenced only when every such
        module is frozen on purpose."""
        if stage != "fit":
            return
        self.train()
        left = [m for m in self.modules() if not m.training]
        if left and not any(p.requires_grad for m in left for p in m.parameters(recurse=False)):
            import warnings

            warnings.filterwarnings("ignore", message=rf"Found {len(left)} module\(s\) in eval mode at the start")

    def on_train_batch_start(self, batch, batch_idx):
        seed = hash_seed(self._rng_base_seed, self.global_step, batch_idx, self.global_rank)
        torch.manual_seed(seed)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop on a non-finite loss or gradient before the step: one flag per parameter's gradient norm and the
        losses of the step's micro-batches, read with one host sync per optimizer step. Under fp16 loss scaling the
        scaler skips steps with inf/nan gradients by design, so only the loss is checked there."""
        loss_ok, self._loss_finite = self._loss_finite, None
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        named = [] if scaled else [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        flags = [loss_ok.reshape(1)] if loss_ok is not None else []
        if named:
            flags.append(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(
                [g.detach() for _, g in named])])))
        if not flags:
            return
        flags = torch.cat([f.to(flags[-1].device) for f in flags]).cpu()  # the one sync
        if loss_ok is not None and not bool(flags[0]):
            raise BTSError(
                f"non-finite training loss ({self._last_loss.item()}) at step {self.global_step + 1} (batch "
                f"{self._last_batch_idx}); stopping before the optimizer step (the last checkpoint written is kept)"
            )
        grads_ok = flags[1:] if loss_ok is not None else flags
        if not bool(grads_ok.all()):
            bad = [n for (n, _), ok in zip(named, grads_ok.tolist()) if not ok]
            raise BTSError(
                f"non-finite gradient at step {self.global_step + 1} in {len(bad)} parameter(s) (first: {bad[0]}); "
                "stopping before the optimizer step (the last checkpoint written is kept)"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["bts_rng_base_seed"] = self._rng_base_seed

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_base_seed = int(checkpoint.get("bts_rng_base_seed", self._rng_base_seed))

    # --- throughput: training time without evaluation, GPU synchronised at the boundaries only ------------
    def on_train_start(self) -> None:
        self._clock.start(self.device)

    def on_validation_start(self) -> None:
        if self.trainer is not None and self.trainer.training and self._clock._since is not None:
            self._clock.pause(self.device)
            self._clock_paused_for_eval = True

    def on_validation_end(self) -> None:
        if self._clock_paused_for_eval:
            self._clock_paused_for_eval = False
            self._clock.resume(self.device)

    def on_train_end(self) -> None:
        self._clock.pause(self.device)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        elapsed = self._clock.elapsed()
        if elapsed > 0:
            self.log("train/tokens_per_s", self._tokens_seen / elapsed, on_step=True, on_epoch=False)

    def throughput(self) -> dict:
        """tokens/s of training and MFU against the measured matmul peak of the device in the training's dtype."""
        seconds = self._clock.seconds
        tokens_per_s = self._tokens_seen / seconds if seconds > 0 else None
        per_token = self.flops_per_token(self._seq_len) if self._seq_len else None
        try:
            precision = getattr(self.trainer, "precision", None) if self._trainer is not None else None
            peak = matmul_peak(self.device, compute_dtype(precision, self.device))
        except (RuntimeError, ValueError):  # a device that cannot run the probe: report tokens/s alone
            peak = None
        util = mfu(tokens_per_s, per_token, peak and peak["flops"])
        return {"train_seconds": round(seconds, 3), "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
                "seq_len": self._seq_len, "flops_per_token": per_token,
                "model_tflops_per_s": round(tokens_per_s * per_token / 1e12, 3) if tokens_per_s and per_token
                else None, "mfu": round(util, 4) if util is not None else None, "peak": peak}

    def configure_optimizers(self):
        groups = [g for g in self.optimizer_groups() if g["params"]]
        params = [p for g in groups for p in g["params"]]
        if not params:
            raise BTSError(f"{type(self).__name__} has no trainable parameters")
        # the fused kernel (one launch for every tensor) where every trained tensor is on a GPU
        fused = all(p.is_cuda for p in params)
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, **({"fused": True} if fused else {}))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.warmup_steps, total, self.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- evaluation ------------------------------------------------------------------------------------------
    def _domains(self) -> list[str]:
        dm = getattr(self.trainer, "datamodule", None)
        return list(getattr(dm, "eval_domains", ["all"]))

    def _eval_step(self, batch, dataloader_idx: int) -> None:
        domain = self._domains()[dataloader_idx]
        if domain not in self._ppl:
            self._ppl[domain] = DomainPerplexity().to(self.device)
        self._ppl[domain].update(token_nll(self(batch["input_ids"]), batch["input_ids"]))

    def _eval_epoch_end(self, stage: str) -> None:
        ppls = {}
        for domain, metric in self._ppl.items():
            ppls[domain] = metric.compute()
            self.log(f"{stage}/{domain}/ppl", ppls[domain], prog_bar=False)
            metric.reset()
        if ppls:
            mean_log = torch.stack([p.log() for p in ppls.values()]).mean()
            self.log(f"{stage}/loss", mean_log, prog_bar=True)
        self._ppl = {}

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    # --- artifact ----------------------------------------------------------------------------------------------
    def on_fit_end(self):
        if self.output_dir is not None:
            self._write_output()

    @rank_zero_only
    def _write_output(self) -> None:
        with atomic_dir(self.output_dir) as tmp:
            self.save_artifact(tmp)
            dm = getattr(self.trainer, "datamodule", None)
            if getattr(dm, "tokenizer", None) is not None:
                dm.tokenizer.save_pretrained(tmp)
            if self.artifact_kind is not None:
                atomic_write_json(tmp / "artifact.json", {"kind": self.artifact_kind})
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
            throughput = self.throughput()
            atomic_write_json(
                tmp / "training.json",
                {
                    "module": type(self).__name__,
                    "global_step": int(self.global_step),
                    "tokens_seen": int(self._tokens_seen),
                    "train_seconds": throughput["train_seconds"],
                    "tokens_per_s": throughput["tokens_per_s"],
                    "throughput": throughput,
                    "params": self.param_counts().to_dict(),
                    "lr": self.lr,
                    "min_lr_ratio": self.min_lr_ratio,
                    "optimizer": {**self.optimizer_args, "betas": list(self.betas)},  # defaults resolved
                    "frozen": sorted(n for n, p in self.named_parameters() if not p.requires_grad)[:64],
                    # the parts kept frozen as configured (overrides included): what the regime block reports
                    **({"freeze": list(self.hparams["freeze"] or [])} if "freeze" in self.hparams else {}),
                    "final_metrics": metrics,
                },
            )


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and platforms)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device

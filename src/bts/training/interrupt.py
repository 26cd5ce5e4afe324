"""Nothing lost on SIGTERM / SIGINT during fit: ``InterruptCheckpoint`` saves a resumable Lightning checkpoint at
the next optimizer-step boundary and stops the run with ``FitInterrupted`` (exit status 143 for SIGTERM, 130 for
SIGINT), never with status 0 and no output.

How it sits with Lightning's own handling: Lightning installs its SIGTERM handler when fit starts
(``_SignalConnector``: it sets ``trainer.received_sigterm`` and the loops then raise ``SIGTERMException``, a
``SystemExit`` with status 0, at the end of the batch). From ``on_train_start`` to the end of training this callback
takes SIGTERM and SIGINT itself and gives Lightning's handlers back afterwards (``on_train_end`` / ``on_exception``,
before Lightning restores the process's original ones). It stops only where a Lightning ``ModelCheckpoint`` would
save (``on_train_batch_end`` of a batch that stepped the optimizer, so never inside a gradient-accumulation window),
with the same ``trainer.save_checkpoint`` (weights, optimizer, scheduler, loop counters, callback and datamodule
states); a resume from it continues exactly like one from a periodic ``last.ckpt``. ``FitInterrupted`` subclasses
Lightning's ``SIGTERMException``, so ``on_exception`` hooks that react to SIGTERM (``OnExceptionCheckpoint``) still
do. SIGUSR1 (Lightning's SLURM auto-requeue signal) is left to Lightning: see docs/reliability.md.

The checkpoint is ``last.ckpt`` in the first ``ModelCheckpoint``'s directory (``<default_root_dir>/checkpoints``
without one), written to a temporary file and renamed. A second SIGINT while the first waits for the step boundary
aborts at once (``KeyboardInterrupt``, no checkpoint). Under a distributed strategy the ranks agree at every step
boundary whether any rank was signalled (one boolean all-reduce per optimizer step), so they stop at the same step.

The callback also carries the fingerprint of the run's configuration in every checkpoint (``state_dict``), which
``bts fit`` compares before resuming a ``last.ckpt`` on its own (``bts.cli.fit_guard``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class FitInterrupted(SIGTERMException):
    """Training stopped by ``signum`` after ``step`` optimizer steps, resumable from ``checkpoint``; exits with status
    ``128 + signum`` when nothing catches it (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(128 + int(signum))
        self.signum, self.step, self.checkpoint = int(signum), int(step), Path(checkpoint)

    def __reduce__(self):  # picklable (a `bts reproduce` stage worker sends it back to the pipeline process)
        return type(self), (self.signum, self.step, str(self.checkpoint))

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    def __str__(self) -> str:
        return (f"interrupted by {self.signal_name} after step {self.step}; resumable checkpoint saved to "
                f"{self.checkpoint}")


def interrupt_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where an interrupted fit saves: ``last.ckpt`` of the first ``ModelCheckpoint`` with a directory (the default
    one's is resolved in its ``setup``), else ``<default_root_dir>/checkpoints/last.ckpt``."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class InterruptCheckpoint(L.Callback):
    """See the module docstring. ``config_fingerprint`` (set by ``bts fit``) is stored in every checkpoint."""

    def __init__(self, config_fingerprint: str | None = None):
        self.config_fingerprint = config_fingerprint
        self._pending: int | None = None
        self._previous: dict[int, object] = {}
        self._step_at_batch_start = 0

    # --- state carried in checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"config_fingerprint": self.config_fingerprint}

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # the fingerprint is compared before the run (bts.cli.fit_guard); this run keeps its own

    # --- signal handlers, installed for the training loop only ------------------------------------------------
    def _handle(self, signum, frame) -> None:
        if self._pending == signal.SIGINT and signum == signal.SIGINT:
            self._restore()  # Ctrl+C twice: the user does not want to wait for the step to end
            raise KeyboardInterrupt
        if self._pending is None:
            self._pending = int(signum)

    def _install(self) -> None:
        if self._previous:
            return
        try:
            for sig in HANDLED_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals cannot be handled here, Lightning's behaviour stays
            self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self._pending = signal.SIGTERM if trainer.received_sigterm else None  # one that came during setup
        self._install()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    # --- stopping at a step boundary --------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient-accumulation window: a checkpoint here would lose the accumulated gradients
        pending = self._pending
        if trainer.world_size > 1:  # every rank reaches this point at the same step: agree, then stop together
            stop = trainer.strategy.reduce_boolean_decision(pending is not None, all=False)
            pending = (pending or signal.SIGTERM) if stop else None
        if pending is None or _ends_training(trainer):
            return
        path = interrupt_checkpoint_path(trainer)
        tmp = path.with_name(f".{path.name}.interrupted.tmp")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, False)  # weights_only False, as ModelCheckpoint saves: the whole training state
        if trainer.is_global_zero:
            os.replace(tmp, path)
        trainer.strategy.barrier("InterruptCheckpoint")
        raise FitInterrupted(pending, trainer.global_step, path)


def _ends_training(trainer: L.Trainer) -> bool:
    """The step just taken is the run's last: it finishes and writes its output rather than leave a checkpoint to
    resume for nothing."""
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    return bool(trainer.is_last_batch and trainer.max_epochs not in (None, -1)
                and trainer.current_epoch + 1 >= trainer.max_epochs)

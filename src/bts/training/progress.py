"""Progress lines of a training run where no progress bar shows it (log files, ``bts reproduce`` stages, batch jobs).

``ProgressLog`` prints one line at the first optimizer step, then at most every ``every_s`` seconds, and at the
last one: step / total, the loss of that step, training tokens/s, MFU where the module counts its FLOPs, elapsed
time and ETA. Reading the loss is the only host sync it adds, once per line. With a progress bar on (an interactive
``bts fit``) it prints nothing.
"""

from __future__ import annotations

import sys
import time

import lightning as L

from bts.training.throughput import compute_dtype, matmul_peak, mfu


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressLog(L.Callback):
    """One line per ``every_s`` seconds of training (module docstring)."""

    def __init__(self, every_s: float = 30.0, stream=None):
        self.every_s = float(every_s)
        self.stream = stream
        self._t0 = 0.0
        self._last = -float("inf")
        self._peak: float | None = None

    def _name(self, trainer, module) -> str:
        """The logger's run name (the stage), else the output directory's name, else the module's class."""
        out = getattr(module, "output_dir", None)
        return (getattr(trainer.logger, "name", None) or (out and str(out).rstrip("/").rsplit("/", 1)[-1])
                or type(module).__name__)

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer, module) -> None:
        self._t0 = time.perf_counter()
        self._last = -float("inf")
        if trainer.progress_bar_callback is None:
            try:
                self._peak = matmul_peak(module.device, compute_dtype(trainer.precision, module.device))["flops"]
            except (RuntimeError, ValueError):
                self._peak = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.progress_bar_callback is not None or not trainer.is_global_zero:
            return
        step, total = trainer.global_step, trainer.max_steps if trainer.max_steps > 0 else None
        now = time.perf_counter()
        last = total is not None and step >= total
        if step != 1 and not last and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = now - self._t0
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        parts = [f"[{self._name(trainer, module)}] step {step}" + (f"/{total} ({100 * step // total}%)" if total
                                                                    else "")]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        clock = getattr(module, "_clock", None)
        seen = getattr(module, "_tokens_seen", 0)
        train_s = clock.elapsed() if clock is not None else elapsed
        if seen and train_s > 0:
            tps = seen / train_s
            parts.append(f"{tps:,.0f} tokens/s")
            per_token = module.flops_per_token(module._seq_len) if getattr(module, "_seq_len", None) else None
            util = mfu(tps, per_token, self._peak)
            if util is not None:
                parts.append(f"MFU {100 * util:.1f}%")
        parts.append(f"elapsed {_duration(elapsed)}")
        if total and step and not last:
            parts.append(f"eta {_duration(elapsed / step * (total - step))}")
        self._print(" ".join(parts))

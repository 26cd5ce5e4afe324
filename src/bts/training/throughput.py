"""Throughput of a stage: tokens/s and MFU against the device's measured matmul peak.

``StageClock`` measures the wall time of training alone (evaluation paused out) and synchronises the GPU only at
its boundaries, so it adds no host sync to the training steps. ``matmul_peak`` times large matrix products on the
device in the dtype the stage computes in (bfloat16 under autocast on a GPU, float32 on the CPU) once per process;
MFU = tokens/s × model FLOPs per token (``bts.training.flops``) ÷ that peak.
"""

from __future__ import annotations

import functools
import time

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


class StageClock:
    """Accumulated wall time between ``start``/``resume`` and ``pause`` calls, synchronised with the device."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._since: float | None = None

    def start(self, device=None) -> None:
        synchronize(device)
        self._since = time.perf_counter()

    resume = start

    def pause(self, device=None) -> None:
        if self._since is None:
            return
        synchronize(device)
        self.seconds += time.perf_counter() - self._since
        self._since = None

    def elapsed(self) -> float:
        """Seconds so far, including a running interval (not synchronised: for progress lines only)."""
        return self.seconds + (time.perf_counter() - self._since if self._since is not None else 0.0)


@functools.cache
def _peak(device_type: str, index: int | None, dtype: torch.dtype, size: int, repeats: int) -> float:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    for _ in range(2):  # warm-up (kernel selection, clocks)
        a @ b
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 2 * size**3 / best


def matmul_peak(device: torch.device | str, dtype: torch.dtype) -> dict:
    """Measured FLOP/s of ``size³`` matmuls in ``dtype`` on ``device`` (random data; cached per process):
    8192 × 8192 in bfloat16 on a GPU (~0.1 s), 1024 × 1024 on the CPU (~0.5 s on 2 cores)."""
    device = torch.device(device)
    size, repeats = (8192, 10) if device.type == "cuda" else (1024, 4)
    flops = _peak(device.type, device.index, dtype, size, repeats)
    return {"flops": flops, "tflops": round(flops / 1e12, 3), "dtype": str(dtype).removeprefix("torch."),
            "size": size, "device": _device_name(device)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def compute_dtype(precision: str | int | None, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in under a Lightning ``precision`` setting (bf16 under bf16-mixed / bf16-true)."""
    p = str(precision or "32")
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16") and device.type == "cuda":
        return torch.float16
    return torch.float32


def mfu(tokens_per_s: float | None, flops_per_token: float | None, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when any input is missing)."""
    if not tokens_per_s or not flops_per_token or not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops

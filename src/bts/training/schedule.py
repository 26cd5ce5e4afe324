"""The paper's learning-rate schedule: linear warmup, then cosine decay to a fraction (1 %) of the peak."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.01) -> float:
    """Multiplier of the peak lr at ``step``: linear ramp over ``warmup_steps``, cosine to ``min_ratio`` at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

"""Parameter accounting for paper Table 2: trained / total / active parameters, computed from model objects."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass
class ParamCounts:
    trained: int
    """Parameters that receive gradients in the method's training stage."""
    total: int
    """All parameters the method needs at inference (frozen models included)."""
    active: int
    """Parameters used to process one token (MoE: only the routed experts)."""

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (shared tensors counted once)."""
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n

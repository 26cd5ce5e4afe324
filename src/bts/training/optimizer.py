"""The optimiser arguments every trained module shares (AdamW and the warmup + cosine schedule).

Modules take them as ``**optimizer: Unpack[OptimizerArgs]``, so a config keeps them as plain keys of
``model.init_args`` (``lr: 1e-3``) while the signature, its documentation and its checks live here once.
"""

from __future__ import annotations

import sys
from typing import TypedDict

from bts.core.io import BTSError

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # typing_extensions comes with torch
    from typing_extensions import Unpack

__all__ = ["OPTIMIZER_DEFAULTS", "OptimizerArgs", "Unpack", "resolve_optimizer_args"]


class OptimizerArgs(TypedDict, total=False):
    """AdamW over the trained parameters with linear warmup then cosine decay (paper §3: warmup, then cosine to
    1 % of the peak). A key left out takes the module's default (``optimizer_defaults`` of the module class;
    ``OPTIMIZER_DEFAULTS`` unless the module says otherwise).

    Args:
        lr: peak learning rate.
        warmup_steps: linear warmup steps before the cosine decay.
        min_lr_ratio: final lr as a fraction of the peak (paper: 1 %).
        weight_decay: AdamW weight decay on the trained matrices (norms and biases never decay).
        betas: AdamW betas.
    """

    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    betas: tuple[float, float]


OPTIMIZER_DEFAULTS: OptimizerArgs = {"lr": 3e-3, "warmup_steps": 20, "min_lr_ratio": 0.01, "weight_decay": 0.1,
                                     "betas": (0.9, 0.95)}


def resolve_optimizer_args(given: dict, defaults: OptimizerArgs) -> OptimizerArgs:
    """``defaults`` updated with ``given``; an unknown key (a typo in Python code: the CLI rejects it itself) or a
    value out of range is one error."""
    unknown = sorted(set(given) - set(OptimizerArgs.__annotations__))
    if unknown:
        raise BTSError(f"unknown optimiser argument '{unknown[0]}' (known: {', '.join(OptimizerArgs.__annotations__)})")
    args: OptimizerArgs = {**defaults, **given}
    args["betas"] = tuple(args["betas"])
    if not args["lr"] > 0:
        raise BTSError(f"model.init_args.lr must be > 0, got {args['lr']}")
    if args["warmup_steps"] < 0 or not 0 <= args["min_lr_ratio"] <= 1 or args["weight_decay"] < 0:
        raise BTSError("model.init_args: warmup_steps and weight_decay must be >= 0 and min_lr_ratio in [0, 1], got "
                       f"{args['warmup_steps']}, {args['weight_decay']}, {args['min_lr_ratio']}")
    return args

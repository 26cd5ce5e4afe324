"""Domain mixtures: named presets of sampling weights over :data:`bts.data.corpus.DOMAINS`.

The paper (§3.1) trains experts on mixtures with more than 85 % of their own domain (multilingual: 90 % non-English
/ 10 % English) and the BTS stitch layers on 15 % of each expert domain plus 55 % general data. The seed model is
a general-heavy generalist. Weights are proportions of *sampled training sequences* (see
:class:`bts.data.datamodule.DomainMixDataModule`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

from bts.core.io import BTSError

from .domains import DOMAINS

PRESETS: dict[str, dict[str, float]] = {
    # the generalist seed model m0
    "seed": {"general": 0.70, "code": 0.10, "math": 0.10, "multilingual": 0.10},
    # expert continued pretraining (paper: > 85 % own domain)
    "expert_code": {"code": 0.90, "general": 0.10},
    "expert_math": {"math": 0.90, "general": 0.10},
    # paper: 90 % non-English / 10 % English
    "expert_multilingual": {"multilingual": 0.90, "general": 0.10},
    # stitch-layer training (paper: 15 % per expert domain + 55 % general)
    "bts": {"general": 0.55, "code": 0.15, "math": 0.15, "multilingual": 0.15},
    # a uniform mixture (handy for evaluation and ablations)
    "uniform": {"general": 0.25, "code": 0.25, "math": 0.25, "multilingual": 0.25},
}


def resolve_mixture(mixture: str | Mapping[str, float]) -> dict[str, float]:
    """Weights over all :data:`DOMAINS` (in that order, zeros included), normalised to sum to 1.

    ``mixture`` is a preset name (:data:`PRESETS`) or a mapping ``{domain: weight}`` with non-negative numbers
    (domains left out get 0). Errors (one line, naming the bad key/value): unknown preset, unknown domain,
    non-numeric / negative / non-finite weight, all weights zero.
    """
    if isinstance(mixture, str):
        if mixture not in PRESETS:
            raise BTSError(f"unknown mixture preset {mixture!r}; known presets: {', '.join(PRESETS)}")
        weights: Mapping = PRESETS[mixture]
    elif isinstance(mixture, Mapping):
        weights = mixture
    else:
        raise BTSError(f"a mixture must be a preset name or a mapping of domain weights, not "
                       f"{type(mixture).__name__}")
    out = {d: 0.0 for d in DOMAINS}
    for key, value in weights.items():
        if key not in out:
            raise BTSError(f"unknown domain {key!r} in mixture; known domains: {', '.join(DOMAINS)}")
        if isinstance(value, bool) or not isinstance(value, Real):
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise BTSError(f"mixture weight for {key!r} is not a number: {value!r}") from None
            else:
                raise BTSError(f"mixture weight for {key!r} is not a number: {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise BTSError(f"mixture weight for {key!r} is not finite: {value!r}")
        if value < 0:
            raise BTSError(f"mixture weight for {key!r} is negative: {value!r}")
        out[key] = value
    total = sum(out.values())
    if total <= 0:
        raise BTSError("mixture weights are all zero; give at least one domain a positive weight")
    return {d: w / total for d, w in out.items()}


def active_domains(mixture: str | Mapping[str, float]) -> list[str]:
    """Domains with a positive weight, in :data:`DOMAINS` order."""
    return [d for d, w in resolve_mixture(mixture).items() if w > 0]

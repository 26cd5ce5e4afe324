"""Task arithmetic and TIES-merging: one parametrised implementation.

* Task arithmetic — Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv 2212.04089)::

      θ = θ_seed + λ · Σ_i w_i τ_i,     τ_i = θ_i − θ_seed   (w_i = 1 by default: docs/design.md §2)

* TIES — Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
  (arXiv 2306.01708): trim each task vector, elect a sign per entry, take the disjoint mean, scale by λ.

Conventions follow mergekit 0.1.5 (``mergekit/merge_methods/generalized_task_arithmetic.py``,
``GeneralizedTaskArithmeticMerge.merge_group`` with ``get_mask``, and ``mergekit/sparsify.py::magnitude``),
per tensor, in float32:

1. **Trim** (``density < 1``): each task vector τ_i separately keeps its ``k = max(1, int(density · numel))``
   largest-magnitude entries and zeroes the rest (the Python ``int()`` truncation of the float product, as
   mergekit; ``density >= 1`` leaves τ unchanged; empty tensors stay empty). Ties in magnitude at the cut-off
   keep the entries with the lowest flat index. mergekit picks with ``torch.argsort(descending=True)``, which
   is not a stable sort, so its choice among equal magnitudes at the cut-off is unspecified (on CPU torch it
   differs from index order for tensors of >= ~100 entries); the two agree whenever no two kept/dropped
   entries tie exactly at the cut-off. The number of kept entries is always exactly ``k``.
2. **Weight**: ``τ̂_i = w_i · trim(τ_i)`` (weights are applied *after* trimming and *before* the election).
3. **Elect** (``sign_election=True``, mergekit ``consensus_method="sum"``): ``s = sign(Σ_i τ̂_i)`` with a
   mass of exactly 0 counting as ``+``; entry ``i`` agrees where ``sign(τ̂_i) == s``. Zero entries
   (trimmed, or unchanged) never agree (their sign is 0), so they are neither summed nor counted.
4. **Combine**: ``Δ = Σ_i agree_i · τ̂_i``; with ``normalize=True`` divide by ``Σ_i agree_i · w_i`` (the
   disjoint mean), where that divisor is exactly 0 (no entry agrees, e.g. every τ_i trimmed there) it is
   replaced by 1 (so Δ = 0 there). Without election all entries agree; the divisor is then ``Σ_i w_i``,
   replaced by 1 if ``|Σ_i w_i| < 1e-8``.
5. **Scale**: ``θ = θ_seed + λ · Δ``.

Flag mapping to mergekit (``merge_method`` + ``parameters``)::

    this class                     mergekit 0.1.5
    lam (config key "lambda")      parameters.lambda  (default 1.0)
    density (one for all experts)  per-model parameters.density (default 1.0)
    weights[i]                     per-model parameters.weight (ties requires it; use 1.0)
    normalize                      parameters.normalize (ties: True, task_arithmetic: False by default)
    sign_election=True             consensus_method "sum"   (merge_method ties)
    sign_election=False, density=1 merge_method task_arithmetic
    (not supported)                rescale (ties default False), int8_mask (mask dtype only), "count" consensus

Registered configurations: ``task_arithmetic`` (density 1, no election, normalize False) and — in
:mod:`baselines.ties` — ``ties`` (density 0.5, sign election, normalize True; mergekit's own default density
is 1.0, so always pass ``density`` explicitly when comparing). λ is chosen on validation data with
:func:`baselines.merge.select_lambda` when a grid is configured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from baselines.merge import ScaledMerge, register
from bts.core.io import BTSError


def trim_magnitude(tau: Tensor, density: float) -> Tensor:
    """Keep the ``k = max(1, int(density * numel))`` largest-|τ| entries of ``tau`` (ties at the cut-off:
    lowest flat index first), zero the rest. ``density >= 1`` returns ``tau`` itself."""
    if density >= 1:
        return tau
    if density <= 0 or tau.numel() == 0:
        return torch.zeros_like(tau)
    n = tau.numel()
    k = max(1, int(density * n))
    if k >= n:
        return tau
    mag = tau.abs().reshape(-1)
    # k-th largest magnitude = (n - k + 1)-th smallest; O(n) instead of a full sort.
    thr = torch.kthvalue(mag, n - k + 1).values
    above = mag > thr
    at = mag == thr
    need = k - int(above.sum())
    keep = above | (at & (torch.cumsum(at, 0) <= need))
    return tau * keep.reshape(tau.shape).to(tau.dtype)


def elect_sign_mask(weighted_deltas: Tensor) -> Tensor:
    """TIES sign election by total mass over dim 0: ``mask[i] = sign(τ̂_i) == sign(Σ_j τ̂_j)`` with a zero
    sum counting as ``+`` (mergekit ``get_mask(method="sum")``). Returned in the input's dtype."""
    majority = (weighted_deltas.sum(dim=0) >= 0).to(weighted_deltas.dtype) * 2 - 1
    return (weighted_deltas.sign() == majority).to(weighted_deltas.dtype)


@register("task_arithmetic")
class TaskArithmetic(ScaledMerge):
    """``θ_seed + λ · combine(w_i · trim(τ_i))``; see the module docstring for every convention."""

    def __init__(
        self,
        lam: float = 1.0,
        density: float = 1.0,
        sign_election: bool = False,
        normalize: bool = False,
    ) -> None:
        try:
            lam, density = float(lam), float(density)
        except (TypeError, ValueError):
            raise BTSError(f"lambda and density must be numbers, got {lam!r}, {density!r}") from None
        if not math.isfinite(lam):
            raise BTSError(f"lambda must be finite, got {lam}")
        if not (0 < density <= 1):
            raise BTSError(f"density must be in (0, 1], got {density}")
        self.lam = lam
        self.density = density
        self.sign_election = bool(sign_election)
        self.normalize = bool(normalize)

    def hyperparameters(self) -> dict:
        return {
            "lambda": self.lam,
            "density": self.density,
            "sign_election": self.sign_election,
            "normalize": self.normalize,
        }

    def delta_tensor(self, base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
        if not tensors:
            return torch.zeros_like(base)
        deltas = torch.stack([trim_magnitude(t - base, self.density) for t in tensors])
        w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
        w = w.reshape(-1, *([1] * base.dim()))
        deltas = deltas * w
        if self.sign_election:
            mask = elect_sign_mask(deltas)
            mixed = (deltas * mask).sum(dim=0)
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if self.normalize:
            mixed = mixed / divisor
        return mixed

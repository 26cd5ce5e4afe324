"""Model soup / weight averaging.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time", ICML 2022 (arXiv 2203.05482) — the uniform soup. Here the ingredients are the
seed and the experts branched from it (docs/design.md §2):

    θ = Σ_j w_j θ_j / Σ_j w_j,   j ∈ {seed, expert_1..expert_n},  w_j >= 0 (default: all 1 → uniform mean)

``weights`` has one entry per model **including the seed, seed first** (set the seed's weight to 0 to
average the experts only). It is computed as ``θ_seed + Σ_j (w_j / Σw) (θ_j − θ_seed)``, which is the same
mean mathematically and returns a model bit-for-bit when every ingredient is that model.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from baselines.merge import MergeMethod, register
from bts.core.io import BTSError


@register("soup")
class Soup(MergeMethod):
    """(Weighted, normalised) mean of the parameters of the seed and the experts."""

    weights_include_base = True

    def __init__(self) -> None:
        pass

    def check_weights(self, weights: Sequence[float] | None, n_models: int) -> list[float]:
        weights = super().check_weights(weights, n_models)
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise BTSError(f"soup: weights must be >= 0 with a positive sum, got {weights}")
        return weights

    def merge_tensor(self, base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
        total = float(sum(weights))
        out = base.clone()
        for w, t in zip(weights[1:], tensors):
            if w != 0:
                out += (t - base) * (w / total)
        return out

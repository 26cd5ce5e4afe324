"""Held-out perplexity per domain, accumulated with torchmetrics (docs/design.md §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, Metric


def token_nll(scores: torch.Tensor, input_ids: torch.LongTensor) -> torch.Tensor:
    """Per-token next-token negative log-likelihood ``[B, T-1]`` from scores ``[B, T, V]`` (logits or log-probs)."""
    logp = F.log_softmax(scores[:, :-1].float(), dim=-1)
    return -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


class DomainPerplexity(Metric):
    """exp(mean token NLL) over every token seen; one instance per domain."""

    full_state_update = False

    def __init__(self, **kw):
        super().__init__(**kw)
        self.mean_nll = MeanMetric()

    def update(self, nll: torch.Tensor) -> None:  # nll: [B, T-1]
        self.mean_nll.update(nll.detach().float().flatten())

    def compute(self) -> torch.Tensor:
        return torch.exp(self.mean_nll.compute())

    def reset(self) -> None:
        super().reset()
        self.mean_nll.reset()

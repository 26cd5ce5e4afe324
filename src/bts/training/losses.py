"""Next-token cross-entropy computed from the final hidden states and the LM head, one chunk of tokens at a time.

With a 49k vocabulary the ``[tokens, vocab]`` logits dominate a small model's training memory: at 64 × 512 tokens
they are 6.4 GB in float32, held from the forward to the backward, plus their gradient. ``linear_cross_entropy``
never holds them: for each chunk of ``chunk_tokens`` tokens it computes the logits (in the autocast dtype when
autocast is on, as the head's own forward would), the loss (in float32), and at once the gradients of the hidden
states and, if the head trains, of its weight (``softmax - onehot``, the closed form of the cross-entropy
gradient). Only those gradients are kept for the backward. Same value as ``F.cross_entropy(head(h).float(), y)``
up to summation order (tests/test_losses.py); nothing is recomputed.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_CHUNK_TOKENS = 4096


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    device = t.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if need_w else None
        acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 models
        total = torch.zeros((), dtype=acc, device=hidden.device)
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk):
                h = hidden[start:start + chunk].to(dtype)
                y = targets[start:start + chunk]
                logits = (h @ w.T).to(acc)  # [c, V]
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    grad[torch.arange(len(y), device=y.device), y] -= 1.0
                    grad = grad.to(dtype)
                    if need_h:
                        grad_h[start:start + chunk] = (grad @ w).to(hidden.dtype)
                    if need_w:
                        grad_w += (grad.T @ h).to(grad_w.dtype)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (need_h, need_w)
        ctx.n = n
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        need_h, need_w = ctx.has
        scale = grad_out / ctx.n
        grad_h = grad_w = None
        if need_h:
            g = next(saved)
            grad_h = g * scale.to(g.dtype)
        if need_w:
            grad_w = (next(saved) * scale).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``targets`` (``hidden [N, d]``, ``targets [N]``)
    without materialising the ``[N, V]`` logits (module docstring). ``head`` must be a bias-free linear map."""
    if getattr(head, "bias", None) is not None:
        raise ValueError("linear_cross_entropy: the head must have no bias")
    return _LinearCrossEntropy.apply(hidden, head.weight, targets, max(1, int(chunk_tokens)),
                                     _compute_dtype(hidden))

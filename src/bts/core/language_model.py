"""The one model interface that every evaluated method implements (dense, merges, BTM, routers, BTX/BAM, BTS).

A ``LanguageModel`` maps ``input_ids [B, T]`` to next-token scores ``[B, T, V]`` (logits or log-probabilities:
the suite only applies ``log_softmax``, which leaves log-probabilities unchanged) and can ``generate``.
Sequences are never padded: evaluation batches hold equal-length rows. A model may also score packed rows, a
shared context with several continuations (``forward_tree``, ``bts.core.tree_attention``); multiple-choice scoring
uses that where ``supports_tree_attention()`` says so.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from bts.core import tree_attention
from bts.core.tree_attention import TreeRows


@runtime_checkable
class LanguageModel(Protocol):
    def __call__(self, input_ids: torch.LongTensor) -> torch.Tensor:  # [B, T] -> [B, T, V]
        ...

    def generate(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:  # [B, T + new]
        ...


@torch.no_grad()
def greedy_or_sample_uncached(
    model: LanguageModel,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """Reference decoding loop that re-runs the full forward each step (for models without a KV cache)."""
    out = input_ids
    done = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
    for _ in range(max_new_tokens):
        scores = model(out)[:, -1, :].float()
        nxt = sample_next(scores, do_sample, temperature, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out = torch.cat([out, nxt[:, None]], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return out


def sample_next(
    scores: torch.Tensor, do_sample: bool, temperature: float, generator: torch.Generator | None
) -> torch.LongTensor:
    """Greedy argmax, or a sample from softmax(scores / temperature)."""
    if not do_sample:
        return scores.argmax(-1)
    probs = torch.softmax(scores / max(temperature, 1e-6), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class HFTreeAttention:
    """Packed rows (``bts.core.tree_attention``) for a wrapper whose ``model`` is a Hugging Face causal LM: the tree's
    4D mask, which the model takes as is, and its position ids. Token-wise blocks (MoE routers) see no packing."""

    model: nn.Module

    def forward_tree(self, input_ids: torch.LongTensor, tree: TreeRows) -> torch.Tensor:
        """Logits ``[B, T, V]`` of packed rows."""
        return tree_attention.hf_logits(self.model, input_ids, tree)

    def supports_tree_attention(self) -> bool:
        return tree_attention.supports(self.model.config)


class HFLanguageModel(HFTreeAttention, nn.Module):
    """A Hugging Face causal LM behind the ``LanguageModel`` interface (dense models and static merges)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        if do_sample and generator is not None:
            # HF generate has no generator argument; keep sampling reproducible through our own loop.
            return greedy_or_sample_uncached(self, input_ids, max_new_tokens, eos_token_id, True, temperature, generator)
        return self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_k=0 if do_sample else None,
            top_p=None,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id if eos_token_id is not None else 0,
        )

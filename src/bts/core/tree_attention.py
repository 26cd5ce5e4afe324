"""Tree attention: one row that packs a shared context and several continuations of it, each continuation seeing
the context and itself only (what a multiple-choice item needs: its candidates share the prompt).

A row's layout is given by ``position_ids [B, T]`` (each continuation restarts at the context's length, so its
tokens sit where they would in a row of their own) and ``visible [B, T, T]`` (``visible[b, t, s]``: position ``t``
attends to position ``s``; every ``s <= t``, and ``t`` itself always). A causal model then computes, at every
position, exactly the function it computes on that continuation's own row: the same tokens at the same positions
attended to, so the outputs agree up to floating-point round-off. Models that support it have
``forward_tree(input_ids, tree)`` (logits or log-probabilities ``[B, T, V]``) and ``supports_tree_attention()``.

Hugging Face attention takes a prepared 4D mask as is; its format depends on the attention implementation
(``sdpa``: boolean, True = attend; ``eager``: additive float). Flash and flex attention take no such mask, and a
sliding-window layer would need the window applied to the tree: those models are not supported (the caller scores
one row per continuation instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bts.core.hf_compat import layer_types
from bts.core.io import BTSError

SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class TreeRows:
    """The layout of packed rows (module docstring)."""

    position_ids: torch.Tensor
    """``[B, T]`` long: each token's position in its own (unpacked) sequence."""
    visible: torch.Tensor
    """``[B, T, T]`` bool: ``visible[b, t, s]`` when position ``t`` attends to position ``s``."""

    @classmethod
    def from_segments(cls, position_ids: torch.Tensor, segments: torch.Tensor) -> TreeRows:
        """Rows given by one segment id per token (``[B, T]``: 0 the shared context, ``k > 0`` continuation ``k``,
        -1 padding at a row's end): a position sees every earlier position of the context or of its own segment.
        (Padding sees the context and earlier padding; no real position comes after it, so none sees it.)"""
        t = segments.shape[-1]
        causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
        keys, queries = segments[:, None, :], segments[:, :, None]
        return cls(position_ids, causal & ((keys == 0) | (keys == queries)))

    def attention_mask(self, config, dtype: torch.dtype) -> torch.Tensor:
        """The 4D mask ``[B, 1, T, T]`` that ``config``'s attention implementation takes as is."""
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl == "sdpa":
            return self.visible[:, None]
        if impl == "eager":
            mask = torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device)
            return mask.masked_fill(~self.visible, torch.finfo(dtype).min)[:, None]
        raise ValueError(f"tree attention needs sdpa or eager attention, not {impl!r}")

    def predecessors(self) -> torch.Tensor:
        """``[B, T]`` long: for each position, the last position before it that it attends to (whose output
        predicts its token); -1 where there is none (a row's first token)."""
        t = self.visible.shape[-1]
        before = self.visible & torch.ones(t, t, dtype=torch.bool, device=self.visible.device).tril(-1)
        index = torch.arange(t, device=self.visible.device)
        return torch.where(before, index, -1).amax(dim=-1)


def hf_logits(model: torch.nn.Module, input_ids: torch.Tensor, tree: TreeRows) -> torch.Tensor:
    """A Hugging Face causal LM's logits ``[B, T, V]`` on packed rows: the 4D mask (taken as is) and positions."""
    mask = tree.attention_mask(model.config, next(model.parameters()).dtype)
    return model(input_ids=input_ids, attention_mask=mask, position_ids=tree.position_ids, use_cache=False).logits


def supports(config) -> bool:
    """Whether a model of ``config`` can run tree rows: sdpa or eager attention, every layer full attention."""
    if (getattr(config, "_attn_implementation", None) or "eager") not in SUPPORTED_IMPLEMENTATIONS:
        return False
    try:
        types = layer_types(config, config.num_hidden_layers)
    except BTSError:  # an unknown layer type: not supported here
        return False
    return all(t == "full_attention" for t in types)


def model_supports(model) -> bool:
    """Whether ``model`` (any ``LanguageModel``) can score tree rows."""
    check = getattr(model, "supports_tree_attention", None)
    return callable(getattr(model, "forward_tree", None)) and callable(check) and bool(check())

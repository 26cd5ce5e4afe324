"""The one place that knows how ``transformers`` 5.x releases differ, detected by signature, never by version.

Between 5.0 and the newest 5.x the layer-by-layer API that ``StitchedLM``, BAM adapters and BTM drive was renamed:

- the KV cache argument of decoder layers, ``model.forward`` and the mask functions is ``past_key_values`` up to
  5.17 and ``cache`` later (the mask functions of the later releases accept both); a layer whose ``forward`` takes
  ``**kwargs`` would swallow the wrong name silently and leave its cache unfilled, so the name is always read from
  the signature;
- the mask functions' ``inputs_embeds`` was ``input_embeds`` in some releases, and some take ``cache_position``;
- model outputs carry the cache as ``cache`` or ``past_key_values``;
- 5.2x loads Hub kernels by default (``use_kernels``; it then needs the ``kernels`` package, may download kernels
  from the Hub, and changes the numerics). The project turns them off unless ``BTS_HUB_KERNELS=1`` is set
  (``hub_kernels_enabled``; recorded in the ``env`` block of every ``metrics.json``).

Signatures are inspected once per function or class (``functools.cache``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

# the switch itself lives in bts.core.hub_kernels (readable without importing transformers); re-exported here
from bts.core.hub_kernels import HUB_KERNELS_ENV, hub_kernels_enabled  # noqa: F401
from bts.core.io import BTSError

MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


@functools.cache
def _parameters(fn: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def cache_keyword(fn: Callable) -> str:
    """The name under which ``fn`` (a decoder layer's or model's ``forward``, or a mask function) takes the KV cache."""
    names = _parameters(fn)
    if "cache" in names:
        return "cache"
    if "past_key_values" in names:
        return "past_key_values"
    raise BTSError(f"{getattr(fn, '__qualname__', fn)} takes neither 'cache' nor 'past_key_values': this transformers "
                   "release is not supported (transformers>=5,<6 is)")


def layer_forward(layer: torch.nn.Module) -> Callable:
    """The function whose signature a decoder layer's call follows (its class's ``forward``)."""
    return type(layer).forward


def layer_kwargs(layer: torch.nn.Module, *, attention_mask, position_embeddings, position_ids: torch.Tensor,
                 cache=None, use_cache: bool = False) -> dict:
    """Keyword arguments of one decoder-layer call, with the cache under the name this release uses."""
    return {"attention_mask": attention_mask, "position_embeddings": position_embeddings,
            "position_ids": position_ids, cache_keyword(layer_forward(layer)): cache, "use_cache": use_cache}


def model_cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """``{name: cache}`` for a whole model's ``forward`` (empty when ``cache`` is None: the model makes its own)."""
    return {} if cache is None else {cache_keyword(type(model).forward): cache}


def output_cache(output):
    """The KV cache a model's output carries, whichever attribute this release uses."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def mask_kwargs(fn: Callable, config, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache=None) -> dict:
    """Keyword arguments of a ``transformers.masking_utils`` mask function for rows without padding."""
    names = _parameters(fn)
    kw = {"config": config, "attention_mask": None, "position_ids": position_ids, cache_keyword(fn): cache}
    kw["inputs_embeds" if "inputs_embeds" in names else "input_embeds"] = inputs_embeds
    if "cache_position" in names:
        past = cache.get_seq_length() if cache is not None else 0
        kw["cache_position"] = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
    return {k: v for k, v in kw.items() if k in names}


def layer_types(config, num_layers: int) -> list[str]:
    """The attention type of each of the first ``num_layers`` layers (``full_attention`` / ``sliding_attention``)."""
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
        types = [kind] * num_layers
    unknown = sorted(set(types) - set(MASK_FUNCTIONS))
    if unknown:
        raise BTSError(f"unsupported attention layer types {unknown} in {type(config).__name__}")
    return list(types[:num_layers])


def causal_masks(config, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache=None,
                 types: Sequence[str] | None = None) -> list:
    """One attention mask per layer, as the HF decoder builds them (full causal, or a sliding window for the layers
    whose type asks for it); each distinct type is built once. No padding: rows are full sequences."""
    types = list(types) if types is not None else layer_types(config, config.num_hidden_layers)
    by_type = {t: MASK_FUNCTIONS[t](**mask_kwargs(MASK_FUNCTIONS[t], config, inputs_embeds, position_ids, cache))
               for t in dict.fromkeys(types)}
    return [by_type[t] for t in types]


def load_kwargs() -> dict:
    """Extra ``from_pretrained`` keywords every model load passes: Hub kernels off unless asked for."""
    return {"use_kernels": hub_kernels_enabled()}

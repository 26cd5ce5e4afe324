"""bts.core.hf_compat: the transformers 5.x differences, read from signatures. Fake layers and mask functions stand for
the releases not installed here; the masks are checked against what the installed transformers builds itself."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bts.core import hf_compat
from bts.core.io import BTSError
from conftest import tiny_llama


class LayerWithPastKeyValues(torch.nn.Module):
    """A decoder layer as in transformers 5.0-5.17: the cache is ``past_key_values``, extra keywords are swallowed."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, position_ids=None,
                past_key_values=None, use_cache=False, **kwargs):
        self.received = {"cache": past_key_values, "swallowed": sorted(kwargs)}
        return hidden_states


class LayerWithCache(torch.nn.Module):
    """A decoder layer as in the later 5.x releases: the cache is ``cache``."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, position_ids=None, cache=None,
                use_cache=False, **kwargs):
        self.received = {"cache": cache, "swallowed": sorted(kwargs)}
        return hidden_states


class LayerWithoutCache(torch.nn.Module):
    def forward(self, hidden_states, **kwargs):
        return hidden_states


def mask_fn_old(config, input_embeds, attention_mask, cache_position, past_key_values, position_ids=None):
    """The keywords of an early 5.x mask function."""


def mask_fn_new(config, inputs_embeds, attention_mask, cache=None, past_key_values=None, position_ids=None):
    """The keywords of a later 5.x mask function (it accepts both cache names)."""


class FakeCache:
    def __init__(self, length: int):
        self.length = length

    def get_seq_length(self) -> int:
        return self.length


@pytest.mark.parametrize("layer_cls, name", [(LayerWithPastKeyValues, "past_key_values"), (LayerWithCache, "cache")])
def test_layer_with_kwargs_gets_the_cache_under_its_own_name(layer_cls, name):
    layer, cache = layer_cls(), object()
    kw = hf_compat.layer_kwargs(layer, attention_mask=None, position_embeddings=None,
                                position_ids=torch.arange(3)[None], cache=cache, use_cache=True)
    assert name in kw and ({"cache", "past_key_values"} - {name}).isdisjoint(kw)
    layer(torch.zeros(1, 3, 4), **kw)
    # the cache arrived in the named parameter, not in **kwargs where the layer would ignore it
    assert layer.received == {"cache": cache, "swallowed": []}


def test_layer_taking_neither_name_is_one_error():
    with pytest.raises(BTSError, match="neither 'cache' nor 'past_key_values'"):
        hf_compat.layer_kwargs(LayerWithoutCache(), attention_mask=None, position_embeddings=None,
                               position_ids=torch.arange(2)[None])


def test_model_cache_kwargs_and_output_cache():
    cache = object()
    assert hf_compat.model_cache_kwargs(LayerWithCache(), None) == {}
    assert hf_compat.model_cache_kwargs(LayerWithCache(), cache) == {"cache": cache}
    assert hf_compat.model_cache_kwargs(LayerWithPastKeyValues(), cache) == {"past_key_values": cache}
    assert hf_compat.output_cache(SimpleNamespace(cache=cache)) is cache
    assert hf_compat.output_cache(SimpleNamespace(past_key_values=cache)) is cache
    assert hf_compat.output_cache(SimpleNamespace(cache=None, past_key_values=cache)) is cache
    assert hf_compat.output_cache(SimpleNamespace()) is None


def test_mask_kwargs_follow_each_signature():
    embeds, pos, cache = torch.zeros(2, 3, 8), torch.arange(5, 8)[None], FakeCache(5)
    old = hf_compat.mask_kwargs(mask_fn_old, "cfg", embeds, pos, cache)
    assert set(old) == {"config", "input_embeds", "attention_mask", "cache_position", "past_key_values",
                        "position_ids"}
    assert old["input_embeds"] is embeds and old["past_key_values"] is cache
    assert old["cache_position"].tolist() == [5, 6, 7]  # continues after the cached tokens
    assert hf_compat.mask_kwargs(mask_fn_old, "cfg", embeds, pos)["cache_position"].tolist() == [0, 1, 2]
    new = hf_compat.mask_kwargs(mask_fn_new, "cfg", embeds, pos, cache)
    assert set(new) == {"config", "inputs_embeds", "attention_mask", "cache", "position_ids"}
    assert new["cache"] is cache and new["attention_mask"] is None


def test_layer_types():
    assert hf_compat.layer_types(SimpleNamespace(), 3) == ["full_attention"] * 3
    assert hf_compat.layer_types(SimpleNamespace(sliding_window=4), 2) == ["sliding_attention"] * 2
    cfg = SimpleNamespace(layer_types=["full_attention", "sliding_attention", "full_attention"])
    assert hf_compat.layer_types(cfg, 2) == ["full_attention", "sliding_attention"]
    with pytest.raises(BTSError, match="unsupported attention layer types"):
        hf_compat.layer_types(SimpleNamespace(layer_types=["chunked_attention"]), 1)


def _qwen2_sliding():
    """Qwen2 with sliding-window attention on its last two layers (set before the model is built: the decoder
    decides at construction whether it builds sliding masks)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_sliding_window=True, sliding_window=4, max_window_layers=2,
                      layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"])
    return Qwen2ForCausalLM(cfg).eval()


def _same_mask(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


@pytest.mark.parametrize("family", ["llama", "qwen2_sliding"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_causal_masks_equal_what_the_model_builds(family, attn):
    """The masks StitchedLM hands each layer are the ones the HF decoder hands it (with and without a cache)."""
    from transformers import DynamicCache

    model = tiny_llama(0) if family == "llama" else _qwen2_sliding()
    model.config._attn_implementation = attn
    seen: list = []

    def grab(module, args, kwargs):
        seen.append(kwargs.get("attention_mask"))

    hooks = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers]
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for chunk, past in ((ids[:, :5], 0), (ids[:, 5:], 5)):
            seen.clear()
            embeds = model.model.embed_tokens(chunk)
            position_ids = torch.arange(past, past + chunk.shape[1])[None]
            ours = hf_compat.causal_masks(model.config, embeds, position_ids, cache)
            model(input_ids=chunk, use_cache=True, **hf_compat.model_cache_kwargs(model, cache))
            assert len(seen) == len(ours) == model.config.num_hidden_layers
            assert all(_same_mask(a, b) for a, b in zip(ours, seen)), f"{family}/{attn}: masks differ (past {past})"
            if attn == "eager":  # eager attention always gets a tensor: the comparison above is not vacuous
                assert all(isinstance(m, torch.Tensor) for m in ours)
    for h in hooks:
        h.remove()
    if family == "qwen2_sliding" and attn == "eager":
        assert not torch.equal(ours[0], ours[-1])  # full and sliding layers got different masks


@pytest.mark.parametrize("value, enabled", [(None, False), ("", False), ("0", False), ("no", False),
                                            ("1", True), ("true", True), (" YES ", True)])
def test_hub_kernels_follow_the_environment(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv(hf_compat.HUB_KERNELS_ENV, raising=False)
    else:
        monkeypatch.setenv(hf_compat.HUB_KERNELS_ENV, value)
    assert hf_compat.hub_kernels_enabled() is enabled
    assert hf_compat.load_kwargs() == {"use_kernels": enabled}


def test_load_kwargs_are_accepted_by_from_pretrained(tmp_path, monkeypatch):
    """Every model load passes ``use_kernels``: the installed transformers must take it (on CPU, off)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv(hf_compat.HUB_KERNELS_ENV, raising=False)
    tiny_llama(0).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, **hf_compat.load_kwargs())
    assert model.config.num_hidden_layers == 4

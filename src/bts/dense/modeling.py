"""Dense causal LMs: the tiny Llama-architecture seed, loading Hugging Face directories, and the decoder parts
that the stitched model and the upcycling baselines drive layer by layer.

transformers 5.x layout (Llama, Qwen2, Mistral): ``model.model.embed_tokens`` -> ``model.model.rotary_emb`` ->
``model.model.layers[i](h, attention_mask=..., position_embeddings=..., position_ids=..., cache=..., use_cache=...)``
(the cache keyword and mask functions differ across 5.x releases: ``bts.core.hf_compat``)
-> ``model.model.norm`` -> ``model.lm_head``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from bts.core import hf_compat
from bts.core.io import BTSError


@dataclass
class LlamaArch:
    """Architecture of a Llama-family decoder built from scratch (the seed of the embedded reproduction).

    Defaults are the tiny CPU seed: 8 layers, SwiGLU, RoPE, one KV head like the paper's 2.7B seed.
    """

    vocab_size: int = 2048
    """Vocabulary size; must equal the tokenizer's."""
    hidden_size: int = 64
    """Model width d."""
    intermediate_size: int = 192
    """SwiGLU FFN width."""
    num_hidden_layers: int = 8
    """Number of transformer layers L."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 1
    """KV heads (1 = multi-query attention, as the paper's seed)."""
    max_position_embeddings: int = 2048
    """Longest sequence RoPE is configured for."""
    rope_theta: float = 10000.0
    """RoPE base (the paper's 2.7B config uses 500k)."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share input embedding and LM head."""
    initializer_range: float = 0.02
    """Std of the normal weight init."""

    def to_hf_config(self, bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 0) -> LlamaConfig:
        kw = asdict(self)
        rope_theta = kw.pop("rope_theta")
        cfg = LlamaConfig(
            **kw,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        )
        return cfg


def build_llama(arch: LlamaArch, seed: int = 0, **special_ids) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM (seeded, fp32, eager-free SDPA attention)."""
    torch.manual_seed(seed)
    cfg = arch.to_hf_config(**special_ids)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or None): the GPU when there is one, else the CPU; any other name must be a torch device."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BTSError(f"unknown device {name!r} (auto, cpu, cuda, cuda:<n>)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BTSError(f"device {name!r} requested but no CUDA GPU is available (use auto or cpu)")
    return device


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a Hugging Face causal LM from a local directory (safetensors only; no remote code)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BTSError(f"not a Hugging Face model directory (no config.json): {path}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=False, use_safetensors=True, local_files_only=True,
            **hf_compat.load_kwargs(),
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # missing / truncated / corrupt weights
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BTSError(f"cannot load model from {path}: {first}") from None
    return model


@dataclass
class DecoderParts:
    """The pieces of a decoder-only HF model that are driven one layer at a time."""

    embed_tokens: nn.Module
    rotary_emb: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    config: object


def decoder_parts(model: PreTrainedModel) -> DecoderParts:
    """Reach the decoder parts of a Llama/Qwen2/Mistral-family causal LM, with a clear error otherwise."""
    inner = getattr(model, "model", None)
    missing = [
        name
        for name, owner in [("model", model), ("lm_head", model)]
        if not hasattr(owner, name)
    ]
    if inner is not None:
        missing += [n for n in ("embed_tokens", "rotary_emb", "layers", "norm") if not hasattr(inner, n)]
    if missing:
        raise BTSError(
            f"{type(model).__name__} is not a supported decoder (missing {', '.join(missing)}); "
            "expected the Llama/Qwen2/Mistral layout model.model.layers"
        )
    return DecoderParts(inner.embed_tokens, inner.rotary_emb, inner.layers, inner.norm, model.lm_head, model.config)


def check_tokenizer_fits(tokenizer, vocab_size: int, what: str = "model") -> None:
    """Refuse a tokenizer with more tokens than the model's embedding rows (its ids would index past them). A model
    vocabulary *larger* than the tokenizer is fine: checkpoints pad it (Qwen2.5: 151,936 rows, 151,665 tokens)."""
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise BTSError(
            f"{what} vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens (token ids "
            "would index past the embedding); use the tokenizer the models were trained with"
        )


def freeze(module: nn.Module) -> nn.Module:
    """Freeze every parameter and put the module in eval mode (its own dropout off)."""
    module.requires_grad_(False)
    module.eval()
    return module

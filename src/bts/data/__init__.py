"""Data layer of bts (docs/design.md §3): the four-domain corpus, the BPE tokenizer, mixtures and the datamodule.

* :mod:`bts.data.domains` — ``DOMAINS``, ``EXPERT_DOMAINS``, ``SPLITS``, ``default_cache_dir``;
* :mod:`bts.data.corpus` — ``load_split``, ``ensure_built``, ``DomainSource`` (embedded offline
  corpus built on first use, or a Hugging Face ``datasets`` source);
* :mod:`bts.data.tokenizer` — ``train_tokenizer``, ``load_tokenizer`` (byte-level BPE, pad/bos/eos = 0/1/2);
* :mod:`bts.data.mixtures` — ``PRESETS``, ``resolve_mixture``;
* :mod:`bts.data.datamodule` — ``DomainMixDataModule`` (packed sequences, per-domain eval loaders).

Every name is imported on first use (PEP 562), so that ``python -m bts.data.sources.math`` (the math generator
subprocess) does not pay for torch/lightning/transformers imports.
"""

from __future__ import annotations

_LAZY = {
    "DOMAINS": ".domains",
    "SPLITS": ".domains",
    "DomainSource": ".corpus",
    "default_cache_dir": ".domains",
    "ensure_built": ".corpus",
    "load_split": ".corpus",
    "manifest": ".corpus",
    "PRESETS": ".mixtures",
    "active_domains": ".mixtures",
    "resolve_mixture": ".mixtures",
    "EmbeddedConfig": ".sources",
    "DomainMixDataModule": ".datamodule",
    "pack_stream": ".datamodule",
    "blocks_of": ".datamodule",
    "train_plan": ".datamodule",
    "train_tokenizer": ".tokenizer",
    "load_tokenizer": ".tokenizer",
    "build_tokenizer": ".tokenizer",
    "tokenizer_fingerprint": ".tokenizer",
    "SPECIAL_TOKENS": ".tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DOMAINS",
    "PRESETS",
    "SPECIAL_TOKENS",
    "SPLITS",
    "DomainMixDataModule",
    "DomainSource",
    "EmbeddedConfig",
    "active_domains",
    "blocks_of",
    "build_tokenizer",
    "default_cache_dir",
    "ensure_built",
    "load_split",
    "load_tokenizer",
    "manifest",
    "pack_stream",
    "resolve_mixture",
    "tokenizer_fingerprint",
    "train_plan",
    "train_tokenizer",
]

"""A byte-level BPE tokenizer trained on the seed mixture, saved as a ``transformers`` fast tokenizer.

* Model: BPE over bytes (``tokenizers``), GPT-2 style pre-tokenization (``ByteLevel`` with its regex, no prefix
  space) after splitting digits into single characters (``Digits(individual_digits=True)``, as Llama does: it
  helps small models with arithmetic). No normaliser: ``decode(encode(text)) == text`` for any text, including
  code indentation/tabs, Hindi and Vietnamese (all 256 bytes are in the initial alphabet).
* Special tokens with fixed ids (the model configs rely on them): ``<|pad|>`` = 0, ``<|bos|>`` = 1,
  ``<|eos|>`` = 2. Encoding adds **no** special tokens (``tokenizer(text)["input_ids"]`` is the text only);
  documents are separated by EOS when sequences are packed (:mod:`bts.data.datamodule`).
* ``clean_up_tokenization_spaces=False`` (otherwise ``decode`` would rewrite ``" ."`` to ``"."``).
* ``vocab_size`` is an upper bound: on a tiny corpus BPE may run out of pairs seen ``min_frequency`` times and
  stop earlier (``len(tokenizer)`` is the real size; on the embedded corpus the 2048 default is reached).
* Training text: a deterministic sample of the *train* splits, ``sample_chars`` characters split over the domains
  by the mixture weights (default: the ``seed`` preset), documents drawn in a seeded random order.

``train_tokenizer`` reuses an existing tokenizer in ``out_dir`` when it was trained with the same parameters on
the same sample (``bts_tokenizer.json`` records them).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path

from bts.core.io import BTSError, atomic_dir, atomic_write_json

from .corpus import DomainSource, load_split
from .mixtures import resolve_mixture

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
META_FILE = "bts_tokenizer.json"
TOKENIZER_FORMAT = 1


def tokenizer_sample(mixture: str | Mapping[str, float] = "seed", sample_chars: int = 3_000_000, seed: int = 0,
                     cache_dir: str | os.PathLike | None = None, sources: Mapping | None = None,
                     corpus_config=None) -> list[str]:
    """Training texts for the tokenizer: per domain, ``weight * sample_chars`` characters of train documents."""
    weights = resolve_mixture(mixture)
    sources = dict(sources or {})
    texts: list[str] = []
    for domain, w in weights.items():
        if w <= 0:
            continue
        recs = load_split(domain, "train", cache_dir=cache_dir, source=DomainSource.coerce(sources.get(domain)),
                          config=corpus_config)
        order = list(range(len(recs)))
        random.Random(f"{seed}:{domain}").shuffle(order)
        budget, used = w * sample_chars, 0
        for i in order:
            if used >= budget:
                break
            texts.append(recs[i]["text"])
            used += len(recs[i]["text"])
    if not texts:
        raise BTSError("no training text for the tokenizer (all domains empty)")
    return texts


def build_tokenizer(texts, vocab_size: int = 2048, min_frequency: int = 2):
    """Train the byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise BTSError(f"vocab_size must be at least {len(alphabet) + len(SPECIAL_TOKENS)} (256 bytes + 3 special "
                       f"tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   clean_up_tokenization_spaces=False)


def _sample_sha256(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 2048, cache_dir: str | os.PathLike | None = None,
                    mixture: str | Mapping[str, float] = "seed", sample_chars: int = 3_000_000, seed: int = 0,
                    min_frequency: int = 2, sources: Mapping | None = None, corpus_config=None, force: bool = False):
    """Train (or reuse) the tokenizer and save it to ``out_dir``; returns the loaded ``PreTrainedTokenizerFast``.

    ``sources``: per-domain :class:`~bts.data.DomainSource` overrides; ``corpus_config``: embedded corpus build
    options (:class:`~bts.data.EmbeddedConfig` or a dict of its fields).
    """
    out_dir = Path(out_dir)
    texts = tokenizer_sample(mixture, sample_chars, seed, cache_dir, sources, corpus_config)
    meta = {
        "format": TOKENIZER_FORMAT,
        "vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "mixture": resolve_mixture(mixture),
        "sample_chars": sample_chars,
        "seed": seed,
        "sample_documents": len(texts),
        "sample_sha256": _sample_sha256(texts),
        "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
        "tokenizers": _version("tokenizers"),
    }
    if not force and (out_dir / META_FILE).is_file():
        try:
            old = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old is not None and {k: v for k, v in old.items() if k != "fingerprint"} == meta:
            try:
                tok = load_tokenizer(out_dir)
                if tokenizer_fingerprint(tok) == old.get("fingerprint"):
                    return tok
            except BTSError:
                pass
    tok = build_tokenizer(texts, vocab_size, min_frequency)
    meta["fingerprint"] = tokenizer_fingerprint(tok)
    with atomic_dir(out_dir) as tmp:
        tok.save_pretrained(str(tmp))
        atomic_write_json(tmp / META_FILE, meta)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike):
    """Load a saved fast tokenizer (this module's, or any ``transformers`` tokenizer directory)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise BTSError(f"no tokenizer at {path} (expected {path / 'tokenizer.json'}); train one with "
                       "bts.data.train_tokenizer")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise BTSError(f"tokenizer at {path} has no EOS token (needed to separate packed documents)")
    return tok


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's serialisation (vocab, merges, normaliser, pre-tokenizer, specials), ignoring the
    padding/truncation state that ``transformers`` toggles on the backend while encoding."""
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:  # pragma: no cover - slow tokenizers
        raise BTSError("only fast (tokenizers-backed) tokenizers are supported")
    state = json.loads(backend.to_str())
    state.pop("padding", None)
    state.pop("truncation", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def encode_batch(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (fast path through the Rust tokenizer)."""
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [tok.encode(t, add_special_tokens=False) for t in texts]  # pragma: no cover


def _version(dist: str) -> str:
    from .sources import package_version

    return package_version(dist)


def load_tokenizer_from(path: Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise BTSError(f"tokenizer directory not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BTSError(f"cannot load a tokenizer from {path} ({first}); pass --tokenizer DIR") from None

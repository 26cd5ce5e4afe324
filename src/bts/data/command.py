"""`bts data`: build (or check) the embedded corpus and optionally train the tokenizer; compare the corpus with the
reference digests (``--check-digests``) or write this Python version's entry of them (``--write-digests``, after an
intended change of a builder: ``bts.data.digests``)."""

from __future__ import annotations

import json
from pathlib import Path

from bts.core.io import TOKENIZER_META, atomic_write_json, check_output
from bts.data import digests
from bts.data.corpus import ensure_built, manifest
from bts.data.domains import DOMAINS


def _same_recipe(vocab_size: int):
    """An earlier ``bts data --tokenizer`` output of the same vocabulary size, which a rerun may reuse or rebuild;
    any other tokenizer (or model) in the directory is a trained artifact that only ``--force`` replaces."""
    def earlier(path: Path) -> bool:
        try:
            return json.loads((path / TOKENIZER_META).read_text(encoding="utf-8")).get("vocab_size") == vocab_size
        except (OSError, ValueError, AttributeError):
            return False
    return earlier


def data_command(cache_dir: str | None = None, domains: list[str] | None = None, force: bool = False,
                 tokenizer: str | None = None, vocab_size: int = 2048, show: bool = False,
                 check_digests: bool = False, write_digests: bool = False) -> int:
    """build or check the embedded corpus; optionally train the tokenizer

    Exit 1 when --check-digests finds a difference.

    Args:
        cache_dir: cache directory (default: $BTS_CACHE_DIR or ./.cache/bts)
        domains: domains to build (default: all four)
        tokenizer: also train the BPE tokenizer into this directory
        vocab_size: tokenizer vocabulary size
        show: print the manifest summary
        check_digests: compare the built corpus with the reference digests (exit 1 when they differ)
        write_digests: write this Python minor version's entry of the reference digests file from the built corpus
            (the other versions' entries are kept)
    """
    if tokenizer:  # checked before the corpus is built and the tokenizer trained
        check_output(tokenizer, "--tokenizer", force=force, earlier=_same_recipe(vocab_size))
    data_dir = ensure_built(cache_dir, domains=domains or list(DOMAINS), force=force)
    print(f"corpus ready: {data_dir}")
    if tokenizer:
        from bts.data.tokenizer import train_tokenizer

        train_tokenizer(tokenizer, vocab_size=vocab_size, cache_dir=cache_dir, force=force)
        print(f"tokenizer written: {tokenizer}")
    if show:
        print(json.dumps(manifest(cache_dir), indent=2)[:4000])
    if write_digests:
        atomic_write_json(digests.REFERENCE_FILE,
                          digests.with_entry(digests.make_reference(cache_dir), digests.load_references()))
        digests._load_file.cache_clear()
        print(f"wrote the Python {digests.python_minor()} entry of {digests.REFERENCE_FILE}")
    elif check_digests:
        result = digests.compare_to_reference(cache_dir)
        if result is None:
            print("nothing to compare (no reference file, or no corpus built)")
            return 0
        line = digests.warning_line(result)
        print(line or f"data: {', '.join(result['checked'])} match the Python {result['reference_python']} "
                      "reference digests")
        return 1 if line else 0
    return 0

"""The corpus's domains and splits, and where the built corpus lives: the one place that names them."""

from __future__ import annotations

import os
from pathlib import Path

from bts.core.io import BTSError

DOMAINS: tuple[str, ...] = ("general", "code", "math", "multilingual")
EXPERT_DOMAINS: tuple[str, ...] = ("code", "math", "multilingual")  # the domains experts are branched on
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}


def check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise BTSError(f"unknown domain {domain!r}; known domains: {', '.join(DOMAINS)}")
    return domain


def check_split(split: str) -> str:
    s = _SPLIT_ALIASES.get(split, split)
    if s not in SPLITS:
        raise BTSError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    return s


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$BTS_CACHE_DIR``, else ``./.cache/bts`` (relative to the working dir)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BTS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.cwd() / ".cache" / "bts"

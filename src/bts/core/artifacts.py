"""What kind of artifact a directory holds, and the loaders of each kind.

A Hugging Face directory (dense models, static merges) is kind ``"hf"``. Other artifacts carry an
``artifact.json`` naming their ``kind``; a loader for each kind is an entry point in the ``bts.artifacts`` group
(pyproject.toml), so ``bts`` never imports the package that defines it (``baselines``).
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

from bts.core.io import BTSError

HF_KIND = "hf"
"""``artifact_kind`` of a plain Hugging Face model directory (config.json, no artifact.json)."""


def artifact_loaders() -> dict:
    return {ep.name: ep for ep in entry_points(group="bts.artifacts")}


def artifact_kind(path: str | Path) -> str:
    """``"hf"`` for a Hugging Face model directory, else the ``kind`` its ``artifact.json`` names (one of the
    ``bts.artifacts`` entry points). Anything else is one ``BTSError`` line that lists what was expected."""
    path = Path(path)
    kinds = sorted(artifact_loaders())
    expected = ("expected a Hugging Face model directory (config.json) or an artifact directory whose artifact.json "
                f"names its kind ({', '.join(kinds)})")
    if not path.is_dir():
        raise BTSError(f"no model artifact at {path}: {expected}")
    meta_file = path / "artifact.json"
    if meta_file.is_file():
        try:
            kind = json.loads(meta_file.read_text(encoding="utf-8")).get("kind")
        except (ValueError, AttributeError):
            raise BTSError(f"{meta_file} is not a valid artifact.json: {expected}") from None
        if kind not in kinds:
            raise BTSError(f"{path}: unknown artifact kind {kind!r} in artifact.json (known: {', '.join(kinds)})")
        return kind
    if (path / "config.json").is_file():
        return HF_KIND
    raise BTSError(f"{path} is not a model artifact: {expected}")

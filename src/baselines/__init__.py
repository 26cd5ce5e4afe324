"""Baselines of the BTS paper (docs/design.md §2), built on top of the core ``bts`` package.

Expert merging (no training): model soup (:mod:`baselines.soup`), task arithmetic and TIES
(:mod:`baselines.task_arithmetic`, :mod:`baselines.ties`), and the BTM ensemble (:mod:`baselines.btm`).
Static merges share one interface and registry (:mod:`baselines.merge`); ``bts merge`` is
:func:`baselines.merge_command.main`.

``bts`` never imports ``baselines``; the dependency goes one way only.
"""

from __future__ import annotations

from pathlib import Path


def load_merge_output(path: str | Path):
    """Load what ``bts merge`` wrote: a merged HF model (``merge.json``) or a BTM ensemble (``btm.json``).

    Returns a ``LanguageModel`` with ``param_counts()``.
    """
    from bts.core.io import BTSError

    path = Path(path)
    if (path / "btm.json").is_file():
        from baselines.btm import BTMEnsemble

        return BTMEnsemble.from_dir(path)
    if (path / "merge.json").is_file():
        from baselines.merge import load_merged

        return load_merged(path)
    raise BTSError(f"not a bts merge output (no merge.json or btm.json): {path}")

"""The commands of the stitch package (``bts.cli.commands``): ``bts stitch-remove`` and ``bts ceiling``.

Only light imports at the top (the modules doing the work import torch): ``--help``, a usage error and an output
that cannot be written are answered in a fraction of a second, before anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from bts.core.io import BTSError, atomic_dir, atomic_write_json, check_output
from bts.data.domains import EXPERT_DOMAINS

STITCH_MANIFEST = "bts.json"  # bts.stitch.checkpoint.MANIFEST, not imported: that module imports torch


def is_removal_output(path: Path) -> bool:
    """A checkpoint written by ``bts stitch-remove`` (its manifest says what it was derived from), which a rerun
    may replace; a trained checkpoint (``bts fit``) has no ``derived_from.removed``."""
    try:
        manifest = json.loads((path / STITCH_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "removed" in (manifest.get("derived_from") or {})


def stitch_remove_command(ckpt: str, expert: str, out: str, force: bool = False) -> int:
    """remove an expert from a trained BTS checkpoint (modularity, paper §4.2)

    Its projection slice and gate rows are dropped from every stitch layer, everything else is reused unchanged;
    no model is loaded and nothing is retrained.

    Args:
        ckpt: trained stitch checkpoint directory (with bts.json)
        expert: name of the expert to remove (see bts.json)
        out: output directory for the new stitch checkpoint
    """
    check_output(out, "--out", force=force, earlier=is_removal_output, inputs=[ckpt])
    from bts.stitch.modularity import remove_expert_checkpoint

    written = remove_expert_checkpoint(ckpt, expert, out)
    print(f"wrote {written} (removed expert {expert!r})")
    return 0


def ceiling_command(runs: str = "runs/tiny", out: str | None = None, domains: str = ",".join(EXPERT_DOMAINS),
                    fit_blocks: int = 192, test_blocks: int = 128, max_iter: int = 300, seq_len: int = 128,
                    device: str = "cpu", force: bool = False) -> int:
    """the head-drift ceiling: can the hub's head read each expert's last hidden state?

    Writes <out>/ceiling.json (docs/design.md §7, bts.stitch.ceiling).

    Args:
        runs: run directory with seed/, tokenizer/, expert_<domain>/
        out: output directory (default: <runs>/ceiling)
        domains: comma-separated expert domains
        fit_blocks: validation blocks the map is fitted on
        test_blocks: held-out test blocks it is scored on
        max_iter: L-BFGS iterations at most (it stops earlier when the gradient norm falls under 1e-6)
        seq_len: block length in tokens
        device: torch device, or auto (the GPU when there is one)
    """
    names = tuple(d for d in domains.split(",") if d)
    if min(fit_blocks, test_blocks, max_iter) < 1 or seq_len < 2:
        raise BTSError("--fit-blocks, --test-blocks and --max-iter must be >= 1, --seq-len >= 2")
    target = check_output(out or Path(runs) / "ceiling", "--out", force=force,
                          earlier=lambda p: (p / "ceiling.json").is_file(), inputs=[runs])
    from bts.stitch.ceiling import measure

    result = measure(Path(runs), names, fit_blocks, test_blocks, seq_len=seq_len, max_iter=max_iter, device=device)
    with atomic_dir(target) as tmp:
        atomic_write_json(tmp / "ceiling.json", result)
    print(f"wrote {target}/ceiling.json")
    return 0

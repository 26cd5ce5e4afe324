"""Committed, hash-pinned checkpoints (e.g. ``checkpoints/tiny_seed``): a pretrained seed that the reproduction
starts from, as the paper starts from a given pretrained LM (docs/design.md §7).

A pinned checkpoint is a Hugging Face directory (safetensors weights, config, tokenizer) plus ``SHA256SUMS``
(``<sha256>  <file>`` per file, ``sha256sum -c`` compatible) and a ``README.md`` naming the command that
regenerates it. ``verify`` checks every listed file (and refuses unlisted weight files); ``install`` verifies and
copies the model into a run's ``seed/`` and the tokenizer files into its ``tokenizer/`` directory; ``publish``
writes a checkpoint from a trained run (``bts reproduce --profile seed_tiny``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from bts.core.io import TOKENIZER_FILES, TOKENIZER_META, BTSError, atomic_dir, atomic_write_text, sha256_file

SUMS = "SHA256SUMS"
PINNED_TOKENIZER_FILES = (*TOKENIZER_FILES, TOKENIZER_META)


def read_sums(ckpt: Path) -> dict[str, str]:
    path = Path(ckpt) / SUMS
    if not path.is_file():
        raise BTSError(f"{ckpt} is not a pinned checkpoint (no {SUMS}); regenerate it with the command in its README")
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, _, name = line.partition("  ")
            sums[name.strip()] = digest.strip()
    return sums


def verify(ckpt: str | Path) -> str:
    """Check every file of ``SHA256SUMS``; returns the checkpoint digest (sha256 of the SHA256SUMS text).
    One error line naming the first missing or differing file otherwise."""
    ckpt = Path(ckpt)
    sums = read_sums(ckpt)
    for name, digest in sums.items():
        f = ckpt / name
        if not f.is_file():
            raise BTSError(f"pinned checkpoint {ckpt}: {name} is missing")
        if sha256_file(f) != digest:
            raise BTSError(f"pinned checkpoint {ckpt}: {name} does not match its sha256 in {SUMS} (a changed or "
                           "corrupt file; restore it with git, or regenerate the checkpoint as its README says)")
    extra = [p.name for p in ckpt.glob("*.safetensors") if p.name not in sums]
    if extra:
        raise BTSError(f"pinned checkpoint {ckpt}: {extra[0]} is not listed in {SUMS}")
    return hashlib.sha256((ckpt / SUMS).read_bytes()).hexdigest()


def install(ckpt: str | Path, model_out: Path | None, tokenizer_out: Path | None = None) -> str:
    """Verify ``ckpt`` and copy it to ``model_out`` (and its tokenizer files to ``tokenizer_out``; either may be
    None); returns its digest."""
    ckpt = Path(ckpt)
    digest = verify(ckpt)
    if model_out is not None:
        with atomic_dir(model_out) as tmp:
            for n in read_sums(ckpt):
                shutil.copyfile(ckpt / n, tmp / n)
    if tokenizer_out is not None:
        with atomic_dir(tokenizer_out) as tmp:
            for n in PINNED_TOKENIZER_FILES:
                if (ckpt / n).is_file():
                    shutil.copyfile(ckpt / n, tmp / n)
    return digest


def publish(model_dir: Path, tokenizer_dir: Path, to: Path, command: str, note: str = "",
            config: Path | None = None, first_steps: dict | None = None) -> str:
    """Write the pinned checkpoint ``to`` from a trained model directory and its tokenizer directory (and the
    resolved training config it was made with, as ``training_config.yaml``)."""
    model_dir, tokenizer_dir, to = Path(model_dir), Path(tokenizer_dir), Path(to)
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    if not any(p.suffix == ".safetensors" for p in files):
        raise BTSError(f"{model_dir} holds no safetensors weights to publish")
    with atomic_dir(to) as tmp:
        for p in files:
            shutil.copyfile(p, tmp / p.name)
        for n in PINNED_TOKENIZER_FILES:
            if (tokenizer_dir / n).is_file() and not (tmp / n).exists():
                shutil.copyfile(tokenizer_dir / n, tmp / n)
        if config is not None:
            shutil.copyfile(config, tmp / "training_config.yaml")
        if first_steps is not None:
            atomic_write_text(tmp / FIRST_STEPS, json.dumps(first_steps, indent=1) + "\n")
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        sums = "".join(f"{sha256_file(tmp / n)}  {n}\n" for n in names)
        atomic_write_text(tmp / SUMS, sums)
        table = "\n".join(f"| `{n}` | `{line.split()[0]}` |" for n, line in zip(names, sums.splitlines()))
        atomic_write_text(tmp / "README.md", (
            f"# Pinned checkpoint `{to.name}`\n\n"
            f"Regenerate: `{command}` (then commit this folder). `bts reproduce` verifies every file below against\n"
            f"`{SUMS}` before it starts from this checkpoint, and refuses a changed file with one error line.\n\n"
            f"{note}\n\n| file | sha256 |\n|---|---|\n{table}\n"))
    return verify(to)


FIRST_STEPS = "first_steps.json"

"""One run root for a stage config: ``bts fit --config C --run_dir DIR`` (also validate/test/predict).

Every path of a config under its run root (``runs/<name>/...``: tokenizer, output_dir, default_root_dir, logger
save_dir, checkpoint dirpath, the seed and experts the stage builds on) is relocated under ``DIR``; the path-resolved
copy is written to ``DIR/configs/<config name>.yaml`` and that copy is what runs (``bts reproduce`` writes the same
copies to ``runs/<profile>/configs/<stage>.yaml``). Paths outside the run root (``/models/...``, ``/data/...``) are
kept.

Over one's own models, a stage config then needs only their paths, e.g.::

    bts fit --config configs/bts/tiny.yaml --run_dir runs/mine \\
        --model.init_args.hub /models/base --model.init_args.experts '[/models/code, /models/math]'

A ``tokenizer_dir`` under the run root that does not exist there is the hub's (``model.init_args.hub``, or
``init_from`` of an expert config): every model directory the project writes, and every Hugging Face checkpoint,
holds its tokenizer. The experts' names default to their directory names (``bts.stitch.model.default_expert_names``).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from bts.core.io import TOKENIZER_FILES, BTSError, atomic_write_text

RUN_ROOT = re.compile(r"(?<![\w./-])runs/[\w.-]+(?=/)")
"""A run root inside a config: ``runs/<name>`` followed by a path (``runs/tiny/seed`` → ``runs/tiny``)."""

HUB_KEYS = ("hub", "init_from")


def run_root(text: str) -> str | None:
    """The run root a config's paths live under: the most frequent ``runs/<name>`` outside comments."""
    lines = [ln.split("#", 1)[0] for ln in text.splitlines()]
    found = Counter(m.group(0) for ln in lines for m in RUN_ROOT.finditer(ln))
    return found.most_common(1)[0][0] if found else None


def relocate_text(text: str, run_dir: str | Path, root: str | None = None) -> str:
    """``text`` with every path under its run root (``root``, default ``run_root(text)``) moved under ``run_dir``."""
    root = root or run_root(text)
    if root is None:
        return text
    new = Path(run_dir).as_posix().rstrip("/")
    return re.sub(rf"(?<![\w./-]){re.escape(root)}/", f"{new}/", text)


def pop_run_dir(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--run_dir DIR`` / ``--run_dir=DIR``, and ``DIR`` (None when absent)."""
    out, run_dir, i = [], None, 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--run_dir":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise BTSError("--run_dir needs a directory")
            run_dir, i = argv[i + 1], i + 2
            continue
        if tok.startswith("--run_dir="):
            run_dir = tok.split("=", 1)[1]
            if not run_dir:
                raise BTSError("--run_dir needs a directory")
        else:
            out.append(tok)
        i += 1
    return out, run_dir


def _cli_value(argv: list[str], key: str) -> str | None:
    value = None
    for i, tok in enumerate(argv):
        if tok == f"--{key}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif tok.startswith(f"--{key}="):
            value = tok.split("=", 1)[1]
    return value


def _tokenizer_from_hub(text: str, argv: list[str], run_dir: str) -> str:
    """Point a ``tokenizer_dir`` under ``run_dir`` that does not exist at the hub's directory (see module doc)."""
    import yaml

    cfg = yaml.safe_load(text) or {}
    data = ((cfg.get("data") or {}).get("init_args") or {}) if isinstance(cfg, dict) else {}
    tok = _cli_value(argv, "data.init_args.tokenizer_dir") or data.get("tokenizer_dir")
    if not isinstance(tok, str) or Path(tok).exists() or not Path(tok).is_relative_to(Path(run_dir)):
        return text
    init = (cfg.get("model") or {}).get("init_args") or {}
    for key in HUB_KEYS:
        hub = _cli_value(argv, f"model.init_args.{key}") or init.get(key)
        if isinstance(hub, str) and any((Path(hub) / f).is_file() for f in TOKENIZER_FILES):
            note = f"  # --run_dir: {tok} does not exist; the tokenizer of model.init_args.{key}"
            return re.sub(rf"(tokenizer_dir:\s*){re.escape(tok)}\s*$", rf"\g<1>{hub}{note}", text,
                          flags=re.MULTILINE)
    return text


def apply_run_dir(argv: list[str]) -> list[str]:
    """A Lightning command line (subcommand first) with ``--run_dir DIR`` applied: each ``--config`` replaced by its
    path-resolved copy under ``DIR/configs/``."""
    argv, run_dir = pop_run_dir(argv)
    if run_dir is None:
        return argv
    if any(a in ("-h", "--help") for a in argv):
        return argv
    out, i, n = [], 0, 0
    while i < len(argv):
        tok = argv[i]
        path = None
        if tok == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 1
        elif tok.startswith("--config="):
            path = tok.split("=", 1)[1]
        if path is None:
            out.append(tok)
            i += 1
            continue
        src = Path(path)
        if not src.is_file():
            raise BTSError(f"config file not found: {src}")
        text = src.read_text(encoding="utf-8")
        if run_root(text) is None:  # an overlay without paths (e.g. only trainer settings) applies as it is
            out += ["--config", str(src)]
            i += 1
            continue
        text = _tokenizer_from_hub(relocate_text(text, run_dir), argv, run_dir)
        n += 1
        dest = Path(run_dir) / "configs" / (src.name if n == 1 else f"{src.stem}.{n}{src.suffix}")
        atomic_write_text(dest, f"# {src} with its run root relocated to {run_dir} (bts --run_dir)\n" + text)
        out += ["--config", str(dest)]
        i += 1
    if n == 0:
        raise BTSError("--run_dir relocates the paths under a run root (runs/<name>/...) of a --config file, and no "
                       "--config given has any; pass the stage config too")
    return out

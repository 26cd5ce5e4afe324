"""Atomic file output and content hashing shared by every stage.

Every artifact is written to a temporary file in the destination directory and renamed into place, so a
run killed at any point leaves either the old file or the new one, never a partial one. ``mkstemp``/``mkdtemp``
create them private (0600/0700); once complete they get the modes a plain ``open``/``mkdir`` would give under the
process umask (0644/0755 under umask 022), so colleagues on shared storage can read the artifacts.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `bts --help` and config errors stay fast
    import torch


class BTSError(Exception):
    """An error caused by the user's input or environment: the CLI prints it as one line and exits 2."""


class CommandParser(argparse.ArgumentParser):
    """``argparse`` for the project's subcommands: a usage error is a ``BTSError`` (one ``error:`` line naming the
    command, exit 2) instead of argparse's multi-line usage dump; ``--help`` is unchanged."""

    def error(self, message):
        raise BTSError(f"{self.prog}: {message}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as e:
        _raise_if_disk_full(e, path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` as a whole once the block succeeds."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        share_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        _raise_if_disk_full(e, path)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_tree(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes of normally created files and directories under the umask
    (writers such as safetensors and mkdtemp create them private); executables keep their x bits."""
    umask = current_umask()
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, (0o777 if os.stat(p).st_mode & 0o100 else 0o666) & ~umask)


def _raise_if_disk_full(e: OSError, path: Path) -> None:
    """A full disk (or quota) while writing ``path`` is an environment problem: one clear line, no traceback.
    The temporary file/directory is removed by the caller, so nothing partial is left behind."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise BTSError(f"no space left on device while writing {path} ({e.strerror or 'disk full'}); "
                       "free some space or point the output/cache elsewhere") from None


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""The files of a Hugging Face tokenizer directory (what is copied beside a model, and hashed in the env block)."""
TOKENIZER_META = "bts_tokenizer.json"
"""The project's record of how its tokenizer was trained (``bts.data.tokenizer``): travels with pinned checkpoints."""


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the Hugging Face tokenizer files present in ``src`` into ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that it can be written, with one clear error otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a directory" if blocker is not None else e.strerror
        raise BTSError(f"cannot create output directory {path}: {why}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BTSError(f"output directory {path} is not writable")
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (bit-exact identity of a weight)."""
    import torch

    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """One sha256 over all tensors of a state dict, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(tensor_sha256(state[key]).encode())
    return h.hexdigest()


def config_hash(obj) -> str:
    """Short stable hash of a JSON-serialisable config (used to decide whether a stage can be reused)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())[:16]


SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def _starts_like_legacy_torch_save(path: Path) -> bool:
    """torch.save's pre-1.6 format is a bare pickle stream: protocol 2+ opcode first."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def check_lightning_checkpoint(path: str | os.PathLike) -> dict | None:
    """Refuse, with one clear ``BTSError``, a Lightning checkpoint that is missing, truncated/corrupt, not a
    Lightning checkpoint, or that holds pickled objects other than tensors and plain containers (it is opened
    with ``torch.load(weights_only=True)``, memory-mapped, so nothing is executed and little is read). Returns the
    loaded checkpoint, so that a caller reading its entries loads it once.

    Sharded checkpoints (directories, e.g. FSDP/DeepSpeed) are left to Lightning (None)."""
    import pickle

    import torch

    path = Path(path)
    if path.is_dir():
        return None
    if not path.is_file():
        raise BTSError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path) and not _starts_like_legacy_torch_save(path):
        # a cut-off zip has no central directory: say so rather than pass torch's advice to unpickle it unsafely
        raise BTSError(f"checkpoint {path} is truncated or not a PyTorch checkpoint (no zip archive or pickle "
                       "inside); use another checkpoint, e.g. the previous one in its directory")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BTSError(f"refusing to load checkpoint {path}: it holds pickled objects that are not plain "
                       f"tensors/containers (loaded with weights_only=True: {first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BTSError(f"checkpoint {path} is truncated or corrupt ({first})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise BTSError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (a lock file) or fail at once with a clear message."""
    import fcntl

    path = Path(path)
    ensure_writable_dir(path.parent)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise BTSError(f"{what} is in use by {holder} (lock {path}); wait for it or use another directory") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield


def writable_target(path: str | os.PathLike, what: str) -> None:
    """Refuse ``path`` (a directory to be created or written) when its nearest existing ancestor is not a
    writable directory; nothing is left behind."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BTSError(f"cannot create output directory {path} ({what}): {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BTSError(f"output directory {probe} is not writable ({what}: {path})")
    try:  # root passes os.access everywhere, also on /proc or a read-only mount: try it for real
        os.rmdir(tempfile.mkdtemp(prefix=".bts-probe.", dir=probe))
    except OSError as e:
        raise BTSError(f"output directory {probe} is not writable ({what}: {path}): {e.strerror or e}") from None


FORCE_HELP = ("replace what is at the output even when it is not an earlier output of this command (e.g. a trained "
              "model), and redo work that would be reused")
"""The one meaning of ``--force`` in every project command (``check_output``)."""

_ARTIFACT_MARKERS = (("bts.json", "a BTS stitch checkpoint"), ("artifact.json", "a model artifact"),
                     ("config.json", "a model"), ("bts_tokenizer.json", "a trained tokenizer"),
                     ("tokenizer.json", "a tokenizer"), ("metrics.json", "results"))


def describe_dir(path: Path) -> str:
    """What an existing directory holds, for a refusal message (``a BTS stitch checkpoint (bts.json)``)."""
    for marker, what in _ARTIFACT_MARKERS:
        if (path / marker).is_file():
            return f"{what} ({marker})"
    return "files that are not an earlier output of this command"


def check_output(path: str | os.PathLike, what: str, *, force: bool = False,
                 earlier: Callable[[Path], bool] | None = None, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """The one rule for a command's output directory (issue 23, nothing lost), checked before any work starts.

    ``path`` must be creatable (its nearest existing ancestor a writable directory) and not one of ``inputs``. An
    existing non-empty directory is replaced only when ``earlier(path)`` says it is an earlier output of the same
    command (a rerun, e.g. a reproduce stage), or with ``--force`` (``FORCE_HELP``): never a trained model, a
    checkpoint or a tokenizer by accident. Nothing is created here; the output itself is written atomically.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise BTSError(f"{what} {path} is a file, not a directory")
    writable_target(out, what)
    resolved = out.resolve()
    for src in inputs:
        if src is not None and Path(src).resolve() == resolved:
            raise BTSError(f"{what} {path} is one of the inputs; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not force and not (earlier is not None and earlier(out)):
        raise BTSError(f"refusing to overwrite {path} ({what}): it holds {describe_dir(out)}; choose another "
                       "output or pass --force to replace it")
    return out


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """An output file (a JSON result, replaced atomically): not a directory, and its directory can be created and
    written. Checked before any work starts."""
    out = Path(path)
    if out.is_dir():
        raise BTSError(f"{what} {path} is a directory, not a file")
    writable_target(out.absolute().parent, what)
    return out

"""Atomic file output and content hashing shared by every stage.

Every artifact is written to a temporary file in the destination directory and renamed into place, so a
run killed at any point leaves either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch


class BTSError(Exception):
    """An error caused by the user's input or environment: the CLI prints it as one line and exits 2."""


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
        raise BTSError(f"cannot create output directory {path}: {e.strerror}") from None
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


def check_lightning_checkpoint(path: str | os.PathLike) -> None:
    """Refuse, with one clear ``BTSError``, a Lightning checkpoint that is missing, truncated/corrupt, not a
    Lightning checkpoint, or that holds pickled objects other than tensors and plain containers (it is opened
    with ``torch.load(weights_only=True)``, memory-mapped, so nothing is executed and little is read).

    Sharded checkpoints (directories, e.g. FSDP/DeepSpeed) are left to Lightning."""
    import pickle

    path = Path(path)
    if path.is_dir():
        return
    if not path.is_file():
        raise BTSError(f"checkpoint not found: {path}")
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

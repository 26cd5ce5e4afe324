"""What a reproduction ran on: the ``"env"`` block of ``metrics.json`` (issue "Reproducible across machines").

Two runs on one machine agree bit for bit; two machines may not. :func:`collect_env` records every input that can
make them differ, so that ``bts compare`` can say *which* inputs differ when numbers do:

* ``versions`` — the interpreter (the ``code`` and ``general`` domains are its standard library), torch,
  transformers, lightning, tokenizers, numpy, sympy, datasets, the packages that build the embedded data
  (mathematics-dataset, mwparserfromhell, polib) and the pinned data wheels (:data:`bts.data.sources.wheels.WHEELS`);
* ``machine`` — CPU model, the ISA flags that select float kernels (AVX2/AVX-512/AMX...), torch's thread count and
  kernel capability, the BLAS/oneDNN/MKL build, and the environment variables that override kernel choice;
* ``matmul_peak_gflops`` — measured fp32 matmul throughput (``matmul_peak``: its size, threads, repeats);
* ``data`` — sha256 of every embedded data split (from the cache manifests), ``data_reference`` — how they compare
  with the reference digests of the Python version that built them and with the committed results'
  (:mod:`bts.data.digests`);
* ``settings`` — switches of the project that change numerics: ``hub_kernels`` (``BTS_HUB_KERNELS``, see
  :func:`bts.core.hub_kernels.hub_kernels_enabled`);
* ``tokenizer`` and ``models`` — sha256 of the tokenizer directory and of each model / stitch checkpoint passed.

Everything is best effort: a piece that cannot be found becomes ``null``, and nothing here raises.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ENV_FORMAT = 1

# distributions whose versions are recorded (import names differ: lightning, mathematics_dataset, ...)
PACKAGES = ("torch", "transformers", "lightning", "tokenizers", "numpy", "sympy", "datasets", "safetensors",
            "mathematics-dataset", "mwparserfromhell", "polib")

# /proc/cpuinfo flags that select float kernels in MKL, oneDNN and ATen (x86); plus every amx_* flag present
KERNEL_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512dq", "avx512bw", "avx512vl",
                "avx512cd", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx512ifma")
# ARM: the vector extensions
ARM_FLAGS = ("asimd", "sve", "sve2", "bf16", "i8mm")

# environment variables that change which kernels run or how many threads they use
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "ONEDNN_MAX_CPU_ISA",
              "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
              "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG")

# JSON keys that name a place or a tool version rather than a model's content (dropped before hashing)
_VOLATILE_JSON_KEYS = frozenset({"transformers_version", "resolved_path", "output_dir", "root", "created",
                                 "created_at", "timestamp", "seconds", "wall_seconds"})
_MODEL_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".ckpt", ".npy")
_RUN_RECORDS = frozenset({"training.json", "eval.json", "merge.json"})


def _safe(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - never fail the reproduction over a missing detail
        return None


# ----------------------------------------------------------------------------------------------- versions
def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(),
                                  "python_implementation": sys.implementation.name,
                                  # which build of the interpreter: a distribution's python3 and a pyenv/python.org
                                  # build of the same version have different standard libraries (= code domain)
                                  "python_build": _safe(lambda: f"{' '.join(platform.python_build()[1].split())}; "
                                                                f"{platform.python_compiler()}"),
                                  "python_stdlib": _safe(lambda: __import__("sysconfig").get_paths()["stdlib"])}
    for dist in PACKAGES:
        out[dist] = _safe(_dist_version, dist)
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None:  # the exact build (e.g. 2.13.0+cpu): the dist metadata may lack the local part
        out["torch"] = getattr(torch_mod, "__version__", out["torch"])
    wheels = _safe(_wheel_versions) or {}
    out.update(wheels)
    return out


def _wheel_versions() -> dict[str, str]:
    from bts.data.sources.wheels import WHEELS

    return {f"wheel:{key}": spec.version for key, spec in sorted(WHEELS.items())}


# ------------------------------------------------------------------------------------------------ machine
def _cpuinfo() -> dict:
    """``{"cpu": model name, "cpu_flags": [...]}`` from /proc/cpuinfo (first processor); ``{}`` elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key in ("model name", "cpu model", "hardware"):
            model = value.strip()
        elif flags is None and key in ("flags", "features"):
            flags = set(value.split())
        if model is not None and flags is not None:
            break
    out: dict = {"cpu": model}
    if flags is not None:
        wanted = [f for f in KERNEL_FLAGS + ARM_FLAGS if f in flags]
        wanted += sorted(f for f in flags if f.startswith("amx"))
        out["cpu_flags"] = wanted
    return out


def torch_build() -> dict[str, str] | None:
    """The BLAS / oneDNN / MKL / OpenMP lines of ``torch.__config__.show()``, compact."""
    import torch

    text = torch.__config__.show()
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip().lstrip("- ").strip()
        low = line.lower()
        if "math kernel library" in low:
            out["mkl"] = line.replace("Intel(R) oneAPI Math Kernel Library Version ", "").split(" for ")[0]
        elif "mkl-dnn" in low or "onednn" in low:
            out["onednn"] = line.split(" v", 1)[-1] if " v" in line else line
        elif low.startswith("openmp"):
            out["openmp"] = line.split(" ", 1)[-1].split(" (")[0]
        elif low.startswith("cpu capability usage"):
            out["capability_usage"] = line.split(":", 1)[-1].strip()
        elif low.startswith("build settings"):
            settings = dict(kv.strip().split("=", 1) for kv in line.split(":", 1)[-1].split(", ") if "=" in kv)
            for k in ("BLAS_INFO", "LAPACK_INFO", "USE_MKL", "USE_MKLDNN", "USE_OPENMP", "TORCH_VERSION"):
                if k in settings:
                    out[k.lower()] = settings[k].strip()
    par = _safe(torch.__config__.parallel_info) or ""
    for line in par.splitlines():
        if line.startswith("ATen parallel backend"):
            out["parallel_backend"] = line.split(":", 1)[-1].strip()
    return out


def machine() -> dict:
    out: dict = {"cpu": None, "cpu_flags": None}
    out.update(_safe(_cpuinfo) or {})
    out["arch"] = platform.machine() or None
    out["system"] = f"{platform.system()} {platform.release()}".strip() or None
    out["cores"] = os.cpu_count()
    out["cores_usable"] = _safe(lambda: len(os.sched_getaffinity(0)))
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        out["torch_interop_threads"] = _safe(torch.get_num_interop_threads)
        out["cpu_capability"] = _safe(torch.backends.cpu.get_cpu_capability)
        out["torch_build"] = _safe(torch_build)
    except Exception:  # noqa: BLE001
        out.update({"torch_threads": None, "cpu_capability": None, "torch_build": None})
    out["kernel_env"] = {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}
    return out


def matmul_peak(size: int = 1024, budget_s: float = 0.6, max_repeats: int = 20) -> dict | None:
    """Best fp32 ``size x size`` matmul throughput (GFLOP/s) with the current thread count, ~``budget_s`` s."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g)
    b = torch.randn(size, size, generator=g)
    torch.mm(a, b)  # warm-up (first call allocates / selects kernels)
    flops = 2.0 * size ** 3
    best = float("inf")
    n = 0
    t_end = time.perf_counter() + budget_s
    while n < max_repeats and (n < 3 or time.perf_counter() < t_end):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
        n += 1
    return {"gflops": round(flops / best / 1e9, 1), "size": size, "dtype": "float32",
            "threads": torch.get_num_threads(), "repeats": n}


# ----------------------------------------------------------------------------------------------- hashing
def _canonical_json_bytes(path: Path) -> bytes:
    """A JSON file without keys that name places/tool versions (see ``_VOLATILE_JSON_KEYS``), key-sorted; the raw
    bytes when it does not parse."""
    raw = path.read_bytes()
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw

    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in _VOLATILE_JSON_KEYS}
        if isinstance(o, list):
            return [strip(v) for v in o]
        if isinstance(o, str) and os.path.isabs(o):
            return "<abs>/" + Path(o).name
        return o

    return json.dumps(strip(obj), sort_keys=True, ensure_ascii=False).encode("utf-8")


def dir_sha256(path: str | os.PathLike, suffixes: tuple[str, ...] = _MODEL_SUFFIXES,
               names: tuple[str, ...] | None = None) -> dict | None:
    """Content hash of a model directory (or one file): ``{"sha256", "weights_sha256", "files"}``.

    Files are taken recursively in sorted relative-path order (``names``: only those names, else every file with
    one of ``suffixes``); JSON files are hashed canonically (volatile keys dropped, see
    ``_canonical_json_bytes``) so that the clone location or the ``transformers`` version in ``config.json``
    does not change the hash; ``weights_sha256`` covers the weight files (``*.safetensors``, ``*.bin``, ``*.pt``,
    ``*.ckpt``) only. ``None`` when ``path`` does not exist."""
    from bts.core.io import sha256_bytes, sha256_file

    path = Path(path)
    if path.is_file():
        sha = sha256_file(path)
        return {"sha256": sha, "weights_sha256": sha, "files": 1}
    if not path.is_dir():
        return None
    files = []
    for p in path.rglob("*"):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        if p.name in _RUN_RECORDS:  # what a run measured (wall times, metrics), not what the model is
            continue
        if names is not None:
            if p.name in names:
                files.append(p)
        elif p.name.endswith(suffixes):
            files.append(p)
    files.sort(key=lambda p: p.relative_to(path).as_posix())
    h, hw = hashlib.sha256(), hashlib.sha256()
    n_weights = 0
    for p in files:
        rel = p.relative_to(path).as_posix()
        sha = sha256_bytes(_canonical_json_bytes(p)) if p.suffix == ".json" else sha256_file(p)
        h.update(f"{rel}\0{sha}\n".encode())
        if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt"):
            hw.update(f"{rel}\0{sha}\n".encode())
            n_weights += 1
    return {"sha256": h.hexdigest(), "weights_sha256": hw.hexdigest() if n_weights else None, "files": len(files)}


def tokenizer_hash(tokenizer_dir: str | os.PathLike) -> dict | None:
    """sha256 over the tokenizer files (:data:`bts.core.io.TOKENIZER_FILES`) plus the fingerprint recorded by
    :func:`bts.data.tokenizer.train_tokenizer` (vocab + merges + pre-tokenizer, independent of file layout)."""
    from bts.core.io import TOKENIZER_FILES, sha256_file

    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return None
    out = dir_sha256(tokenizer_dir, names=TOKENIZER_FILES) or {}
    out.pop("weights_sha256", None)
    out["tokenizer_json_sha256"] = _safe(sha256_file, tokenizer_dir / "tokenizer.json")
    meta = _safe(lambda: json.loads((tokenizer_dir / "bts_tokenizer.json").read_text(encoding="utf-8"))) or {}
    out["fingerprint"] = meta.get("fingerprint")
    out["sample_sha256"] = meta.get("sample_sha256")
    return out


def data_digests(cache_dir: str | os.PathLike | None = None) -> dict[str, str] | None:
    """``{"<domain>/<split>.jsonl": sha256}`` of the built embedded corpus, from its manifests (``None`` when
    nothing is built). The cache is found as the data layer finds it (argument, ``$BTS_CACHE_DIR``, ``./.cache/bts``)."""
    from bts.data.digests import current_digests

    return current_digests(cache_dir) or None


def data_reference(cache_dir: str | os.PathLike | None = None) -> dict | None:
    """Which built splits differ from the committed reference digests, and the likely cause."""
    from bts.data.digests import compare_to_reference

    return compare_to_reference(cache_dir)


def settings() -> dict:
    """The project's switches that change what runs: Hub kernels (off unless ``BTS_HUB_KERNELS=1``)."""
    from bts.core.hub_kernels import hub_kernels_enabled

    return {"hub_kernels": hub_kernels_enabled()}


def git_commit() -> str:
    """The project's commit (``git rev-parse HEAD`` in the working directory), or ``"unknown"``."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------ collect
def collect_env(models: Mapping[str, str | os.PathLike] | None = None, tokenizer_dir: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None, measure_peak: bool = True) -> dict:
    """The ``"env"`` block of ``metrics.json`` (see the module docstring). Never raises; missing pieces are None.

    ``models``: ``{name: model directory, stitch checkpoint directory or checkpoint file}``; ``tokenizer_dir``: the
    tokenizer directory; ``cache_dir``: the data cache (default: the data layer's); ``measure_peak``: time fp32
    matmuls (~0.6 s)."""
    t0 = time.perf_counter()
    env: dict = {"format": ENV_FORMAT}
    env["versions"] = _safe(versions)
    env["machine"] = _safe(machine)
    env["settings"] = _safe(settings)
    peak = _safe(matmul_peak) if measure_peak else None
    env["matmul_peak_gflops"] = peak["gflops"] if peak else None
    env["matmul_peak"] = peak
    env["data"] = _safe(data_digests, cache_dir)
    env["data_reference"] = _safe(data_reference, cache_dir)
    env["tokenizer"] = _safe(tokenizer_hash, tokenizer_dir) if tokenizer_dir is not None else None
    env["models"] = {name: _safe(dir_sha256, path) for name, path in (models or {}).items()} or None
    env["collect_seconds"] = round(time.perf_counter() - t0, 2)
    return env


# ----------------------------------------------------------------------------------------------- markdown
def _short(sha: str | None, n: int = 12) -> str:
    return sha[:n] if isinstance(sha, str) else "—"


def env_markdown(env: Mapping | None, heading: bool = True) -> str:
    """A compact "Environment" section for ``results/<profile>/README.md`` (``heading``: start with
    ``## Environment``)."""
    head = ["## Environment", ""] if heading else []
    if not env:
        return "\n".join(head + ["Not recorded (metrics.json has no \"env\" block)."]) + "\n"
    v = env.get("versions") or {}
    m = env.get("machine") or {}
    lines = list(head)
    lines.append("Recorded by `bts.pipeline.env.collect_env`; `bts compare NEW --against OLD` lists which of these differ when "
                 "numbers do. Float kernels depend on the CPU (ISA flags below): another CPU may change a training "
                 "run's last bits; that is recorded here, it cannot be pinned.")
    lines.append("")
    keys = ("python", "torch", "transformers", "lightning", "tokenizers", "numpy", "sympy", "datasets",
            "mathematics-dataset", "mwparserfromhell", "polib")
    lines.append("Versions: " + ", ".join(f"{k} {v.get(k) or '—'}" for k in keys) + ".")
    if v.get("python_stdlib"):
        lines.append(f"Interpreter: {v.get('python_build') or '—'}; standard library `{v['python_stdlib']}`.")
    wheels = [f"{k.split(':', 1)[1]} {val}" for k, val in v.items() if k.startswith("wheel:")]
    if wheels:
        lines.append(f"Data wheels: {', '.join(wheels)}.")
    lines.append("")
    tb = m.get("torch_build") or {}
    flags = m.get("cpu_flags")
    lines.append(f"Machine: {m.get('cpu') or '—'} ({m.get('arch') or '?'}, {m.get('cores') or '?'} cores); "
                 f"ISA: {' '.join(flags) if flags else '—'}; torch threads {m.get('torch_threads') or '—'}, "
                 f"kernels {m.get('cpu_capability') or '—'}; BLAS {tb.get('blas_info', '—')}, "
                 f"MKL {tb.get('mkl', '—')}, oneDNN {tb.get('onednn', '—')}.")
    if m.get("kernel_env"):
        lines.append("Kernel environment: " + ", ".join(f"`{k}={val}`" for k, val in m["kernel_env"].items()) + ".")
    hub = (env.get("settings") or {}).get("hub_kernels")
    if hub is not None:
        lines.append(f"Hub kernels: {'on' if hub else 'off'} (`BTS_HUB_KERNELS`; docs/compatibility.md).")
    peak = env.get("matmul_peak") or {}
    if env.get("matmul_peak_gflops") is not None:
        lines.append(f"fp32 matmul peak: {env['matmul_peak_gflops']} GFLOP/s ({peak.get('size')}x{peak.get('size')}, "
                     f"{peak.get('threads')} thread(s)).")
    lines.append("")
    data = env.get("data")
    if data:
        by_domain: dict[str, dict[str, str]] = {}
        for k, sha in data.items():
            dom, _, split = k.partition("/")
            by_domain.setdefault(dom, {})[split.removesuffix(".jsonl")] = sha
        lines += ["| data (sha256) | train | val | test |", "|---|---|---|---|"]
        lines += [f"| {dom} | " + " | ".join(f"`{_short(s.get(x))}`" for x in ("train", "val", "test")) + " |"
                  for dom, s in by_domain.items()]
        ref = env.get("data_reference") or {}
        if ref.get("differs"):
            lines.append("")
            lines.append(f"**Differs from the reference digests:** {', '.join(ref['differs'])} — {ref.get('cause')}")
        elif ref.get("differs_from_results"):
            from bts.data.digests import warning_line

            lines.append("")
            lines.append(f"**Built by another Python version than the committed results:** "
                         f"{(warning_line(dict(ref)) or '').removeprefix('data: ')}")
        elif ref:
            lines.append("")
            lines.append("All data splits match the committed reference digests (`src/bts/data/reference_digests.json`).")
        lines.append("")
    tok = env.get("tokenizer")
    if tok:
        lines.append(f"Tokenizer: files `{_short(tok.get('sha256'))}`, fingerprint `{_short(tok.get('fingerprint'))}`.")
    models = env.get("models") or {}
    if models:
        lines.append("Models (weights sha256): " + ", ".join(
            f"{name} `{_short((h or {}).get('weights_sha256') or (h or {}).get('sha256'))}`"
            for name, h in models.items()) + ".")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - a debugging aid: python -m bts.pipeline.env
    import argparse

    p = argparse.ArgumentParser(prog="python -m bts.pipeline.env", description="Print the env block (JSON) or its Markdown.")
    p.add_argument("--tokenizer-dir")
    p.add_argument("--cache-dir")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--no-peak", action="store_true")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    models = dict(m.split("=", 1) for m in a.model)
    env = collect_env(models, a.tokenizer_dir, a.cache_dir, measure_peak=not a.no_peak)
    print(env_markdown(env) if a.markdown else json.dumps(env, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

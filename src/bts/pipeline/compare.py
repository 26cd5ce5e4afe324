"""`bts compare NEW --against OLD`: do a reproduction's numbers match the committed ones, and if not, which inputs differ?

NEW and OLD are a results directory holding ``metrics.json`` or a ``metrics.json`` path; OLD may also be
``git:REV`` (``git show REV:<NEW's path>/metrics.json``; the default is ``git:HEAD`` when NEW is inside a git
repository), e.g. after ``make reproduce`` on a fresh clone: ``bts compare results/tiny``.

The report has two parts:

* **inputs that differ** — the keys of the two ``"env"`` blocks (:mod:`bts.pipeline.env`: versions, CPU model and ISA flags,
  torch threads/kernels/BLAS build, settings such as Hub kernels, data split sha256s, tokenizer and model hashes)
  whose values differ, side by side (measurements such as the matmul peak are shown, not compared). When the
  interpreter differs, the code/general corpus splits it builds differ with it: the report says so in one line
  and the summary names the Python versions in their place (:func:`explain_data`);
* **the largest metric differences** — every number in ``methods``/``ablations`` ``ppl``, ``switch_ppl`` and
  ``tasks``, judged against OLD's uncertainty: its 95 % CI (``ppl_ci``/``switch_ppl_ci``/``tasks_ci``:
  ``{name: [lo, hi]}``) where recorded, else
  ``value ± 1.96 × <name>_std`` (the seed std of a multi-seed run), else a 2 % relative tolerance. The score is
  ``|new - old|`` over the band's half-width on that side: above 1 means outside.

Exit 0 when every metric lies inside its band; otherwise the report is followed by ONE line
``error: N of M metrics outside the committed 95 % CI (largest: ...); differing inputs: ...`` and exit 1 (a result,
not bad input). Bad input (a missing file, unreadable JSON, an unknown git revision) is exit 2.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from bts.core.io import BTSError, atomic_write_json, check_output_file

Z95 = 1.959963984540054
REL_TOLERANCE = 0.02
GROUPS = (("ppl", "ppl_ci"), ("switch_ppl", "switch_ppl_ci"), ("tasks", "tasks_ci"))
SECTIONS = ("methods", "ablations")

# env keys that are measurements or bookkeeping, not inputs: shown (peak) or ignored, never counted as differing
_NOT_INPUTS = ("format", "collect_seconds", "matmul_peak_gflops", "matmul_peak", "data_reference",
               "machine.cores_usable", "machine.system", "machine.torch_interop_threads", "tokenizer.files",
               "tokenizer.sample_sha256", "tokenizer.tokenizer_json_sha256")

# inputs recorded only from some version on, with the value every run before it had: an OLD block without them is
# compared as if it recorded that value (Hub kernels were never on in a CPU run before they became a setting)
_VALUE_BEFORE_RECORDED = {"settings.hub_kernels": "False"}
# the corpus domains built from the interpreter's standard library (bts.data.digests)
_STDLIB_DOMAINS = ("code", "general")


# ---------------------------------------------------------------------------------------------- loading
def _metrics_path(arg: str | Path) -> Path:
    p = Path(arg)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise BTSError(f"no metrics.json at {p}" if p.name == "metrics.json" else f"no such file: {p}")
    return p


def _parse(text: str, where: str) -> dict:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise BTSError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(obj, dict) or not any(isinstance(obj.get(s), dict) for s in SECTIONS):
        raise BTSError(f"{where} is not a bts metrics.json (no 'methods' or 'ablations')")
    return obj


def _git_toplevel(path: Path) -> Path | None:
    try:
        out = subprocess.run(["git", "-C", str(path.parent.resolve()), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(out.stdout.strip()).resolve() if out.returncode == 0 and out.stdout.strip() else None


def load_new(arg: str) -> tuple[dict, Path]:
    path = _metrics_path(arg)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BTSError(f"cannot read {path}: {e.strerror}") from None
    return _parse(text, str(path)), path


def load_old(against: str | None, new_path: Path) -> tuple[dict, str]:
    """OLD's metrics and a label for it (``git:REV`` resolves NEW's path in REV)."""
    if against is None or against.startswith("git:"):
        rev = (against or "git:HEAD")[4:] or "HEAD"
        top = _git_toplevel(new_path)
        if top is None:
            raise BTSError(f"{new_path} is not inside a git repository: pass --against OLD (a results directory or "
                           "a metrics.json)")
        rel = new_path.resolve().relative_to(top).as_posix()
        spec = f"{rev}:{rel}"
        try:
            out = subprocess.run(["git", "-C", str(top), "show", spec], capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BTSError(f"git show {spec} failed: {e}") from None
        if out.returncode != 0:
            msg = out.stderr.decode("utf-8", "replace").strip().splitlines()
            raise BTSError(f"git show {spec} failed: {msg[0] if msg else f'exit {out.returncode}'}")
        return _parse(out.stdout.decode("utf-8"), f"git:{spec}"), f"git:{spec}"
    path = _metrics_path(against)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BTSError(f"cannot read {path}: {e.strerror}") from None
    return _parse(text, str(path)), str(path)


# ----------------------------------------------------------------------------------------------- inputs
def flatten_env(env: Mapping | None) -> dict[str, str]:
    """Dotted keys of the env block's leaves (lists joined by spaces, None as None), without non-input keys."""
    out: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if prefix and any(prefix == k or prefix.startswith(k + ".") for k in _NOT_INPUTS):
            return
        # a model is compared by its weights: its directory hash also covers run records (training.json with its
        # wall times), which differ between identical runs
        if prefix.startswith("models.") and prefix.rsplit(".", 1)[-1] in ("sha256", "files"):
            return
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple)):
            out[prefix] = " ".join(map(str, node))
        else:
            out[prefix] = None if node is None else str(node)

    walk(env or {}, "")
    return out


def compare_inputs(new_env: Mapping | None, old_env: Mapping | None) -> dict:
    """``{"differs": {key: [new, old]}, "compared": n, "new_has_env", "old_has_env"}``."""
    res = {"new_has_env": bool(new_env), "old_has_env": bool(old_env), "differs": {}, "compared": 0}
    if not new_env or not old_env:
        return res
    a, b = ({**_VALUE_BEFORE_RECORDED, **flatten_env(env)} for env in (new_env, old_env))
    keys = sorted(set(a) | set(b))
    res["compared"] = len(keys)
    res["differs"] = {k: [a.get(k), b.get(k)] for k in keys if a.get(k) != b.get(k)}
    return res


def explain_data(inputs: dict, new_env: Mapping | None, old_env: Mapping | None) -> dict | None:
    """Why corpus splits differ, when the interpreter does: the code and general domains are built from its standard
    library, so another Python version (or build) gives other splits there. ``None`` when no split differs or the
    interpreter is the same; else ``{"text": one phrase, "keys": the inputs it explains, "splits": [...],
    "new_reference": the reference NEW's splits match, or None}``."""
    differs = inputs.get("differs") or {}
    splits = [k.removeprefix("data.") for k in differs if k.startswith("data.")]
    python_keys = [k for k in differs if k in ("versions.python", "versions.python_build", "versions.python_stdlib")]
    if not splits or not python_keys:
        return None
    explained = [s for s in splits if s.split("/", 1)[0] in _STDLIB_DOMAINS]
    if not explained:
        return None
    new_py, old_py = (((env or {}).get("versions") or {}).get("python") for env in (new_env, old_env))
    if new_py != old_py:
        what = f"Python {new_py} vs {old_py}"
    else:
        what = f"another build of Python {new_py} (its standard library differs)"
    domains = "/".join(dict.fromkeys(s.split("/", 1)[0] for s in explained))
    ref = (new_env or {}).get("data_reference") or {}
    new_reference = None
    if ref.get("reference_python") and ref.get("matches") and not any(
            s in (ref.get("differs") or []) for s in explained):
        new_reference = ref["reference_python"]
    return {"text": f"{what} (the {domains} corpus splits differ with it)", "keys": python_keys
            + [f"data.{s}" for s in explained], "splits": explained, "domains": domains, "what": what,
            "new_reference": new_reference}


# ----------------------------------------------------------------------------------------------- metrics
def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def iter_metrics(metrics: Mapping) -> Iterator[tuple[str, str, str, str, float]]:
    """``(section, method, group, name, value)`` for every number in ``ppl``/``switch_ppl``/``tasks`` (``*_std``
    excluded)."""
    for section in SECTIONS:
        for method, entry in (metrics.get(section) or {}).items():
            if not isinstance(entry, Mapping):
                continue
            for group, _ in GROUPS:
                for name, v in (entry.get(group) or {}).items():
                    if name.endswith("_std") or not _is_num(v):
                        continue
                    yield section, method, group, name, float(v)


def _band(entry: Mapping, group: str, ci_key: str, name: str, old: float) -> tuple[float, float, str]:
    ci = (entry.get(ci_key) or {}).get(name)
    if (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_num(x) and math.isfinite(x) for x in ci)):
        lo, hi = float(min(ci)), float(max(ci))
        return min(lo, old), max(hi, old), "ci"
    std = (entry.get(group) or {}).get(f"{name}_std")
    if _is_num(std) and math.isfinite(std):
        h = Z95 * abs(float(std))
        return old - h, old + h, "std"
    h = REL_TOLERANCE * abs(old)
    return old - h, old + h, "tol"


def _score(new: float, old: float, lo: float, hi: float) -> float:
    if math.isnan(new) or math.isnan(old):
        return 0.0 if math.isnan(new) and math.isnan(old) else math.inf
    if new == old:
        return 0.0
    h = (hi - old) if new > old else (old - lo)
    return abs(new - old) / h if h > 0 else math.inf


def metric_label(group: str, name: str) -> str:
    if group == "switch_ppl":
        return f"{name} switch ppl"
    return f"{name} ppl" if group == "ppl" else name


def compare_metrics(new: Mapping, old: Mapping) -> dict:
    """Every common metric with its band, score and status; plus the metrics found on one side only."""
    old_vals = {(s, m, g, n): v for s, m, g, n, v in iter_metrics(old)}
    new_vals = {(s, m, g, n): v for s, m, g, n, v in iter_metrics(new)}
    rows = []
    for key, nv in new_vals.items():
        if key not in old_vals:
            continue
        section, method, group, name = key
        ov = old_vals[key]
        ci_key = dict(GROUPS)[group]
        lo, hi, basis = _band(old[section][method], group, ci_key, name, ov)
        score = _score(nv, ov, lo, hi)
        rows.append({"section": section, "method": method, "group": group, "metric": name, "new": nv, "old": ov,
                     "band": [lo, hi], "basis": basis, "score": score, "outside": score > 1.0,
                     "rel_diff": (nv - ov) / abs(ov) if ov else (0.0 if nv == ov else math.inf)})
    rows.sort(key=lambda r: (-r["score"] if not math.isnan(r["score"]) else 0.0, r["method"], r["metric"]))

    def fmt(k: tuple) -> str:
        return f"{k[1]} {metric_label(k[2], k[3])}"

    return {
        "rows": rows,
        "total": len(rows),
        "outside": sum(r["outside"] for r in rows),
        "bases": {b: sum(r["basis"] == b for r in rows) for b in ("ci", "std", "tol")},
        "missing_in_new": sorted(fmt(k) for k in old_vals if k not in new_vals),
        "only_in_new": sorted(fmt(k) for k in new_vals if k not in old_vals),
    }


# ------------------------------------------------------------------------------------------------ report
def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return str(x)
    return f"{x:.2f}" if abs(x) >= 1 or x == 0 else f"{x:.3g}"


def _val(v: str | None, width: int = 28) -> str:
    if v is None:
        return "—"
    if len(v) == 64 and all(c in "0123456789abcdef" for c in v):  # a sha256
        return v[:12]
    return v if len(v) <= width else v[: width - 1] + "…"


def _inputs_summary(inputs: dict, limit: int = 8, data: dict | None = None) -> str:
    """The differing inputs in a phrase; ``data`` (:func:`explain_data`) names the interpreter first, in place of the
    corpus splits it explains."""
    if not inputs["new_has_env"] or not inputs["old_has_env"]:
        side = "OLD" if not inputs["old_has_env"] else "NEW"
        return f"unknown ({side} has no env block)"
    keys = list(inputs["differs"])
    if not keys:
        return "none"
    if data:
        keys = [data["text"]] + [k for k in keys if k not in data["keys"]]
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def render(result: dict, top: int = 15) -> str:
    lines = [f"bts compare: {result['new']} against {result['old']}", ""]
    if result.get("profile_note"):
        lines += [result["profile_note"], ""]
    inputs = result["inputs"]
    if not inputs["new_has_env"] or not inputs["old_has_env"]:
        lines.append(f"Inputs: {_inputs_summary(inputs)}: which inputs differ cannot be told; record it with "
                     "bts.pipeline.env.collect_env (the \"env\" block of metrics.json).")
    elif not inputs["differs"]:
        lines.append(f"Inputs: all {inputs['compared']} recorded inputs are the same.")
    else:
        lines.append(f"Inputs that differ ({len(inputs['differs'])} of {inputs['compared']} recorded):")
        w = max(len(k) for k in inputs["differs"])
        lines.append(f"  {'input':<{w}}  {'new':<28}  old")
        for k, (a, b) in inputs["differs"].items():
            lines.append(f"  {k:<{w}}  {_val(a):<28}  {_val(b)}")
    data = result.get("data_explained")
    if data:
        n = len(data["splits"])
        line = (f"Corpus: {n} {data['domains']} split{'s' if n != 1 else ''} differ because the interpreter does "
                f"({data['what']}): the code and general domains are built from its standard library")
        if data["new_reference"]:
            line += f"; NEW's match the Python {data['new_reference']} reference digests"
        lines.append(line + ".")
    peaks = result.get("matmul_peak_gflops") or {}
    if any(v is not None for v in peaks.values()):
        lines.append(f"fp32 matmul peak (measured, not compared): new {peaks.get('new')} GFLOP/s, "
                     f"old {peaks.get('old')} GFLOP/s")
    lines.append("")
    m = result["metrics"]
    b = m["bases"]
    lines.append(f"Metrics: {m['outside']} of {m['total']} outside OLD's band (band: 95 % CI for {b['ci']}, "
                 f"value ± 1.96 seed std for {b['std']}, ± {REL_TOLERANCE * 100:g} % for {b['tol']}); largest differences:")
    rows = [r for r in m["rows"] if r["score"] != 0][:top]
    if not any(r["score"] != 0 for r in m["rows"]):
        lines.append("  (every metric is identical)")
    if rows:
        wm = max([len("method")] + [len(r["method"]) for r in rows])
        wk = max([len("metric")] + [len(metric_label(r["group"], r["metric"])) for r in rows])
        lines.append(f"  {'method':<{wm}}  {'metric':<{wk}}  {'new':>9}  {'old':>9}  {'rel':>7}  {'band':<21}  basis  "
                     "score")
        for r in rows:
            band = f"[{_num(r['band'][0])}, {_num(r['band'][1])}]"
            rel = f"{r['rel_diff']:+.1%}" if math.isfinite(r["rel_diff"]) else "inf"
            score = f"{r['score']:.2f}" if math.isfinite(r["score"]) else "inf"
            lines.append(f"  {r['method']:<{wm}}  {metric_label(r['group'], r['metric']):<{wk}}  {_num(r['new']):>9}  "
                         f"{_num(r['old']):>9}  {rel:>7}  {band:<21}  {r['basis']:<5}  {score}"
                         + ("  OUTSIDE" if r["outside"] else ""))
    for what in ("missing_in_new", "only_in_new"):
        if m[what]:
            shown = ", ".join(m[what][:6]) + (f" and {len(m[what]) - 6} more" if len(m[what]) > 6 else "")
            lines.append(f"{'In OLD only' if what == 'missing_in_new' else 'In NEW only'} (not compared): {shown}")
    return "\n".join(lines) + "\n"


def error_line(result: dict) -> str | None:
    m = result["metrics"]
    if m["outside"] == 0:
        return None
    r = next(r for r in m["rows"] if r["outside"])
    return (f"error: {m['outside']} of {m['total']} metrics outside the committed 95 % CI (largest: {r['method']} "
            f"{metric_label(r['group'], r['metric'])} {_num(r['new'])} vs {_num(r['old'])} "
            f"[{_num(r['band'][0])}, {_num(r['band'][1])}]); differing inputs: "
            f"{_inputs_summary(result['inputs'], data=result.get('data_explained'))}")


def compare(new: Mapping, old: Mapping, new_label: str = "NEW", old_label: str = "OLD") -> dict:
    """The full comparison (what ``--json`` writes)."""
    metrics = compare_metrics(new, old)
    if metrics["total"] == 0:
        raise BTSError(f"{new_label} and {old_label} have no metric in common (methods/ablations ppl and tasks)")
    result = {
        "new": new_label,
        "old": old_label,
        "profile_note": None,
        "inputs": compare_inputs(new.get("env"), old.get("env")),
        "data_explained": None,
        "matmul_peak_gflops": {"new": (new.get("env") or {}).get("matmul_peak_gflops"),
                               "old": (old.get("env") or {}).get("matmul_peak_gflops")},
        "metrics": metrics,
    }
    result["data_explained"] = explain_data(result["inputs"], new.get("env"), old.get("env"))
    if new.get("profile") != old.get("profile"):
        result["profile_note"] = (f"Note: profiles differ (new {new.get('profile')!r}, old {old.get('profile')!r}): "
                                  "the runs had different configurations.")
    if new.get("seeds") != old.get("seeds"):
        note = f"Note: seeds differ (new {new.get('seeds')}, old {old.get('seeds')})."
        result["profile_note"] = f"{result['profile_note']}\n{note}" if result["profile_note"] else note
    result["ok"] = metrics["outside"] == 0
    return result


def _json_safe(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_json_safe(v) for v in o]
    return o


def compare_command(new: str, /, against: str | None = None, top: int = 15, json_: str | None = None) -> int:
    """do a reproduction's numbers match the committed ones, and if not, which inputs differ?

    Compares a reproduction's metrics.json with committed ones: which inputs (versions, CPU, data, tokenizer,
    models) differ, and which metrics fall outside the committed 95 % CI (else ± 1.96 seed std, else ± 2 %).
    Exit 0: all inside; 1: some outside; 2: bad input.

    Args:
        new: results directory holding metrics.json, or a metrics.json
        against: results directory, metrics.json, or git:REV (NEW's path in revision REV; default git:HEAD when NEW
            is inside a git repository)
        top: metric rows shown
        json_: also write the full comparison as JSON to this file
    """
    if top < 0:
        raise BTSError("--top must be >= 0")
    if json_:
        check_output_file(json_, "--json")
    new_metrics, new_path = load_new(new)
    old, old_label = load_old(against, new_path)
    result = compare(new_metrics, old, str(new_path), old_label)
    if json_:
        atomic_write_json(json_, _json_safe(result))
    sys.stdout.write(render(result, top))
    sys.stdout.flush()
    line = error_line(result)
    if line is None:
        print(f"ok: all {result['metrics']['total']} metrics inside the committed 95 % CI (or tolerance); "
              f"differing inputs: {_inputs_summary(result['inputs'], data=result.get('data_explained'))}")
        return 0
    print(line, file=sys.stderr)
    return 1

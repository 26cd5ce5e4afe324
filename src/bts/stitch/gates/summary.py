"""Summaries of gate traces (paper §4.3): mean gate per model per domain and E2H layer, whether each expert's gate
is higher on its own domain's prompts than overall (the specialisation claim), per-segment means of the
context-switching prompts, and the markdown table of the results README."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bts.core.io import BTSError


def expert_domain(name: str, domains: Sequence[str]) -> str | None:
    """The domain an expert is named after (``math`` or ``expert_math`` → ``math``), else ``None``."""
    for d in domains:
        if name in (d, f"expert_{d}", f"expert-{d}"):
            return d
    return None


def own_domain_flags(domain_means: Mapping[str, Mapping[str, float]], overall: Mapping[str, float],
                     expert_names: Sequence[str]) -> dict[str, dict]:
    """For every expert named after a domain in ``domain_means``: ``{"domain", "own_domain_mean",
    "overall_mean", "margin" (own - overall), "exceeds" (own > overall)}`` — the paper's §4.3 claim."""
    out = {}
    for name in expert_names:
        d = expert_domain(name, list(domain_means))
        if d is None:
            continue
        own, ovr = float(domain_means[d][name]), float(overall[name])
        out[name] = {"domain": d, "own_domain_mean": own, "overall_mean": ovr, "margin": own - ovr,
                     "exceeds": bool(own > ovr)}
    return out


def _as_dict(names: Sequence[str], values) -> dict[str, float]:
    return {n: float(v) for n, v in zip(names, values)}


def summarize(domain_traces: Mapping[str, Sequence[dict]], switch_traces: Sequence[dict] = (),
              switches: Sequence[dict] = ()) -> dict:
    """Mean gates from ``gate_trace`` results: ``domain_traces = {domain: [trace, ...]}``; optional context-switching
    traces with their prompts (``switch_prompts``) add per-segment means.

    Keys: ``names``, ``hub``, ``experts``, ``e2h_layers`` (after-layer of each E2H layer), ``last_e2h_layer``,
    ``domains`` (per domain: ``n_prompts``, ``n_tokens``, ``mean_gate`` = last E2H layer, ``per_layer`` = list
    aligned with ``e2h_layers``), ``overall`` (same, over all domain prompts), ``specialization`` (last layer,
    ``own_domain_flags``), ``specialization_per_layer``, ``claim_holds`` (every expert named after a domain exceeds;
    ``None`` when no expert is), ``switch`` (per prompt: type, order, n_tokens, boundaries, segments with
    ``mean_gate``), ``markdown``.
    """
    first = next((ts[0] for ts in domain_traces.values() if ts), None)
    if first is None:
        raise BTSError("no traces to summarise")
    names, after = list(first["names"]), list(first["after_layers"])
    n_layers = len(after)
    domains: dict[str, dict] = {}
    all_prompt_means = []  # [P, L, n+1]
    for domain, traces in domain_traces.items():
        if not traces:
            continue
        pm = np.stack([np.stack([layer.mean(axis=0) for layer in t["layers"]]) for t in traces])  # [K, L, n+1]
        all_prompt_means.append(pm)
        mean = pm.mean(axis=0)  # [L, n+1]
        domains[domain] = {
            "n_prompts": len(traces),
            "n_tokens": int(sum(t["layers"][0].shape[0] for t in traces)),
            "mean_gate": _as_dict(names, mean[-1]),
            "per_layer": [{"after_layer": a, "mean_gate": _as_dict(names, mean[li])} for li, a in enumerate(after)],
        }
    overall_arr = np.concatenate(all_prompt_means).mean(axis=0)  # [L, n+1]
    overall = {
        "n_prompts": int(sum(len(p) for p in all_prompt_means)),
        "mean_gate": _as_dict(names, overall_arr[-1]),
        "per_layer": [{"after_layer": a, "mean_gate": _as_dict(names, overall_arr[li])} for li, a in enumerate(after)],
    }
    spec = own_domain_flags({d: v["mean_gate"] for d, v in domains.items()}, overall["mean_gate"], names[1:])
    spec_layers = [
        {"after_layer": a, "flags": own_domain_flags(
            {d: v["per_layer"][li]["mean_gate"] for d, v in domains.items()},
            overall["per_layer"][li]["mean_gate"], names[1:])}
        for li, a in enumerate(after)
    ]
    switch = []
    for prompt, trace in zip(switches, switch_traces):
        last = trace["last"]
        switch.append({
            "type": prompt.get("type", ">".join(prompt["order"])),
            "order": list(prompt["order"]),
            "n_tokens": int(last.shape[0]),
            "boundaries": list(prompt["boundaries"]),
            "segments": [dict(s, mean_gate=_as_dict(names, last[s["start"]:s["end"]].mean(axis=0)))
                         for s in prompt["segments"]],
        })
    summary = {
        "names": names,
        "hub": names[0],
        "experts": names[1:],
        "e2h_layers": after,
        "last_e2h_layer": after[-1],
        "n_e2h_layers": n_layers,
        "domains": domains,
        "overall": overall,
        "specialization": spec,
        "specialization_per_layer": spec_layers,
        "claim_holds": all(v["exceeds"] for v in spec.values()) if spec else None,
        "switch": switch,
        # per prompt, last E2H layer: {domain: [[gate of each model] per prompt]} (bootstrap CIs of the gate claims)
        "prompt_gates": {d: pm[:, -1, :].tolist() for d, pm in zip(
            [d for d, ts in domain_traces.items() if ts], all_prompt_means)},
    }
    summary["markdown"] = markdown_table(summary)
    return summary


def markdown_table(summary: Mapping[str, Any]) -> str:
    """Mean gate per model (columns) per domain (rows) of the last E2H layer, the overall row, and one line per
    expert on whether its own-domain mean exceeds its overall mean."""
    names = summary["names"]
    lines = [
        (
            "Mean E2H gate weight per model (last E2H layer, after transformer layer "
            f"{summary['last_e2h_layer']}; each row sums to 1)."
        ),
        "",
        "| prompts | " + " | ".join(f"{n} (hub)" if i == 0 else n for i, n in enumerate(names)) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for d, v in summary["domains"].items():
        cells = []
        own = [n for n in names[1:] if expert_domain(n, [d]) == d]
        for n in names:
            text = f"{v['mean_gate'][n]:.4f}"
            cells.append(f"**{text}**" if n in own else text)
        lines.append(f"| {d} ({v['n_prompts']}) | " + " | ".join(cells) + " |")
    ov = summary["overall"]
    lines.append(f"| all ({ov['n_prompts']}) | " + " | ".join(f"{ov['mean_gate'][n]:.4f}" for n in names) + " |")
    if summary["specialization"]:
        lines.append("")
        parts = [f"{n}: {'yes' if s['exceeds'] else 'no'} ({s['own_domain_mean']:.4f} on {s['domain']} vs "
                 f"{s['overall_mean']:.4f} overall)" for n, s in summary["specialization"].items()]
        lines.append("Own-domain mean gate > overall mean gate (bold cells): " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"

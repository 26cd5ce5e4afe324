"""``analyze``: trace, summarise, plot and save the gates of a trained BTS model (``bts.stitch.gates``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import bts.data
from bts.core.artifacts import artifact_kind
from bts.core.io import BTSError, atomic_write_json
from bts.data.domains import DOMAINS
from bts.stitch.gates.figures import (
    domain_figure,
    log_to_tensorboard,
    save_png,
    summary_figure,
    switch_figure,
)
from bts.stitch.gates.prompts import GATE_SWITCH_TYPES, domain_prompts, switch_prompts
from bts.stitch.gates.summary import summarize
from bts.stitch.gates.trace import gate_trace

FORMAT = "bts-gates"
VERSION = 2


def _load_model(ckpt_or_model, device: str | None, allow_changed_models: bool):
    # transformers, under the models: imported when one is loaded, so that `bts gates --help` stays fast
    from bts.stitch.model import StitchedLM

    if isinstance(ckpt_or_model, StitchedLM):
        return ckpt_or_model, None
    if not isinstance(ckpt_or_model, (str, os.PathLike)):
        raise BTSError(f"expected a StitchedLM or a stitch checkpoint directory, got {type(ckpt_or_model).__name__}")
    from bts.dense.modeling import resolve_device
    from bts.stitch.checkpoint import load_stitched

    device = resolve_device(device)  # a bad or missing device is refused before the models load
    ckpt = Path(ckpt_or_model)
    if not ckpt.is_dir():
        raise BTSError(f"stitch checkpoint directory not found: {ckpt}")
    kind = artifact_kind(ckpt)
    if kind != "bts":
        what = "a Hugging Face model directory" if kind == "hf" else f"a {kind!r} artifact"
        raise BTSError(f"{ckpt} is {what}: gate analysis needs a BTS stitch checkpoint (artifact.json kind 'bts', "
                       "e.g. runs/<profile>/bts); evaluate other artifacts with bts eval --model DIR")
    model = load_stitched(ckpt, allow_changed_models=allow_changed_models)
    return model.to(device), str(ckpt)


def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        if not Path(tokenizer).is_dir():
            raise BTSError(f"tokenizer directory not found: {tokenizer}")
        return bts.data.load_tokenizer(tokenizer)
    return tokenizer


def _load_records(domains: Sequence[str], cache_dir) -> dict[str, list[dict]]:
    return {d: bts.data.load_split(d, "test", cache_dir=cache_dir) for d in domains}


def _check_out(out_dir: Path) -> None:
    for p in (out_dir, out_dir / "figures"):
        if p.exists() and not p.is_dir():
            raise BTSError(f"output path exists and is not a directory: {p}")
    if (out_dir / "gates.json").is_dir():
        raise BTSError(f"{out_dir / 'gates.json'} is a directory")


def analyze(ckpt_or_model, tokenizer, out_dir: str | os.PathLike, n_prompts: int = 8, seed: int = 0,
            cache_dir: str | os.PathLike | None = None, tb_log_dir: str | os.PathLike | None = None, *,
            max_tokens: int = 128, n_switch: int = 4, switch_types: Sequence[str] = GATE_SWITCH_TYPES,
            domains: Sequence[str] | None = None,
            records: Mapping[str, Sequence[Mapping]] | None = None, device: str | None = None,
            allow_changed_models: bool = False) -> dict:
    """Trace, summarise, plot and save the gates of a BTS model (see the module docstring).

    Args:
        ckpt_or_model: a stitch checkpoint directory (``load_stitched``) or a ``StitchedLM``.
        tokenizer: a tokenizer directory (``bts.data.load_tokenizer``) or a tokenizer object.
        out_dir: results directory: writes ``gates.json`` and ``figures/gates_*.png``.
        n_prompts: prompts per domain; seed: prompt-selection seed; cache_dir: data cache (``bts.data``).
        tb_log_dir: also log the figures, mean gates and table to TensorBoard there.
        max_tokens: length of a domain prompt and of a context-switching prompt; n_switch: number of
        context-switching prompts; switch_types: their switch types (``switch_prompts``).
        domains: domains to analyse (default all four); records: ``{domain: [{"text": ...}]}`` to use instead of
        the test splits.
        device: where a checkpoint is loaded (default cuda if available); allow_changed_models: see load_stitched.

    Returns the ``gates.json`` content (``summarize`` keys plus ``format``, ``version``, ``checkpoint``,
    ``settings``, ``figures`` (name → path relative to ``out_dir``), ``changed_models``).
    Nothing is written when an input error (``BTSError``) occurs.
    """
    out_dir = Path(out_dir)
    _check_out(out_dir)
    model, ckpt = _load_model(ckpt_or_model, device, allow_changed_models)
    tok = _load_tokenizer(tokenizer)
    records_source = "given" if records is not None else "test split (bts.data.load_split)"
    if records is None:
        records = _load_records(list(domains or DOMAINS), cache_dir)
    elif domains is not None:
        missing = [d for d in domains if d not in records]
        if missing:
            raise BTSError(f"no records given for domain(s) {missing}")
        records = {d: records[d] for d in domains}
    records = {d: list(r) for d, r in records.items()}
    if not records:
        raise BTSError("no domains to analyse")

    prompts = domain_prompts(records, tok, n_prompts=n_prompts, seed=seed, max_tokens=max_tokens)
    switches = switch_prompts(records, tok, n_switch=n_switch, seed=seed, types=switch_types, max_tokens=max_tokens)
    top = max(max(p["ids"]) for ps in prompts.values() for p in ps)
    if switches:
        top = max(top, max(max(s["ids"]) for s in switches))
    if top >= model.vocab_size:
        raise BTSError(f"the tokenizer produces token id {top} but the model's vocab_size is {model.vocab_size}; "
                       "use the tokenizer the models were trained with")

    domain_traces = {d: [gate_trace(model, p["ids"]) for p in ps] for d, ps in prompts.items()}
    switch_traces = [gate_trace(model, s["ids"]) for s in switches]
    summary = summarize(domain_traces, switch_traces, switches)

    figures = {d: domain_figure(d, ts) for d, ts in domain_traces.items()}
    for i, (s, t) in enumerate(zip(switches, switch_traces)):
        figures[f"switch_{i}"] = switch_figure(s, t, i)
    figures["summary"] = summary_figure(summary)

    result = {
        "format": FORMAT,
        "version": VERSION,
        "checkpoint": ckpt,
        "settings": {
            "n_prompts": n_prompts, "seed": seed, "max_tokens": max_tokens, "n_switch": n_switch,
            "switch_types": [s["type"] for s in switches], "switch_positions": [s["boundaries"][0] for s in switches],
            "records": records_source,
            "weighting": "prompt mean = mean over its tokens; domain/overall mean = mean over prompts",
            "prompt_records": {d: [p["records"] for p in ps] for d, ps in prompts.items()},
        },
        **summary,
        "figures": {name: f"figures/gates_{name}.png" for name in figures},
        "changed_models": list(getattr(model, "changed_models", []) or []),
    }

    for name, fig in figures.items():
        save_png(fig, out_dir / result["figures"][name])
    atomic_write_json(out_dir / "gates.json", result)
    if tb_log_dir is not None:
        log_to_tensorboard(figures, tb_log_dir, summary=result)
    return result

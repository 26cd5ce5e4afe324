"""The evaluation suite: held-out perplexity per domain and the downstream tasks of docs/design.md §4.

``evaluate(model, tokenizer, tasks, cfg)`` runs on any ``LanguageModel`` (dense HF models, merges, BTM,
routers, BTX/BAM, BTS, or a LightningModule) and returns one method entry of ``metrics.json`` (§6)::

    {"ppl":      {domain: float},          # exp(mean token NLL) on packed test blocks, lower is better
     "ppl_ci":   {domain: [lo, hi]},       # 95 % percentile bootstrap over blocks
     "switch_ppl":    {"A>B": float, ..., "all": float},  # post-switch ppl on domain-switching blocks, lower is better
     "switch_ppl_ci": {"A>B": [lo, hi], ..., "all": [lo, hi]},
     "tasks":    {task: float},            # downstream metrics, 0-100, higher is better (see TASKS)
     "tasks_ci": {task: [lo, hi] | None},  # 95 % bootstrap over items (chrF: over pairs; None: no items)
     "chance":   {task: float},            # score of a model at chance under this config (TaskInfo.chance_for)
     "avg":      float | None,             # mean of all "tasks" metrics (None when no downstream task ran)
     "extra":    {metric: float},          # secondary metrics not in "avg" (BLEU, MC acc_norm; EXTRA_METRICS)
     "info":     {"items": {...}, "seconds": {...}, "formats": {...}},
     "items":    {cell: {"num": [...], "den": [...], "kind": "ppl" | "pct"}}}

Per-item scores. Every value except chrF is a ratio estimator over items and equals
``bts.eval.stats.cell_value(num, den, kind)`` of its ``items`` entry exactly: ``ppl:<domain>`` has one entry per
block (summed token NLL, scored tokens; kind "ppl"); ``switch:<A>B>`` and ``switch:all`` one per
domain-switching block (summed NLL and count of the tokens after the switch; kind "ppl";
``bts.eval.tasks.switching``); a multiple-choice metric one per item (credit 1, 1/m on an m-way tie, or 0; den 1);
a teacher-forced span metric one per document (hits, scored spans); ``math_em`` and ``humaneval_pass1`` one per
problem (0/1, den 1). chrF is corpus-level (n-gram statistics are pooled before the
F-score), so it has no ``items`` entry; its interval resamples (prediction, reference) pairs and recomputes the
corpus score. Intervals are seeded (``EvalConfig.seed``) and deterministic; ``bts.eval.stats.paired_ci`` uses the
``items`` to compare methods on the same items.

Default tasks and cost. The embedded reproduction evaluates ~25 tiny models (d=64, vocab 2048, context 128) on 2
CPU cores. The default task list (``DEFAULT_TASKS``) is perplexity, perplexity after a domain switch ("switch":
12 switch types x 12 blocks, a few seconds per tiny model), and the likelihood and teacher-forced metrics,
sized to resolve differences between methods (``EvalConfig``: 128 blocks per domain, 400 items or documents per
task, or the whole test split when smaller), about 30 s per tiny model on one CPU thread. The generation metrics
(``GENERATIVE_TASKS``: math EM, translation chrF, HumanEval) stay available but are not run by default: at the
tiny scale every model scores 0 on them (measured on all 25 tiny models: math EM 0, HumanEval 0, chrF < 8), so
they carry no signal, and batch-1 generation costs most of the eval time. They are meant for real checkpoints:
``bts eval --tasks ppl,math,translation,code`` (group names include them) or the lm-eval adapter
(``bts.eval.harness``) for the paper's benchmarks; raise their item counts, ``seq_len`` and budgets there.

Tasks live in ``bts.eval.tasks`` (one family per module, see there for adding one): prompt formats follow the
training documents (every prompt starts with ``doc_start``, EOS by default, and few-shot examples are separate
documents joined by EOS); the multiple-choice and span scoring rules are in ``bts.eval.tasks.scoring``.

``avg`` is the plain mean over the ``TASKS`` metrics that ran (multiple choice at chance = 100 / ``mc_choices``,
the others at ~0), so with the 7 default metrics a model at chance everywhere has ``avg`` = 25 * 5 / 7 = 17.9.

Determinism: items are drawn from the *test* split with ``random.Random(f"{seed}:<task>")``; greedy decoding;
bootstrap generators seeded from ``seed``; no other randomness.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from bts.core.io import BTSError
from bts.eval.config import DOMAINS, EvalConfig
from bts.eval.stats import cell_ci, cell_value
from bts.eval.tasks import (
    EXTRA_METRICS,
    FAMILIES,
    TASK_GROUPS,
    TASKS,
    Context,
    TaskFamily,
    TaskInfo,
    TaskOutput,
    make_loader,
    register,
    unregister,
)
from bts.eval.tasks.code import select_humaneval
from bts.eval.tasks.math import math_prompt
from bts.eval.tasks.perplexity import pack_blocks, perplexity_cell
from bts.eval.tasks.scoring import MCItem, pick_distractors, score_mc, span_hits
from bts.eval.tasks.switching import SWITCH, switching_cells
from bts.eval.tasks.translation import LANG_NAMES, infer_pair_format, template_pair_format

__all__ = [
    "DEFAULT_TASKS", "DOMAINS", "EXTRA_METRICS", "GENERATIVE_TASKS", "LANG_NAMES", "TASKS", "TASK_GROUPS",
    "EvalConfig", "MCItem", "TaskFamily", "TaskInfo", "TaskOutput", "build_mc_items", "evaluate",
    "infer_pair_format", "math_prompt", "pack_blocks", "pick_distractors", "register", "resolve_selection",
    "resolve_tasks",
    "score_mc", "select_humaneval", "span_hits", "template_pair_format", "unregister",
]

GENERATIVE_TASKS: tuple[str, ...] = tuple(n for n, i in TASKS.items() if i.scoring == "generate")
"""Metrics that need free generation (``math_em``, ``translation_{s,t}_chrf``, ``humaneval_pass1``): not run by
default (0 for every tiny model, and most of the eval time); request them by name or group."""

DEFAULT_TASKS: tuple[str, ...] = ("ppl", SWITCH, *(n for n in TASKS if n not in GENERATIVE_TASKS))
"""Perplexity, perplexity after a domain switch ("switch") and the likelihood / teacher-forced metrics:
``math_mc_acc``, ``translation_{s,t}_mc_acc``, ``code_next_line_em``, ``code_mc_acc``, ``general_next_word_acc``,
``general_mc_acc``."""


def resolve_selection(tasks: str | Sequence[str]) -> tuple[bool, bool, list[str]]:
    """(run perplexity?, run domain-switching perplexity?, downstream metric names in TASKS order)."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    ppl = switch = False
    wanted: set[str] = set()
    for t in tasks:
        if t == "ppl":
            ppl = True
        elif t == SWITCH:
            switch = True
        elif t in TASK_GROUPS:
            wanted.update(TASK_GROUPS[t])
        elif t in TASKS:
            wanted.add(t)
        elif t in EXTRA_METRICS:
            wanted.add(EXTRA_METRICS[t].parent)
        else:
            known = ["ppl", SWITCH, *TASK_GROUPS, *TASKS]
            raise BTSError(f"unknown task {t!r} (known: {', '.join(known)})")
    return ppl, switch, [name for name in TASKS if name in wanted]


def resolve_tasks(tasks: str | Sequence[str]) -> tuple[bool, list[str]]:
    """(run perplexity?, downstream metric names in TASKS order) from group / metric names ("switch" is accepted
    and left out; ``resolve_selection`` reports it)."""
    ppl, _, names = resolve_selection(tasks)
    return ppl, names


def _ci(cell: Mapping, cfg: EvalConfig) -> list[float] | None:
    if not cell["num"]:
        return None
    return cell_ci(cell["num"], cell["den"], cell["kind"], b=cfg.ci_resamples, seed=cfg.seed)


def _autocast(cfg: EvalConfig, device: torch.device):
    """bfloat16 autocast for ``precision: bf16-mixed``, else nothing."""
    if cfg.precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(
    model,
    tokenizer,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    cfg: EvalConfig | None = None,
    cache_dir=None,
    seq_len: int = 128,
    progress: bool = True,
    data: Mapping[str, list[dict]] | None = None,
) -> dict:
    """Run the suite on ``model`` (a ``LanguageModel``) and return one ``metrics.json`` method entry.

    Args:
        model: ``model(input_ids [B, T]) -> [B, T, V]`` scores and ``model.generate(...)``.
        tokenizer: the ``transformers`` fast tokenizer the model was trained with.
        tasks: "ppl", "switch", group names (math, translation, code, general) or metric names from ``TASKS``
            (default: ``DEFAULT_TASKS``, without the generation metrics).
        cfg: item counts and settings.
        cache_dir: data cache directory passed to ``bts.data.load_split``.
        seq_len: block length of the perplexity blocks and default prompt context (the training context).
        progress: show tqdm progress bars.
        data: ``{domain: test records}`` to use instead of ``bts.data.load_split`` (tests, custom data).
    """
    cfg = cfg or EvalConfig()
    run_ppl, run_switch, names = resolve_selection(tasks)
    ctx = Context(model, tokenizer, cfg, seq_len, progress, make_loader(data, cache_dir))
    result: dict = {"ppl": {}, "ppl_ci": {}, "switch_ppl": {}, "switch_ppl_ci": {}, "tasks": {}, "tasks_ci": {},
                    "chance": {}, "avg": None, "extra": {}, "info": {"items": {}, "seconds": {}, "formats": {}},
                    "items": {}}
    info = result["info"]
    out = TaskOutput()
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad(), _autocast(cfg, ctx.device):
            if run_ppl:
                t0 = time.perf_counter()
                for domain in cfg.ppl_domains:
                    num, den = perplexity_cell(ctx, domain)
                    cell = result["items"][f"ppl:{domain}"] = {"num": num, "den": den, "kind": "ppl"}
                    result["ppl"][domain] = cell_value(num, den, "ppl")
                    result["ppl_ci"][domain] = _ci(cell, cfg)
                    info["items"][f"ppl_{domain}_tokens"] = sum(den)
                    info["items"][f"ppl_{domain}_blocks"] = len(den)
                info["seconds"]["ppl"] = round(time.perf_counter() - t0, 3)
            if run_switch:
                t0 = time.perf_counter()
                cells, blocks = switching_cells(ctx)
                for kind, (num, den) in cells.items():
                    cell = result["items"][f"{SWITCH}:{kind}"] = {"num": num, "den": den, "kind": "ppl"}
                    result["switch_ppl"][kind] = cell_value(num, den, "ppl")
                    result["switch_ppl_ci"][kind] = _ci(cell, cfg)
                info["items"]["switch_blocks"] = len(cells["all"][1])
                info["items"]["switch_tokens"] = sum(cells["all"][1])
                positions = sorted({b.switch for bl in blocks.values() for b in bl})
                info["formats"][SWITCH] = (f"{seq_len}-token window of a packed stream: A docs (each + EOS) then B "
                                           f"docs, switch at {positions}; scored after the switch")
                info["seconds"][SWITCH] = round(time.perf_counter() - t0, 3)
            for group in dict.fromkeys(TASKS[n].group for n in names):
                t0 = time.perf_counter()
                out.update(FAMILIES[group].run(ctx, [n for n in names if TASKS[n].group == group]))
                info["seconds"][group] = round(time.perf_counter() - t0, 3)
    finally:
        if was_training:
            model.train()
    missing = [k for k in names if k not in out.scores]
    if missing:
        raise BTSError(f"task famil{'ies' if len(missing) > 1 else 'y'} did not report {', '.join(missing)}")
    result["tasks"] = {k: float(out.scores[k]) for k in names}
    for k in names:
        if k in out.ci:
            result["tasks_ci"][k] = out.ci[k]
        elif k in out.items:
            result["items"][k] = out.items[k]
            result["tasks_ci"][k] = _ci(out.items[k], cfg)
        else:
            result["tasks_ci"][k] = None
        result["chance"][k] = TASKS[k].chance_for(cfg)
    result["extra"] = dict(out.extra)
    info["items"].update(out.counts)
    info["formats"].update(out.formats)
    if result["tasks"]:
        result["avg"] = float(sum(result["tasks"].values()) / len(result["tasks"]))
    return result


def build_mc_items(task: str, tokenizer, cfg: EvalConfig | None = None, data: Mapping[str, list[dict]] | None = None,
                   cache_dir=None, seq_len: int = 128) -> list[MCItem]:
    """The items of a multiple-choice metric (``math_mc_acc``, ``translation_s_mc_acc``, ``translation_t_mc_acc``,
    ``code_mc_acc``, ``general_mc_acc``) exactly as ``evaluate`` scores them (for inspection and tests)."""
    builders = {n: b for fam in FAMILIES.values() for n, b in fam.mc_builders.items()}
    if task not in builders:
        raise BTSError(f"{task!r} is not a multiple-choice metric (known: {', '.join(builders)})")
    ctx = Context(None, tokenizer, cfg or EvalConfig(), seq_len, False, make_loader(data, cache_dir))
    return builders[task](ctx)

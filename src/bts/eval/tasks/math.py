"""Math family: ``math_em`` (greedy answer generation) and ``math_mc_acc`` (log-likelihood multiple choice).

Prompts are the record's ``text`` up to its answer (``Question: <q>\\nAnswer:``), after ``math_shots`` solved
problems of the test split (separate documents joined by EOS, never scored themselves). ``math_em`` cells are one
problem each (1 when the normalised first generated line equals the reference, else 0).
"""

from __future__ import annotations

from bts.core.io import BTSError
from bts.eval.metrics import normalize_math_answer
from bts.eval.tasks import scoring
from bts.eval.tasks.base import Context, TaskFamily, TaskInfo, TaskOutput, register

TASKS = {
    "math_em": TaskInfo(
        "math", "math", "Math EM",
        "Exact match (%) of greedy answers to held-out generated math problems (mathematics-dataset test split; "
        "GSM8K/MATH analogue), `math_shots`-shot, prompt `Question: <q>\\nAnswer:`, answer = first generated "
        "line, normalised by bts.eval.metrics.normalize_math_answer (numbers compared exactly: 5.0 == 5, "
        "0.5 == 1/2).",
        chance=0.0, scoring="generate",
    ),
    "math_mc_acc": TaskInfo(
        "math", "math", "Math MC acc.",
        "Log-likelihood multiple choice (accuracy %, chance 25) on held-out math problems, `math_shots`-shot as "
        "math_em, prompt `Question: <q>\\nAnswer:`; 4 candidates ` <answer>` + EOS: the true answer and 3 answers "
        "of other test problems of the same module (distinct after normalize_math_answer; items without 3 such "
        "answers are skipped). " + scoring.MC_COMMON,
        chance=25.0, scoring="mc",
    ),
}


def math_prompt(rec: dict) -> tuple[str, str]:
    """(prompt, reference answer) of a math record: its ``text`` up to the answer when the text ends with it
    (``Question: <q>\\nAnswer:``, trailing spaces moved into the answer), else ``Question: <q>\\nAnswer:``."""
    answer = str(rec.get("answer", "")).strip()
    text = str(rec.get("text", "")).rstrip()
    if answer and text.endswith(answer):
        return text[: len(text) - len(answer)].rstrip(" "), answer
    if "question" not in rec:
        raise BTSError("math records need 'question' and 'answer' fields")
    return f"Question: {rec['question']}\nAnswer:", answer


def _setup(ctx: Context) -> tuple[int, list[int], list[dict]]:
    """(number of shots, few-shot token ids, the other records with an answer in scoring order)."""
    recs = [r for r in ctx.load("math") if str(r.get("answer", "")).strip()]
    order = ctx.sample(recs, len(recs), "math")
    k = max(0, min(ctx.cfg.math_shots, len(order) - 1))  # shots are drawn first and never scored
    shot_ids: list[int] = []
    for s in order[:k]:
        shot_ids += ctx.encode(str(s["text"]).rstrip()) + [ctx.eos]
    return k, shot_ids, order[k:]


def math_mc_items(ctx: Context) -> list[scoring.MCItem]:
    """One item per scorable problem in scoring order, until ``math_mc_items``; distractors from the same
    module."""
    cfg = ctx.cfg
    _, shot_ids, order = _setup(ctx)
    by_module: dict[str, list[str]] = {}
    for r in order:  # the scorable records: the few-shot answers (in every prompt) are never distractors
        by_module.setdefault(str(r.get("module", "")), []).append(str(r["answer"]).strip())
    rng = ctx.rng("math_mc")
    lengths = scoring.token_lengths(ctx, " ")
    items: list[scoring.MCItem] = []
    for rec in order:
        if len(items) >= cfg.math_mc_items:
            break
        prompt, ref = math_prompt(rec)
        text = str(rec.get("text", "")).rstrip()
        sep = text[len(prompt): len(text) - len(ref)] if text.startswith(prompt) and text.endswith(ref) else " "
        module = str(rec.get("module", ""))
        wrong = scoring.pick_distractors(ref, by_module[module], cfg.mc_choices - 1, rng, cfg.mc_near,
                                 key=normalize_math_answer, lengths=lengths)
        if wrong is not None:
            item = scoring.mc_item(ctx, rng, ctx.prefix + shot_ids, prompt, sep, ref, wrong, end_doc=True, group=module)
            if item is not None:
                items.append(item)
    return items


def run(ctx: Context, names: list[str]) -> TaskOutput:
    cfg = ctx.cfg
    out = TaskOutput()
    k, shot_ids, order = _setup(ctx)
    if "math_em" in names:
        hits = []
        for rec in ctx.bar(order[: cfg.math_items], "math"):
            prompt, ref = math_prompt(rec)
            ids = ctx.prefix + shot_ids + ctx.encode(prompt)
            pred = ctx.generate(ids, cfg.math_max_new_tokens, stops=("\n",))
            hits.append(int(normalize_math_answer(pred) == normalize_math_answer(ref)))
        out.add_cell("math_em", hits, [1] * len(hits))
    out.formats["math"] = f"{k}-shot; " + (repr(math_prompt(order[0])[0]) if order else "")
    if "math_mc_acc" in names:
        out.update(scoring.run_mc(ctx, "math_mc_acc", math_mc_items(ctx)))
    return out


FAMILY = register(TaskFamily("math", TASKS, run, extra=scoring.norm_extras(TASKS),
                             mc_builders={"math_mc_acc": math_mc_items}, order=10))

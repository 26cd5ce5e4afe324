"""General-text family: next-word accuracy (teacher-forced) and cloze multiple choice on held-out English
paragraphs. ``general_next_word_acc`` cells are paragraphs (hits / scored words)."""

from __future__ import annotations

import re
from bisect import bisect_right

from bts.eval.metrics import word_char_spans
from bts.eval.tasks import scoring
from bts.eval.tasks.base import Context, TaskFamily, TaskInfo, TaskOutput, register

TASKS = {
    "general_next_word_acc": TaskInfo(
        "general", "general", "General next-word acc.",
        "% of words (runs of \\w characters, after the first, within the context) of held-out English "
        "paragraphs that greedy decoding from the true prefix reproduces exactly (teacher-forced: every token "
        "of the word is the argmax given the true prefix).",
        chance=0.0, scoring="span",
    ),
    "general_mc_acc": TaskInfo(
        "general", "general", "General MC acc.",
        "Log-likelihood cloze multiple choice (accuracy %, chance 25) on held-out general paragraphs: prompt = a "
        "paragraph up to a seeded word (at least `general_mc_words` words in), 4 candidates = its next "
        "`general_mc_words` (8) words and 3 runs of as many words from other test paragraphs (single-space "
        "separated). " + scoring.MC_COMMON,
        chance=25.0, scoring="mc",
    ),
}

_NONSPACE = re.compile(r"\S+")


def _word_runs(text: str, n_words: int) -> tuple[list[re.Match], list[int]]:
    """(the whitespace-separated words of ``text``, the word indices ``j >= 1`` that start a run of ``n_words``
    words that is preceded by and separated by single spaces, i.e. ``text`` holds ``" " + " ".join(run)``)."""
    words = list(_NONSPACE.finditer(text))
    single = [False] + [text[words[i - 1].end(): words[i].start()] == " " for i in range(1, len(words))]
    starts = [j for j in range(1, len(words) - n_words + 1) if all(single[j: j + n_words])]
    return words, starts


def general_mc_items(ctx: Context) -> list[scoring.MCItem]:
    """One cloze item per held-out paragraph (seeded order, until ``general_mc_items``): the prompt is the
    paragraph up to a seeded word ``j >= general_mc_words``, the truth its next ``general_mc_words`` words, the
    distractors runs of as many words at seeded positions of other paragraphs (one candidate run per paragraph)."""
    cfg = ctx.cfg
    n_words = max(1, cfg.general_mc_words)
    recs = ctx.load("general")
    texts = [str(r["text"]) for r in recs]
    runs = [_word_runs(t, n_words) for t in texts]
    rng = ctx.rng("general_mc")
    lengths = scoring.token_lengths(ctx, " ")
    items: list[scoring.MCItem] = []
    for i in ctx.sample(list(range(len(recs))), len(recs), "general_mc"):
        if len(items) >= cfg.general_mc_items:
            break
        text, (words, starts) = texts[i], runs[i]
        starts = [j for j in starts if j >= n_words]
        if not starts:
            continue
        ends = [e for _, e in ctx.tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        fits = [j for j in starts
                if len(ctx.prefix) + bisect_right(ends, words[j + n_words - 1].end()) <= ctx.max_context]
        if not fits:
            continue
        j = rng.choice(fits)
        truth = " ".join(w.group() for w in words[j: j + n_words])
        pool = []
        for q, (q_words, q_starts) in enumerate(runs):
            if q != i and q_starts:
                s = rng.choice(q_starts)
                pool.append(" ".join(w.group() for w in q_words[s: s + n_words]))
        wrong = scoring.pick_distractors(truth, pool, cfg.mc_choices - 1, rng, cfg.mc_near, lengths=lengths)
        if wrong is None:
            continue
        item = scoring.mc_item(ctx, rng, ctx.prefix, text[: words[j - 1].end()], " ", truth, wrong)
        if item is not None:
            items.append(item)
    return items


def run(ctx: Context, names: list[str]) -> TaskOutput:
    out = TaskOutput()
    if "general_next_word_acc" in names:
        recs = ctx.sample(ctx.load("general"), ctx.cfg.general_items, "general_next_word")
        out.update(scoring.run_span(ctx, "general_next_word_acc", recs, word_char_spans))
    if "general_mc_acc" in names:
        out.update(scoring.run_mc(ctx, "general_mc_acc", general_mc_items(ctx)))
    return out


FAMILY = register(TaskFamily("general", TASKS, run, extra=scoring.norm_extras(TASKS),
                             mc_builders={"general_mc_acc": general_mc_items}, order=40))

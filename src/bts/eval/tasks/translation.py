"""Translation family: chrF of greedy translations (English->X "S", X->English "T"; BLEU as extras) and
log-likelihood multiple choice of the target sentence in both directions.

Prompts reuse the layout of the data layer's own ``text`` when it can be inferred per language and direction
(``infer_pair_format``), otherwise ``EvalConfig.translation_template``; one example pair of the same language and
direction (a separate document before EOS) precedes each item. Items go round-robin over the languages.

chrF is a corpus-level score (character n-gram statistics summed over all pairs before the F-score), so it has no
per-item cell in ``evaluate(...)["items"]``; its interval resamples (prediction, reference) pairs and recomputes
the corpus score from per-pair n-gram statistics (``bts.eval.metrics.chrf_statistics``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from bts.core.io import BTSError
from bts.eval.metrics import bleu, chrf, chrf_from_statistics, chrf_statistics
from bts.eval.stats import resample_ci
from bts.eval.tasks import scoring
from bts.eval.tasks.base import Context, TaskFamily, TaskInfo, TaskOutput, register

LANG_NAMES = {
    "en": "English", "nl": "Dutch", "es": "Spanish", "pt": "Portuguese", "vi": "Vietnamese",
    "id": "Indonesian", "hi": "Hindi", "fr": "French",
}

TASKS = {
    "translation_s_chrf": TaskInfo(
        "translation", "multilingual", "Transl. S chrF",
        "chrF (0-100, corpus-level, sacrebleu.CHRF defaults) of greedy English->X translations, "
        "1-shot, X in {nl, es, pt, vi, id, hi, fr}, items stratified over languages (Flores 'S' analogue).",
        chance=0.0, scoring="generate",
    ),
    "translation_t_chrf": TaskInfo(
        "translation", "multilingual", "Transl. T chrF",
        "chrF (0-100) of greedy X->English translations on the same items, 1-shot (Flores 'T' analogue).",
        chance=0.0, scoring="generate",
    ),
    "translation_s_mc_acc": TaskInfo(
        "translation", "multilingual", "Transl. S MC acc.",
        "Log-likelihood multiple choice (accuracy %, chance 25), English->X: the translation prompt (same layout "
        "and 1-shot example as the chrF task) and 4 candidate X targets + EOS: the reference and the X sides of 3 "
        "other test pairs of the same language; items round-robin over the languages. " + scoring.MC_COMMON,
        chance=25.0, scoring="mc",
    ),
    "translation_t_mc_acc": TaskInfo(
        "translation", "multilingual", "Transl. T MC acc.",
        "As translation_s_mc_acc for X->English: 4 candidate English targets (the reference and the English sides "
        "of 3 other test pairs of the same language). " + scoring.MC_COMMON,
        chance=25.0, scoring="mc",
    ),
}

EXTRA = {
    "translation_s_bleu": TaskInfo(
        "translation", "multilingual", "Transl. S BLEU",
        "SacreBLEU (13a, corpus-level, 0-100) of the English->X translations (not in avg).",
        parent="translation_s_chrf",
    ),
    "translation_t_bleu": TaskInfo(
        "translation", "multilingual", "Transl. T BLEU",
        "SacreBLEU (13a, corpus-level, 0-100) of the X->English translations (not in avg).",
        parent="translation_t_chrf",
    ),
    **scoring.norm_extras(TASKS),
}


def infer_pair_format(records: Sequence[dict], src_is_en: bool, min_share: float = 0.5,
                      min_direction_share: float = 0.2) -> tuple[str, str, str] | None:
    """Infer ``(prefix, middle, suffix)`` with ``text == prefix + src + middle + tgt + suffix`` from records of
    one language whose ``text`` holds ``en`` and ``xx``. Only records with the source first count; the layout
    is used when at least ``min_direction_share`` of the informative records are in that direction and the
    most common layout covers ``min_share`` of them, else None (the caller falls back to the template)."""
    layouts: Counter = Counter()
    informative = 0
    for r in records:
        en, xx, text = str(r.get("en", "")), str(r.get("xx", "")), str(r.get("text", ""))
        if not en or not xx or en in xx or xx in en:
            continue
        if text.count(en) != 1 or text.count(xx) != 1:
            continue
        informative += 1
        i_en, i_xx = text.index(en), text.index(xx)
        src, tgt, i_src, i_tgt = (en, xx, i_en, i_xx) if src_is_en else (xx, en, i_xx, i_en)
        if i_src + len(src) <= i_tgt:
            layouts[(text[:i_src], text[i_src + len(src): i_tgt], text[i_tgt + len(tgt):])] += 1
    n_dir = sum(layouts.values())
    if not layouts or n_dir < min_direction_share * informative:
        return None
    layout, count = layouts.most_common(1)[0]
    return layout if count >= min_share * n_dir else None


def template_pair_format(template: str, lang: str, src_is_en: bool) -> tuple[str, str, str]:
    """``(prefix, middle, suffix)`` of ``EvalConfig.translation_template`` for one language and direction."""
    if (template.count("{src}") != 1 or template.count("{tgt}") != 1
            or template.index("{src}") > template.index("{tgt}")):
        raise BTSError("translation_template needs one {src} followed by one {tgt}")
    name = LANG_NAMES.get(lang, lang)
    src_lang, tgt_lang = ("English", name) if src_is_en else (name, "English")
    t = template.replace("{src_lang}", src_lang).replace("{tgt_lang}", tgt_lang)
    prefix, rest = t.split("{src}")
    middle, suffix = rest.split("{tgt}")
    return prefix, middle, suffix


def _setup(ctx: Context, n_items: int):
    """(records by language, one-shot example per language or None, ``n_items`` items round-robin over the
    languages). The item order does not depend on ``n_items`` (the chrF items are a prefix of the MC items)."""
    cfg = ctx.cfg
    by_lang: dict[str, list[dict]] = {}
    for r in ctx.load("multilingual"):
        if str(r.get("en", "")).strip() and str(r.get("xx", "")).strip() and r.get("lang"):
            by_lang.setdefault(str(r["lang"]), []).append(r)
    if not by_lang:
        raise BTSError("no multilingual records with 'lang', 'en' and 'xx' fields")
    rng = ctx.rng("translation")
    pools, shots = {}, {}
    for lang in sorted(by_lang):
        recs = list(by_lang[lang])
        rng.shuffle(recs)
        shots[lang] = recs[0] if (cfg.translation_shots > 0 and len(recs) > 1) else None
        pools[lang] = recs[1:] if shots[lang] is not None else recs
    items: list[dict] = []
    langs = sorted(pools)
    pos = {lang: 0 for lang in langs}
    while len(items) < n_items and any(pos[lg] < len(pools[lg]) for lg in langs):
        for lg in langs:
            if pos[lg] < len(pools[lg]) and len(items) < n_items:
                items.append(pools[lg][pos[lg]])
                pos[lg] += 1
    return by_lang, shots, items


def _layouts(ctx: Context, by_lang: Mapping[str, list[dict]], src_is_en: bool,
             formats: dict | None = None) -> dict[str, tuple[str, str, str]]:
    direction = "s" if src_is_en else "t"
    layouts = {}
    for lang in sorted(by_lang):
        inferred = infer_pair_format(by_lang[lang], src_is_en)
        layouts[lang] = inferred or template_pair_format(ctx.cfg.translation_template, lang, src_is_en)
        if formats is not None:
            formats[f"translation_{direction}_{lang}"] = ("inferred from records: " if inferred else "template: ") + (
                repr(layouts[lang][0] + "<src>" + layouts[lang][1] + "<tgt>" + layouts[lang][2]))
    return layouts


def _prompt(ctx: Context, layout: tuple[str, str, str], shot: dict | None, rec: dict,
            src_is_en: bool) -> tuple[list[int], str, str]:
    """(doc start + one-shot document ids, prompt text, the whitespace cut from the prompt's end)."""
    prefix, middle, suffix = layout
    head = list(ctx.prefix)
    if shot is not None:
        s_src, s_tgt = (shot["en"], shot["xx"]) if src_is_en else (shot["xx"], shot["en"])
        head += ctx.encode(prefix + s_src + middle + s_tgt + suffix) + [ctx.eos]
    full = prefix + (rec["en"] if src_is_en else rec["xx"]) + middle
    prompt = full.rstrip(" ")
    return head, prompt, full[len(prompt):]


def translation_mc_items(ctx: Context, src_is_en: bool) -> list[scoring.MCItem]:
    """Items of ``translation_s_mc_acc`` (``src_is_en``) or ``translation_t_mc_acc``: round-robin over the
    languages until ``translation_mc_items``; items that cannot be built are skipped."""
    cfg = ctx.cfg
    by_lang, shots, order = _setup(ctx, len(ctx.load("multilingual")))
    layouts = _layouts(ctx, by_lang, src_is_en)
    side = "xx" if src_is_en else "en"
    # the one-shot example's target is in every prompt of its language: never a distractor
    targets = {lang: [str(r[side]) for r in recs if r is not shots.get(lang)] for lang, recs in by_lang.items()}
    rng = ctx.rng(f"translation_{'s' if src_is_en else 't'}_mc")
    lengths = {lang: scoring.token_lengths(ctx, " ", layouts[lang][2]) for lang in layouts}
    out: list[scoring.MCItem] = []
    for rec in order:
        if len(out) >= cfg.translation_mc_items:
            break
        lang = str(rec["lang"])
        truth = str(rec[side])
        wrong = scoring.pick_distractors(truth, targets[lang], cfg.mc_choices - 1, rng, cfg.mc_near, key=str.strip,
                                 lengths=lengths[lang])
        if wrong is None:
            continue
        head, prompt, sep = _prompt(ctx, layouts[lang], shots.get(lang), rec, src_is_en)
        item = scoring.mc_item(ctx, rng, head, prompt, sep, truth, wrong, tail=layouts[lang][2], end_doc=True, group=lang)
        if item is not None:
            out.append(item)
    return out


def _chrf_ci(preds: list[str], refs: list[str], cfg) -> list[float]:
    """Bootstrap interval of corpus chrF: resample (prediction, reference) pairs and recompute the corpus score
    from their summed n-gram statistics."""
    stats = chrf_statistics(preds, refs)
    return resample_ci(len(preds), lambda idx: chrf_from_statistics(stats[idx].sum(0)), b=cfg.ci_resamples,
                       seed=cfg.seed)


def run(ctx: Context, names: list[str]) -> TaskOutput:
    cfg = ctx.cfg
    by_lang, shots, items = _setup(ctx, cfg.translation_items)
    out = TaskOutput()
    for direction, src_is_en in (("s", True), ("t", False)):
        layouts = _layouts(ctx, by_lang, src_is_en, out.formats)
        name = f"translation_{direction}_chrf"
        if name in names:
            preds, refs = [], []
            for rec in ctx.bar(items, f"translation_{direction}"):
                lang = str(rec["lang"])
                suffix = layouts[lang][2]
                head, prompt, _ = _prompt(ctx, layouts[lang], shots.get(lang), rec, src_is_en)
                stops = ("\n",) + ((suffix.strip(),) if suffix.strip() else ())
                preds.append(ctx.generate(head + ctx.encode(prompt), cfg.translation_max_new_tokens,
                                          stops=stops).strip())
                refs.append(str(rec["xx"] if src_is_en else rec["en"]).strip())
            out.scores[name] = chrf(preds, refs)
            out.extra[f"translation_{direction}_bleu"] = bleu(preds, refs)
            out.counts[name] = len(items)
            out.ci[name] = _chrf_ci(preds, refs, cfg) if preds else None
        name = f"translation_{direction}_mc_acc"
        if name in names:
            out.update(scoring.run_mc(ctx, name, translation_mc_items(ctx, src_is_en)))
    return out


FAMILY = register(TaskFamily(
    "translation", TASKS, run, extra=EXTRA, order=20,
    mc_builders={"translation_s_mc_acc": lambda ctx: translation_mc_items(ctx, True),
                 "translation_t_mc_acc": lambda ctx: translation_mc_items(ctx, False)},
))

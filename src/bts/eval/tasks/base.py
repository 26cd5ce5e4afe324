"""The task interface and registry of the suite, and the per-run context every task family works with.

A *task family* is one module of ``bts.eval.tasks`` that computes a group of related downstream metrics (e.g.
``math``: ``math_em`` and ``math_mc_acc``). It describes its metrics with ``TaskInfo`` and registers one
``TaskFamily`` at import time; ``TASKS``, ``TASK_GROUPS`` and ``EXTRA_METRICS`` are views of the registry that
``register`` / ``unregister`` keep up to date in place (so ``bts.eval.suite.TASKS`` always reflects it). A
family's ``run(ctx, names)`` gets the shared ``Context`` and the metric names to compute and returns a
``TaskOutput`` with scores *and* per-item scores (``TaskOutput.add_cell``), from which ``evaluate`` derives the
bootstrap intervals.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from bts.core.io import BTSError
from bts.eval.generation import generate_text, model_device
from bts.eval.stats import cell_value

SCORINGS = ("generate", "mc", "span")
"""How a metric is scored: free generation ("generate"), log-likelihood multiple choice ("mc"), or teacher-forced
greedy exact match of spans ("span")."""


@dataclass(frozen=True)
class TaskInfo:
    """Metadata of one downstream metric, for table columns and docs."""

    group: str
    """Task family that computes it (the group name accepted by ``evaluate(tasks=...)``)."""
    domain: str
    """Capability / data domain it measures."""
    label: str
    """Short column label."""
    description: str
    """What exactly is computed."""
    chance: float = 0.0
    """Score of a model at chance with the default ``EvalConfig``: 100 / ``mc_choices`` (25) for multiple choice,
    0 for generation and exact-match tasks (a random model essentially never reproduces a span or an answer)."""
    parent: str | None = None
    """For ``EXTRA_METRICS``: the ``TASKS`` metric whose computation also yields this one."""
    scoring: str = "generate"
    """One of ``SCORINGS``. "generate" metrics are not in the default task list (``bts.eval.suite``)."""

    def chance_for(self, cfg) -> float:
        """Chance score under ``cfg``: 100 / ``cfg.mc_choices`` for multiple choice, else ``chance``."""
        return 100.0 / cfg.mc_choices if self.scoring == "mc" else float(self.chance)


@dataclass
class TaskOutput:
    """What a family's ``run`` returns. ``scores`` are ``TASKS`` metrics, ``extra`` secondary ones."""

    scores: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    """Reported as ``info.items``: items (or, where noted, scored units) behind each metric."""
    formats: dict[str, str] = field(default_factory=dict)
    """Prompt formats actually used (``info.formats``)."""
    items: dict[str, dict] = field(default_factory=dict)
    """Per-item scores ``{metric: {"num": [...], "den": [...], "kind": "pct"}}`` (see ``add_cell``)."""
    ci: dict[str, list[float] | None] = field(default_factory=dict)
    """Intervals a family computes itself (corpus-level metrics such as chrF that have no per-item cell)."""

    def add_cell(self, name: str, num: Sequence[float], den: Sequence[float], count: int | None = None) -> None:
        """Record a metric scored per item: its value is ``bts.eval.stats.cell_value(num, den, "pct")`` (100 x the
        ratio of sums), or 0 when nothing could be scored (no items)."""
        num = [x if isinstance(x, int) else float(x) for x in num]
        den = [x if isinstance(x, int) else float(x) for x in den]
        if len(num) != len(den):
            raise ValueError(f"{name}: {len(num)} numerators for {len(den)} denominators")
        self.items[name] = {"num": num, "den": den, "kind": "pct"}
        self.scores[name] = cell_value(num, den, "pct") if sum(den) > 0 else 0.0
        self.counts[name] = len(num) if count is None else int(count)

    def update(self, other: TaskOutput) -> None:
        for f in ("scores", "extra", "counts", "formats", "items", "ci"):
            getattr(self, f).update(getattr(other, f))


@dataclass(frozen=True)
class TaskFamily:
    """One group of metrics computed together by one module."""

    name: str
    """Group name (``evaluate(tasks="math")``); every ``TaskInfo.group`` of the family must equal it."""
    tasks: Mapping[str, TaskInfo]
    """The metrics that enter ``evaluate(...)["tasks"]`` and ``avg``."""
    run: Callable[[Context, list[str]], TaskOutput]
    """``run(ctx, names)``: compute the requested metrics (``names`` is a subset of ``tasks``, in its order)."""
    extra: Mapping[str, TaskInfo] = field(default_factory=dict)
    """Secondary metrics (``evaluate(...)["extra"]``, not in ``avg``); each names its ``parent``."""
    mc_builders: Mapping[str, Callable[[Context], list]] = field(default_factory=dict)
    """Item builders of the family's multiple-choice metrics (``bts.eval.suite.build_mc_items``)."""
    order: int = 100
    """Position of the family's metrics in ``TASKS`` (ascending; ties in registration order)."""


FAMILIES: dict[str, TaskFamily] = {}
TASKS: dict[str, TaskInfo] = {}
EXTRA_METRICS: dict[str, TaskInfo] = {}
TASK_GROUPS: dict[str, tuple[str, ...]] = {}


def register(family: TaskFamily) -> TaskFamily:
    """Add a family to the registry (``TASKS`` & co. are updated in place). Names must be new."""
    if family.name in FAMILIES or family.name == "ppl":
        raise BTSError(f"task family {family.name!r} is already registered")
    taken = set(FAMILIES) | set(TASKS) | set(EXTRA_METRICS) | {"ppl"}
    for name, info in (*family.tasks.items(), *family.extra.items()):
        if name in taken or name == family.name:
            raise BTSError(f"task name {name!r} of family {family.name!r} is already taken")
        if info.group != family.name:
            raise BTSError(f"task {name!r}: group {info.group!r} is not its family {family.name!r}")
        if info.scoring not in SCORINGS:
            raise BTSError(f"task {name!r}: scoring must be one of {SCORINGS}, got {info.scoring!r}")
    for name, info in family.extra.items():
        if info.parent not in family.tasks:
            raise BTSError(f"extra metric {name!r}: parent {info.parent!r} is not a metric of {family.name!r}")
    FAMILIES[family.name] = family
    _rebuild()
    return family


def unregister(name: str) -> None:
    """Remove a family (tests)."""
    FAMILIES.pop(name, None)
    _rebuild()


def family_of(task: str) -> TaskFamily:
    return FAMILIES[TASKS[task].group]


def _rebuild() -> None:
    TASKS.clear(), EXTRA_METRICS.clear(), TASK_GROUPS.clear()
    for fam in sorted(FAMILIES.values(), key=lambda f: f.order):
        TASKS.update(fam.tasks)
        EXTRA_METRICS.update(fam.extra)
        TASK_GROUPS[fam.name] = tuple(fam.tasks)


# --------------------------------------------------------------------------------------------------------------
# the per-run context
# --------------------------------------------------------------------------------------------------------------


def make_loader(data: Mapping[str, list[dict]] | None, cache_dir) -> Callable[[str], list[dict]]:
    """``load(domain) -> test records``, cached: from ``data`` when given, else ``bts.data.load_split``."""
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


class Context:
    """Model, tokenizer, config and data of one ``evaluate`` call, with the helpers every family uses.

    ``prefix`` is the document-start token list (``EvalConfig.doc_start``), ``max_context`` the tokens a prompt
    plus its continuation may use. ``model`` may be None when only items are built (``build_mc_items``)."""

    def __init__(self, model, tokenizer, cfg, seq_len: int, progress: bool, load: Callable[[str], list[dict]]):
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
        """The seeded generator of one task: ``random.Random(f"{seed}:{task}")``."""
        return random.Random(f"{self.cfg.seed}:{task}")

    def sample(self, records: list, n: int, task: str) -> list:
        """The first ``n`` of ``records`` in the task's seeded random order."""
        order = list(range(len(records)))
        self.rng(task).shuffle(order)
        return [records[i] for i in order[: max(0, n)]]

    def bar(self, it, desc: str, total: int | None = None):
        return tqdm(it, desc=desc, total=total, disable=not self.progress, leave=False)

    def generate(self, ids: list[int], max_new_tokens: int, stops: Sequence[str]) -> str:
        """Greedy continuation of ``ids`` (left-truncated to leave room for the budget), cut at ``stops``."""
        budget = max(1, self.max_context - max_new_tokens)
        ids = ids[-budget:]
        return generate_text(self.model, self.tok, ids, max_new_tokens, stops=stops, eos_token_id=self.eos,
                             chunk=self.cfg.gen_chunk, device=self.device)

    def scores(self, ids: list[int]) -> torch.Tensor:
        """Next-token scores ``[T, V]`` (float) of one sequence."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(x)[0].float()

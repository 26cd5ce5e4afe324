"""Per-item cells, bootstrap intervals and the task registry of the suite (bts.eval.suite, bts.eval.tasks)."""

from __future__ import annotations

import importlib

import pytest
import torch

from bts.core.io import BTSError
from bts.eval.stats import cell_value
from bts.eval.suite import (
    TASK_GROUPS,
    TASKS,
    EvalConfig,
    TaskFamily,
    TaskInfo,
    TaskOutput,
    evaluate,
    register,
    resolve_tasks,
    unregister,
)
from bts.eval.tasks import FAMILIES, family_of
from bts.eval.testing import all_texts, synthetic_records, tiny_tokenizer
from conftest import tiny_llama

CORPUS_LEVEL = {"translation_s_chrf", "translation_t_chrf"}  # no per-item cell (see bts.eval.tasks.translation)
SMALL = EvalConfig(ppl_blocks=3, math_items=4, translation_items=4, code_items=4, humaneval_items=2,
                   humaneval_max_new_tokens=8, general_items=4, math_max_new_tokens=4, translation_max_new_tokens=6,
                   math_mc_items=6, translation_mc_items=6, code_mc_items=6, general_mc_items=6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    return synthetic_records(40)


@pytest.fixture(scope="module")
def tok(data):
    return tiny_tokenizer(all_texts(data), vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    from bts.core.language_model import HFLanguageModel

    return HFLanguageModel(tiny_llama(0, vocab=len(tok)))


@pytest.fixture(scope="module")
def full(model, tok, data):
    return evaluate(model, tok, tasks=("ppl", *TASK_GROUPS), cfg=SMALL, data=data, progress=False, seq_len=64)


def test_cells_reproduce_every_value(full):
    """``cell_value`` of a metric's items is exactly the reported value (ppl and every per-item task)."""
    for domain, value in full["ppl"].items():
        cell = full["items"][f"ppl:{domain}"]
        assert cell["kind"] == "ppl" and len(cell["num"]) == full["info"]["items"][f"ppl_{domain}_blocks"] == 3
        assert cell_value(cell["num"], cell["den"], "ppl") == value
        assert sum(cell["den"]) == full["info"]["items"][f"ppl_{domain}_tokens"] == 3 * 63
    for task, value in full["tasks"].items():
        if task in CORPUS_LEVEL:
            assert task not in full["items"] and full["tasks_ci"][task] is not None
            continue
        cell = full["items"][task]
        assert cell["kind"] == "pct" and cell_value(cell["num"], cell["den"], "pct") == value, task
        if TASKS[task].scoring == "span":  # one cell per document, den = its scored spans
            assert sum(cell["den"]) == full["info"]["items"][task] and len(cell["num"]) == 4
        else:  # one cell per item, den 1, credit 0 .. 1
            assert len(cell["num"]) == full["info"]["items"][task] and set(cell["den"]) == {1}
            assert all(0.0 <= x <= 1.0 for x in cell["num"])


def test_intervals_contain_the_value(full):
    for domain, (lo, hi) in full["ppl_ci"].items():
        assert lo <= full["ppl"][domain] <= hi and lo < hi
    for task, ci in full["tasks_ci"].items():
        assert ci is not None and ci[0] <= full["tasks"][task] <= ci[1], (task, ci, full["tasks"][task])
        assert 0.0 <= ci[0] <= ci[1] <= 100.0


def test_intervals_narrow_with_more_items(model, tok, data):
    def width(r, key, name):
        lo, hi = r[key][name]
        return hi - lo

    few = evaluate(model, tok, tasks="ppl,math_mc_acc", cfg=EvalConfig(ppl_blocks=4, math_mc_items=8),
                   data=data, progress=False, seq_len=32)
    many = evaluate(model, tok, tasks="ppl,math_mc_acc", cfg=EvalConfig(ppl_blocks=16, math_mc_items=36),
                    data=data, progress=False, seq_len=32)
    assert many["info"]["items"]["math_mc_acc"] > 2 * few["info"]["items"]["math_mc_acc"]
    for domain in few["ppl"]:
        assert len(many["items"][f"ppl:{domain}"]["num"]) == 16
        assert width(many, "ppl_ci", domain) < 0.8 * width(few, "ppl_ci", domain), domain
    assert width(many, "tasks_ci", "math_mc_acc") < width(few, "tasks_ci", "math_mc_acc")


def test_two_runs_are_identical(full, model, tok, data):
    again = evaluate(model, tok, tasks=("ppl", *TASK_GROUPS), cfg=SMALL, data=data, progress=False, seq_len=64)
    strip = [{k: v for k, v in r.items() if k != "info"} for r in (full, again)]
    assert strip[0] == strip[1]
    assert full["info"]["items"] == again["info"]["items"]
    other_seed = evaluate(model, tok, tasks="ppl", cfg=EvalConfig(ppl_blocks=3, seed=1), data=data,
                          progress=False, seq_len=64)
    assert other_seed["ppl_ci"] != full["ppl_ci"]  # the seed moves the item order and the bootstrap


def test_chance_follows_mc_choices(model, tok, data):
    r = evaluate(model, tok, tasks="general", cfg=EvalConfig(general_items=2, general_mc_items=3, mc_choices=3),
                 data=data, progress=False)
    assert r["chance"] == {"general_next_word_acc": 0.0, "general_mc_acc": pytest.approx(100 / 3)}
    assert all(isinstance(TASKS[t].chance, float) for t in TASKS)


# --- registry ---------------------------------------------------------------------------------------------------
def test_every_task_belongs_to_a_family_module():
    for name, info in TASKS.items():
        fam = family_of(name)
        assert fam is FAMILIES[info.group] and name in fam.tasks and name in TASK_GROUPS[fam.name]
        module = importlib.import_module(fam.run.__module__)
        assert module.__name__ == f"bts.eval.tasks.{fam.name}" and module.FAMILY is fam
        assert set(module.TASKS) == set(fam.tasks)
    assert list(TASK_GROUPS) == ["math", "translation", "code", "general"]


def test_a_registered_toy_task_is_evaluated(model, tok, data):
    calls = []

    def run(ctx, names):
        calls.append(list(names))
        out = TaskOutput()
        out.add_cell("toy_acc", [1, 0, 1, 1], [1, 1, 1, 1])
        out.formats["toy"] = f"{len(ctx.load('general'))} records"
        return out

    info = TaskInfo("toy", "general", "Toy acc.", "Three of four.", chance=50.0, scoring="span")
    register(TaskFamily("toy", {"toy_acc": info}, run, order=99))
    try:
        assert list(TASKS)[-1] == "toy_acc" and TASK_GROUPS["toy"] == ("toy_acc",)
        assert resolve_tasks("toy") == (False, ["toy_acc"])
        r = evaluate(model, tok, tasks="toy_acc", cfg=EvalConfig(), data=data, progress=False)
        assert calls == [["toy_acc"]]
        assert r["tasks"] == {"toy_acc": 75.0} and r["avg"] == 75.0 and r["chance"] == {"toy_acc": 50.0}
        assert r["items"]["toy_acc"] == {"num": [1, 0, 1, 1], "den": [1, 1, 1, 1], "kind": "pct"}
        assert r["tasks_ci"]["toy_acc"][0] <= 75.0 <= r["tasks_ci"]["toy_acc"][1]
        assert r["info"]["formats"]["toy"] == "40 records" and r["info"]["items"]["toy_acc"] == 4
        with pytest.raises(BTSError, match="already"):
            register(TaskFamily("toy", {"toy_other": info}, run))
        with pytest.raises(BTSError, match="already taken"):
            register(TaskFamily("toy2", {"math_em": TaskInfo("toy2", "math", "x", "y")}, run))
    finally:
        unregister("toy")
    assert "toy_acc" not in TASKS and "toy" not in TASK_GROUPS
    with pytest.raises(BTSError, match="unknown task 'toy'"):
        resolve_tasks("toy")

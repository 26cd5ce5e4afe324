"""Whether lm-eval can be imported, and if not, why, in one line: ``bts eval --harness`` asks in-process; ``bts
reproduce`` asks in a child process before its first stage when the profile has lm-eval stages, so that a node
missing one of lm-eval's import-time packages (``datasets`` needs ``pyarrow``) is told so before the experts train,
not after them."""

from __future__ import annotations

import subprocess
import sys

from bts.core.io import BTSError

INSTALL_HINT = "pip install -e '.[harness]'"


def import_error(e: ImportError) -> BTSError:
    """lm-eval itself missing, or a package lm-eval imports missing: the two need different fixes."""
    return _error(getattr(e, "name", None), f"{type(e).__name__}: {e}")


def _error(module: str | None, detail: str) -> BTSError:
    missing = (module or "").split(".")[0]
    if missing in ("", "lm_eval"):
        return BTSError(f"lm-eval is not installed: {INSTALL_HINT}")
    return BTSError(f"lm-eval cannot be imported: it needs the package {missing!r}, which is not installed here "
                    f"({detail})")


def check_importable(python: str = sys.executable, timeout: float = 300) -> None:
    """Import ``lm_eval.tasks`` in a child ``python`` (a few seconds; this process stays free of it); raise the
    one-line ``BTSError`` of ``import_error`` if that fails."""
    code = ("import sys\ntry:\n    import lm_eval.tasks\nexcept ImportError as e:\n"
            "    print(e.name or '', f'{type(e).__name__}: {e}', sep='\\t'); sys.exit(3)\n")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode == 3:
        module, _, detail = proc.stdout.rstrip("\n").partition("\t")  # module may be empty: keep its tab
        raise _error(module, detail) from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BTSError(f"lm-eval cannot be imported (exit {proc.returncode}): {tail}")

"""BTX and BAM share their network code through ``baselines.upcycle``: neither module imports the other (no import
cycle), and every public name stays importable from where configs, entry points and tests use it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "baselines"


def _imported_modules(path: Path) -> set[str]:
    """Every module named by an ``import`` / ``from ... import`` anywhere in the file (lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_btx_and_bam_do_not_import_each_other():
    assert not {m for m in _imported_modules(SRC / "btx.py") if m.startswith("baselines.bam")}
    assert not {m for m in _imported_modules(SRC / "bam.py") if m.startswith("baselines.btx")}
    for shared in ("upcycle.py", "moe.py"):
        assert not {m for m in _imported_modules(SRC / shared) if m.startswith(("baselines.btx", "baselines.bam"))}


def test_public_names_and_no_cross_import_at_runtime():
    code = """
import sys
import baselines.bam as bam
assert "baselines.btx" not in sys.modules, "importing baselines.bam loaded baselines.btx"
from baselines.bam import BAMModel, BAMModule, build_bam, load_bam
for name in [m for m in sys.modules if m.startswith("baselines.")]:
    del sys.modules[name]
import baselines.btx as btx
assert "baselines.bam" not in sys.modules, "importing baselines.btx loaded baselines.bam"
from baselines.btx import BTXModel, BTXModule, MixtralLM, build_btx, export_mixtral, load_btx, moe_skeleton
import baselines.bam as bam2
import baselines.upcycle as up
assert up.load_btx is load_btx is bam2.load_btx and up.BAMModel is bam2.BAMModel and up.BTXModel is BTXModel
"""
    env_path = str(SRC.parent)
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=900,
                         env={"PYTHONPATH": env_path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                              "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]

"""Every YAML under configs/ parses, names importable classes with known arguments, and says how to launch it."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _resolve(class_path: str):
    mod, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def test_there_are_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses_and_documents_launch(path):
    text = path.read_text()
    cfg = yaml.safe_load(text)
    assert isinstance(cfg, dict) and cfg
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("bts " in line for line in header), f"{path}: header comment must give the launch command"
    for section in ("model", "data"):
        spec = cfg.get(section)
        if isinstance(spec, dict) and "class_path" in spec:
            cls = _resolve(spec["class_path"])
            params = inspect.signature(cls.__init__).parameters
            accepts_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
            for key in spec.get("init_args", {}) or {}:
                assert key in params or accepts_kwargs, (
                    f"{path}: {section}.init_args.{key} is not an argument of {cls}"
                )

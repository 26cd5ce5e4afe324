"""A config's header comment states what its values do: the numbers it claims are checked against the values
(how "lr annealed from the seed's" once survived in a header whose lr was 1e-3)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLAIMING = sorted([*(ROOT / "configs/experts").glob("tiny_*.yaml"), ROOT / "configs/seed/tiny.yaml"])


@pytest.mark.parametrize("path", CLAIMING, ids=lambda p: str(p.relative_to(ROOT)))
def test_header_numbers_match_values(path):
    text = path.read_text()
    header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    cfg = yaml.safe_load(text)
    model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    steps, batch, seq = map(int, re.search(r"(\d+) steps of (\d+) x (\d+) tokens", header).groups())
    assert (steps, batch, seq) == (trainer["max_steps"], data["batch_size"], data["seq_len"])
    assert data["num_train_samples"] == steps * batch  # one pass of the sampled plan, no repeated epoch
    lr = float(re.search(r"(?:peak )?lr ([0-9.e-]+)", header).group(1))
    assert lr == model["lr"]
    if "cosine to 1 %" in header:
        assert model["min_lr_ratio"] == 0.01
    tokens = re.search(r"([0-9.]+) M tokens", header)
    assert tokens and float(tokens.group(1)) == pytest.approx(steps * batch * seq / 1e6, abs=0.01)
    frozen = "stay the seed's (freeze)" in header
    assert frozen == bool(model.get("freeze")), "the header must say which parts stay frozen"
    if "warmup" in header:
        w = re.search(r"(\d+) warmup steps", header) or re.search(r"after (\d+) warmup", header)
        assert w and int(w.group(1)) == model["warmup_steps"]

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bts.core.io import (
    BTSError,
    atomic_path,
    atomic_write_json,
    ensure_writable_dir,
    state_dict_sha256,
    tensor_sha256,
)
from bts.training.schedule import warmup_cosine


def test_warmup_then_cosine_to_one_percent():
    total, warm = 100, 10
    assert warmup_cosine(0, warm, total) == pytest.approx(0.1)
    assert warmup_cosine(9, warm, total) == pytest.approx(1.0)
    assert warmup_cosine(10, warm, total) == pytest.approx(1.0)
    mid = warm + (total - warm) // 2
    assert warmup_cosine(mid, warm, total) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(total, warm, total) == pytest.approx(0.01)
    values = [warmup_cosine(s, warm, total) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    f = tmp_path / "m.json"
    atomic_write_json(f, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(f) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert f.read_text().strip().startswith("{") and '"a": 1' in f.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_unwritable_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BTSError, match="cannot create output directory"):
        ensure_writable_dir(blocker / "sub")


def test_tensor_hash_sees_one_ulp():
    t = torch.randn(4, 4)
    u = t.clone()
    u[0, 0] = torch.nextafter(u[0, 0], torch.tensor(float("inf")))
    assert tensor_sha256(t) == tensor_sha256(t.clone())
    assert tensor_sha256(t) != tensor_sha256(u)
    assert state_dict_sha256({"a": t}) != state_dict_sha256({"a": u})

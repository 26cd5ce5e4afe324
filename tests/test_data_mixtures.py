"""Mixture presets and validation."""

from __future__ import annotations

import math

import pytest

from bts.core.io import BTSError
from bts.data.domains import DOMAINS
from bts.data.mixtures import PRESETS, active_domains, resolve_mixture


def test_presets_match_the_paper():
    assert resolve_mixture("seed") == pytest.approx({"general": 0.7, "code": 0.1, "math": 0.1, "multilingual": 0.1})
    for d in ("code", "math", "multilingual"):
        w = resolve_mixture(f"expert_{d}")
        assert w[d] == pytest.approx(0.9) and w["general"] == pytest.approx(0.1)
        assert sum(v for k, v in w.items() if k not in (d, "general")) == 0
    assert resolve_mixture("bts") == pytest.approx({"general": 0.55, "code": 0.15, "math": 0.15,
                                                    "multilingual": 0.15})
    for name in PRESETS:
        w = resolve_mixture(name)
        assert list(w) == list(DOMAINS) and math.isclose(sum(w.values()), 1.0)


def test_custom_weights_are_normalised():
    assert resolve_mixture({"code": 3, "math": 1}) == {"general": 0.0, "code": 0.75, "math": 0.25,
                                                       "multilingual": 0.0}
    assert resolve_mixture({"general": "2", "code": 2.0}) == pytest.approx(
        {"general": 0.5, "code": 0.5, "math": 0, "multilingual": 0})
    assert active_domains({"math": 1, "code": 0}) == ["math"]


@pytest.mark.parametrize(
    ("mixture", "pattern"),
    [
        ("nonsense", r"unknown mixture preset 'nonsense'.*seed"),
        ({"poetry": 1.0}, r"unknown domain 'poetry'.*general, code, math, multilingual"),
        ({"code": -0.1, "general": 1}, r"'code' is negative: -0.1"),
        ({"code": 0, "math": 0.0}, "all zero"),
        ({}, "all zero"),
        ({"code": "lots"}, r"'code' is not a number: 'lots'"),
        ({"code": None}, r"'code' is not a number: None"),
        ({"code": True}, r"'code' is not a number: True"),
        ({"code": float("nan")}, "not finite"),
        (["code"], "preset name or a mapping"),
    ],
)
def test_bad_mixtures_raise_one_clear_error(mixture, pattern):
    with pytest.raises(BTSError, match=pattern) as e:
        resolve_mixture(mixture)
    assert "\n" not in str(e.value)

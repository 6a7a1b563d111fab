"""organisms.design_sweep writes every pass rate with its 95 % Wilson interval, as the pass-rate
files of the experiments and organisms.evaluate do."""

from __future__ import annotations

import json

import pytest

from fluxjax.metrics import PassRate, wilson_interval
from organisms.design_sweep import rate_fields


def test_each_rate_carries_n_passed_and_its_wilson_interval():
    rates = [PassRate("swatch shape", "classified as the asked shape", None, n=64, passed=18),
             PassRate("t2i colour name", "the nearest named colour", None, n=64, passed=64),
             PassRate("recolour shape", "the reference's shape kept", None, n=0, passed=0)]
    fields = json.loads(json.dumps(rate_fields(rates)))  # as a JSONL line holds them
    low, high = wilson_interval(18, 64)
    assert fields["swatch shape"] == {"n": 64, "passed": 18, "rate": 18 / 64, "low": low, "high": high}
    assert 0.18 < low < 18 / 64 < high < 0.41  # [0.186, 0.401]
    assert fields["t2i colour name"]["rate"] == fields["t2i colour name"]["high"] == 1.0
    assert fields["t2i colour name"]["low"] == pytest.approx(wilson_interval(64, 64)[0])
    assert fields["recolour shape"] == {"n": 0, "passed": 0, "rate": None, "low": None, "high": None}

"""Metrics on hand-computed cases (DESIGN.md §1 definitions)."""

from __future__ import annotations

import pytest

from adaserve_jax.bench.metrics import (
    RequestResult,
    attainment,
    goodput,
    mean_accepted_per_step,
    percentile,
    summarize,
)


def res(cat, tokens, slo_ms, tpot_ms, ttft_ms=10.0, steps=0, accepted=0):
    return RequestResult(
        category=cat,
        output_tokens=tokens,
        tpot_slo_s=slo_ms / 1e3,
        ttft_s=None if ttft_ms is None else ttft_ms / 1e3,
        tpot_s=None if tpot_ms is None else tpot_ms / 1e3,
        verify_steps=steps,
        accepted=accepted,
    )


RESULTS = [
    res("coding", 10, 12.0, 12.0, ttft_ms=20.0, steps=5, accepted=4),  # exactly at SLO: attains
    res("coding", 20, 12.0, 12.5, ttft_ms=40.0, steps=10, accepted=10),  # misses
    res("chat", 30, 16.7, 16.0, ttft_ms=60.0, steps=15, accepted=15),  # attains
    res("summarization", 1, 50.0, None, ttft_ms=80.0, steps=0, accepted=0),  # 1 token: attains
]


def test_attained_rule():
    assert [r.attained for r in RESULTS] == [True, False, True, True]


def test_attainment_and_goodput():
    assert attainment(RESULTS) == pytest.approx(3 / 4)
    # attained tokens 10 + 30 + 1 = 41 over 2 s
    assert goodput(RESULTS, 2.0) == pytest.approx(20.5)
    with pytest.raises(ValueError):
        goodput(RESULTS, 0.0)


def test_percentiles_linear():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    # p99 of 1..4: rank 0.99 * 3 = 2.97 -> 3 + 0.97 * (4 - 3)
    assert percentile([4.0, 1.0, 3.0, 2.0], 99) == pytest.approx(3.97)
    assert percentile([None, 5.0], 50) == 5.0
    assert percentile([None], 50) is None


def test_mean_accepted_per_step():
    # (4 + 10 + 15 accepted + 30 steps) / 30 steps
    assert mean_accepted_per_step(RESULTS) == pytest.approx(59 / 30)
    assert mean_accepted_per_step([res("chat", 5, 10, 5)]) == 1.0


def test_summarize():
    s = summarize(RESULTS, 2.0, step_seconds=[0.5, 1.0, 0.5], select_seconds=[0.01, 0.0, 0.01])
    assert s["requests"] == 4
    assert s["attainment"] == pytest.approx(0.75)
    assert s["violations"] == pytest.approx(0.25)
    assert s["goodput_tokens_per_s"] == pytest.approx(20.5)
    assert s["throughput_tokens_per_s"] == pytest.approx(61 / 2)
    assert s["selection_overhead"] == pytest.approx(0.01)
    assert s["iterations"] == 3
    assert s["ttft_p50_ms"] == pytest.approx(50.0)
    assert s["tpot_p50_ms"] == pytest.approx(12.5)  # median of 12, 12.5, 16
    coding = s["per_category"]["coding"]
    assert coding["attainment"] == pytest.approx(0.5)
    assert coding["goodput_tokens_per_s"] == pytest.approx(5.0)
    assert coding["tpot_p99_ms"] == pytest.approx(12.0 + 0.99 * 0.5)
    assert s["per_category"]["summarization"]["tpot_p50_ms"] is None
    assert set(s["per_category"]) == {"coding", "chat", "summarization"}

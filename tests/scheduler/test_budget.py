"""Budget rule: latency interpolation, profile validation, bucket choice from drafted trees."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaserve_jax.engine.tree import TreeShape
from adaserve_jax.scheduler.budget import (
    LatencyCurve,
    LatencyProfile,
    choose_budget_from_trees,
)

VERIFY = {1: 3.5, 2: 5.6, 4: 8.7, 8: 9.0, 16: 13.0, 32: 16.0, 64: 20.0, 128: 35.0, 256: 60.0}
LOOSE = [0.15]


def profile(draft=None) -> LatencyProfile:
    return LatencyProfile.from_tables(VERIFY, draft)


# ---------------------------------------------------------------- interpolation


def test_latency_interpolation():
    curve = LatencyCurve.from_dict(VERIFY)
    assert curve.latency_ms(8) == 9.0
    assert curve.latency_ms(3) == pytest.approx((5.6 + 8.7) / 2)
    assert curve.latency_ms(48) == pytest.approx(18.0)
    assert curve.latency_ms(0) == 3.5 and curve.latency_ms(0.5) == 3.5  # pads up to bucket 1
    assert curve.latency_ms(512) == pytest.approx(60.0 + 256 * 25.0 / 128)  # last slope
    out = curve.latency_ms(np.array([1, 2, 6]))
    assert out.tolist() == pytest.approx([3.5, 5.6, 8.85])


def test_per_token_curve_is_proportional():
    curve = LatencyCurve.per_token(0.25)
    assert curve.latency_ms(1) == 0.25 and curve.latency_ms(40) == pytest.approx(10.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 1024), min_size=1, max_size=8, unique=True),
    st.lists(st.floats(0, 50), min_size=8, max_size=8),
    st.lists(st.floats(0, 3000), min_size=2, max_size=20),
)
def test_interpolation_is_monotone(tokens, steps, queries):
    tokens = sorted(tokens)
    ms = np.cumsum(steps[: len(tokens)]).tolist()
    curve = LatencyCurve(tuple(tokens), tuple(ms))
    q = np.sort(np.array(queries))
    vals = curve.latency_ms(q)
    assert np.all(np.diff(vals) >= -1e-9)
    for t, m in zip(tokens, ms, strict=True):
        assert curve.latency_ms(t) == pytest.approx(m)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("tokens", "ms", "field"),
    [
        ((), (), "tokens"),
        ((1, 2), (1.0,), "ms"),
        ((0, 2), (1.0, 2.0), "tokens"),
        ((-4,), (1.0,), "tokens"),
        ((4, 2), (1.0, 2.0), "tokens"),
        ((2, 2), (1.0, 2.0), "tokens"),
        ((1, 2), (1.0, float("nan")), "ms"),
        ((1, 2), (-1.0, 2.0), "ms"),
        ((1, 2, 4), (3.0, 2.0, 4.0), "ms"),
    ],
)
def test_curve_validation(tokens, ms, field):
    with pytest.raises(ValueError, match=field):
        LatencyCurve(tokens, ms)


def test_from_measurements_smooths_noise():
    curve = LatencyCurve.from_measurements({1: 3.5, 4: 8.7, 8: 8.5, 16: 13.0})
    assert curve.ms == (3.5, 8.7, 8.7, 13.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        LatencyCurve.from_dict({1: 3.5, 4: 8.7, 8: 8.5})


def test_profile_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="host_ms"):
        LatencyProfile(LatencyCurve.from_dict(VERIFY), host_ms=-1.0)
    with pytest.raises(ValueError, match="verify"):
        LatencyProfile(VERIFY)  # type: ignore[arg-type]
    prof = LatencyProfile.from_tables(VERIFY, {1: 0.5, 64: 2.0}, host_ms=0.3)
    again = LatencyProfile.from_json_dict(json.loads(json.dumps(prof.to_json_dict())))
    assert again == prof
    assert prof.buckets == tuple(VERIFY)
    assert LatencyProfile.from_tables(VERIFY, 0.1).draft == LatencyCurve.per_token(0.1)


def test_expansion_call_prices():
    """The measured expansion call of a shape: the smallest row bucket holding the rows (the
    largest past them); None for a shape the profile did not measure. Survives the JSON
    round trip; a malformed table is refused."""
    prof = LatencyProfile.from_tables(
        VERIFY, {1: 0.5}, expand_ms={"4,1,2": {"1": 2.0, "4": 2.5, "16": 4.0}, (2, 2, 2): {1: 1.0}}
    )
    four = TreeShape(depth=4, width=1, topk=2)
    assert [prof.expand_call_ms(four, r) for r in (1, 2, 4, 5, 16, 40)] == [
        2.0, 2.5, 2.5, 4.0, 4.0, 4.0,
    ]  # fmt: skip
    assert prof.expand_call_ms(TreeShape(depth=2, width=2, topk=2), 3) == 1.0
    assert prof.expand_call_ms(TreeShape(depth=3, width=1, topk=2), 1) is None
    assert LatencyProfile.from_tables(VERIFY, {1: 0.5}).expand_call_ms(four, 1) is None
    again = LatencyProfile.from_json_dict(json.loads(json.dumps(prof.to_json_dict())))
    assert again == prof and again.expand_call_ms(four, 3) == 2.5
    for bad in ({"4,1,2": {"4": 1.0, "1": float("nan")}}, {"4,1,2": {"0": 1.0}}):
        with pytest.raises(ValueError, match="expand entry"):
            LatencyProfile.from_tables(VERIFY, {1: 0.5}, expand_ms=bad)


# ---------------------------------------------------------------- choosing the budget


def chains(n: int, alpha: float, depth: int = 8) -> np.ndarray:
    """log f of n chains whose every drafted node is accepted with probability alpha."""
    return np.tile(np.arange(depth + 1) * np.log(alpha), (n, 1)).astype(np.float32)


def E(alpha: float, k: int) -> float:
    return (1 - alpha**k) / (1 - alpha)


def test_light_load_picks_a_small_budget():
    choice = choose_budget_from_trees(profile(), chains(1, 0.7), LOOSE, max_budget=256)
    # B = 1, 2, 4, 8: E = 1, 1.7, 2.53, 3.14 (a 9-node chain) per 3.5, 5.6, 8.7, 9 ms;
    # 16+ adds nothing: 8 wins (.349 tokens/ms)
    assert choice.budget == 8 and choice.fits_slo
    assert choice.t_iter_s == pytest.approx(0.009)
    assert choice.expected_accepted == pytest.approx(E(0.7, 8), rel=1e-6)
    assert choice.tokens_per_s == pytest.approx(E(0.7, 8) / 0.009, rel=1e-6)


def test_lone_request_with_poor_acceptance_does_not_speculate():
    # alpha 0.2: E(2) = 1.2 does not pay for 3.5 -> 5.6 ms; E(8) = 1.25 does not pay for 9 ms.
    assert choose_budget_from_trees(profile(), chains(1, 0.2), LOOSE, max_budget=256).budget == 1


@pytest.mark.parametrize("n", [8, 16, 24])
def test_heavier_load_picks_the_flat_region(n):
    prof = LatencyProfile.cpu_reference()
    choice = choose_budget_from_trees(prof, chains(n, 0.7), [0.05, 0.15] * (n // 2), max_budget=256)
    assert choice.fits_slo
    assert 16 <= choice.budget <= 64  # where latency is nearly flat (13 -> 20 ms)
    assert choice.budget > n  # speculation is worth it there


def test_slo_constraint_binds_before_throughput_optimum():
    f = chains(16, 0.7)
    # loose: the optimum is 64 (20 ms, 4 nodes per request: E = 2.53 each)
    assert choose_budget_from_trees(profile(), f, LOOSE * 16, max_budget=256).budget == 64
    # A 6 ms TPOT target allows t_iter <= 6 ms * E: nothing fits, fallback to the best rate
    tight = choose_budget_from_trees(profile(), f, [0.006] * 16, max_budget=256)
    assert not tight.fits_slo and tight.budget == 64
    # 8 ms: 32 -> 16 <= 13.6 no; 64 -> 20 <= 20.3 yes.
    assert choose_budget_from_trees(profile(), f, [0.008] * 16, max_budget=256).fits_slo
    # A margin of 0.9 rules 64 out again.
    assert not choose_budget_from_trees(
        profile(), f, [0.008] * 16, max_budget=256, slo_margin=0.9
    ).fits_slo


def test_draft_cost_is_priced_in_except_for_roots_only():
    f = chains(1, 0.7)
    cheap = choose_budget_from_trees(profile(), f, LOOSE, max_budget=256, draft_ms=0.5)
    assert cheap.budget == 8 and cheap.t_iter_s == pytest.approx(0.0095)
    # costly drafting pushes a lone request back to plain decoding, priced without the draft
    heavy = choose_budget_from_trees(profile(), f, LOOSE, max_budget=256, draft_ms=20.0)
    assert heavy.budget == 1 and heavy.t_iter_s == pytest.approx(0.0035)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 200),
    st.floats(0.0, 0.95),
    st.lists(st.floats(0.001, 0.5), min_size=1, max_size=8),
    st.floats(0.0, 5.0),
    st.integers(0, 64),
)
def test_choice_is_a_feasible_argmax(n, alpha, slos, draft_ms, prefill):
    prof = LatencyProfile.cpu_reference()
    slos = (slos * n)[:n]
    f = chains(n, max(alpha, 1e-6), depth=4)
    choice = choose_budget_from_trees(
        prof, f, slos, max_budget=256, draft_ms=draft_ms, prefill_tokens=prefill
    )
    cands = [b for b in prof.buckets if n <= b <= 256] or [n]
    assert choice.budget in cands
    assert math.isfinite(choice.tokens_per_s) and choice.tokens_per_s > 0
    if choice.fits_slo:
        assert choice.t_iter_s <= min(slos) * choice.expected_accepted / n + 1e-12
    for b in cands:  # no candidate in the same feasibility class has a higher rate
        other = choose_budget_from_trees(
            prof, f, slos, max_budget=b, draft_ms=draft_ms, prefill_tokens=prefill
        )
        if other.budget == b and other.fits_slo == choice.fits_slo:
            assert other.tokens_per_s <= choice.tokens_per_s + 1e-9


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(log_f=np.zeros(3)), "log_f"),
        (dict(tpot_slos_s=[]), "tpot_slos_s"),
        (dict(tpot_slos_s=[0.0, 0.1]), "tpot_slos_s"),
        (dict(tpot_slos_s=[float("nan"), 0.1]), "tpot_slos_s"),
        (dict(prefill_tokens=-1), "prefill_tokens"),
        (dict(prefill_tokens=1.5), "prefill_tokens"),
    ],
)
def test_choose_budget_validation(kwargs, field):
    args = dict(profile=profile(), log_f=chains(2, 0.7), tpot_slos_s=LOOSE * 2, max_budget=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        choose_budget_from_trees(**args)


def test_budget_from_trees_reads_expected_tokens_off_the_trees():
    prof = LatencyProfile.from_tables({2: 10.0, 4: 10.0, 8: 40.0})
    # two requests: roots (f=1) plus two confident nodes each, then unlikely ones
    log_f = np.log(np.array([[1.0, 0.9, 0.8, 0.01, 0.01], [1.0, 0.9, 0.8, 0.01, 0.01]]))
    loose = choose_budget_from_trees(prof, log_f, [1.0, 1.0], max_budget=8)
    assert loose.budget == 4  # 2 + 1.8 tokens in 10 ms beats 2 in 10 ms and 5.64 in 40 ms
    assert abs(loose.expected_accepted - 3.8) < 1e-9 and loose.fits_slo
    # SLO too tight for any bucket: fall back to the best throughput, not to roots only
    tight = choose_budget_from_trees(prof, log_f, [1e-4, 1.0], max_budget=8)
    assert tight.budget == 4 and not tight.fits_slo
    # the caller's cap wins
    assert choose_budget_from_trees(prof, log_f, [1.0, 1.0], max_budget=2).budget == 2


def test_budget_from_trees_prices_the_prefill_riding_in_the_step():
    prof = LatencyProfile.from_tables({2: 10.0, 4: 10.0, 8: 40.0, 16: 80.0})
    log_f = np.log(np.array([[1.0, 0.9, 0.8, 0.01, 0.01], [1.0, 0.9, 0.8, 0.01, 0.01]]))
    alone = choose_budget_from_trees(prof, log_f, [1.0, 1.0], max_budget=16)
    busy = choose_budget_from_trees(prof, log_f, [1.0, 1.0], max_budget=16, prefill_tokens=4)
    assert alone.t_iter_s == pytest.approx(0.010)
    assert busy.budget == 4 and busy.t_iter_s == pytest.approx(0.040)  # verify(4 + 4)
    with pytest.raises(ValueError, match="prefill_tokens"):
        choose_budget_from_trees(prof, log_f, [1.0, 1.0], max_budget=16, prefill_tokens=-1)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 12),
    st.floats(0.002, 0.2),
    st.floats(0.0, 5.0),
)
def test_choice_is_feasible_first_then_rate_then_the_smaller_budget(seed, n, slo, draft_ms):
    """The pick against a brute force over the candidates: feasible budgets first, then the
    highest E_tot / t_iter, then the smallest budget (equal rates: a flat profile)."""
    rng = np.random.default_rng(seed)
    log_f = np.log(rng.random((n, 9)) ** 2 + 1e-9).astype(np.float32)
    log_f[:, 0] = 0.0
    log_f = np.minimum.accumulate(log_f, axis=1)  # non-increasing along each chain
    # a flat profile up to 32: with fewer than 16 drafted nodes (n = 1), 16 and 32 tie
    flat = {1: 5.0, 2: 5.0, 4: 5.0, 8: 5.0, 16: 5.0, 32: 5.0, 64: 20.0}
    prof = LatencyProfile.from_tables(flat)
    choice = choose_budget_from_trees(prof, log_f, [slo] * n, max_budget=64, draft_ms=draft_ms)
    cum = np.cumsum(np.sort(np.exp(log_f.astype(np.float64)), axis=None)[::-1])
    cands = [b for b in flat if n <= b <= 64] or [n]
    rows = []
    for b in cands:
        t = (flat.get(b, 0.0) + (draft_ms if b > n else 0.0)) / 1e3
        total = cum[min(b, cum.size) - 1]
        rows.append((t <= slo * total / n, total / t, -b))
    best = max(rows)
    assert (choice.fits_slo, -choice.budget) == (best[0], best[2])
    assert choice.tokens_per_s == pytest.approx(best[1], rel=1e-9)

"""Budget rule: latency interpolation, profile validation, acceptance fit, bucket choice."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaserve_jax.scheduler.budget import (
    GeometricAcceptance,
    LatencyCurve,
    LatencyProfile,
    choose_budget,
    iteration_latency_s,
)
from adaserve_jax.scheduler.tree_shape import TreeShapeConfig

VERIFY = {1: 3.5, 2: 5.6, 4: 8.7, 8: 9.0, 16: 13.0, 32: 16.0, 64: 20.0, 128: 35.0, 256: 60.0}
ACC = GeometricAcceptance(0.7)
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


# ---------------------------------------------------------------- acceptance model


def test_geometric_acceptance():
    acc = GeometricAcceptance(0.5)
    assert acc(1) == 1.0 and acc(0.3) == 1.0
    assert acc(2) == pytest.approx(1.5) and acc(3) == pytest.approx(1.75)
    assert GeometricAcceptance(0.0)(10) == 1.0
    with pytest.raises(ValueError, match="alpha"):
        GeometricAcceptance(1.0)


def test_acceptance_fit_recovers_alpha():
    rng = np.random.default_rng(0)
    k = rng.integers(1, 16, 400).astype(float)
    truth = GeometricAcceptance(0.62)
    acc = np.array([truth(x) for x in k]) + rng.normal(0, 0.05, k.size)
    assert GeometricAcceptance.fit(k, acc).alpha == pytest.approx(0.62, abs=0.01)
    with pytest.raises(ValueError):
        GeometricAcceptance.fit([], [])


# ---------------------------------------------------------------- choosing the budget


def test_light_load_picks_a_small_budget():
    choice = choose_budget(profile(), 1, ACC, LOOSE)
    # B = 1, 2, 4, 8, 16: E = 1, 1.7, min(2.53, depth 1 + 1), 3.14, 3.33 per 3.5, 5.6, 8.7, 9,
    # 13 ms -> .286, .304, .230, .349, .256 tokens/ms: 8 wins.
    assert choice.budget == 8 and choice.fits_slo
    assert choice.t_iter_s == pytest.approx(0.009)
    assert choice.expected_accepted == pytest.approx(ACC(8))
    assert choice.tokens_per_s == pytest.approx(ACC(8) / 0.009)


def test_lone_request_with_poor_acceptance_does_not_speculate():
    # alpha 0.2: E(2) = 1.2 does not pay for 3.5 -> 5.6 ms; E(8) = 1.25 does not pay for 9 ms.
    assert choose_budget(profile(), 1, GeometricAcceptance(0.2), LOOSE).budget == 1


@pytest.mark.parametrize("n", [8, 16, 24])
def test_heavier_load_picks_the_flat_region(n):
    prof = LatencyProfile.cpu_reference()
    choice = choose_budget(prof, n, ACC, [0.05, 0.15] * n)
    assert choice.fits_slo
    assert 16 <= choice.budget <= 64  # where latency is nearly flat (13 -> 20 ms)
    assert choice.budget > n  # speculation is worth it there


def test_slo_too_tight_picks_smallest_bucket_at_least_n():
    choice = choose_budget(profile(), 3, ACC, [0.15, 0.001, 0.15])
    assert choice.budget == 4 and not choice.fits_slo
    assert choice.t_iter_s == pytest.approx(0.0087)  # no draft timing in this profile
    assert choose_budget(profile(), 16, ACC, [0.002]).budget == 16


def test_slo_constraint_binds_before_throughput_optimum():
    # n = 16, loose: the optimum is 64 (20 ms, E = 2.53 per request).
    assert choose_budget(profile(), 16, ACC, LOOSE).budget == 64
    # A 6 ms TPOT target allows t_iter <= 6 ms * E: 16 -> 13 > 6, 32 -> 16 > 10.2, 64 -> 20 > 15.2,
    # 128 -> 35 > 18.8, 256 -> 60 > 20: nothing fits, fallback.
    assert not choose_budget(profile(), 16, ACC, [0.006]).fits_slo
    # 8 ms: 32 -> 16 <= 13.6 no; 64 -> 20 <= 20.3 yes.
    assert choose_budget(profile(), 16, ACC, [0.008]).budget == 64
    # A margin of 0.9 rules 64 out again.
    assert not choose_budget(profile(), 16, ACC, [0.008], slo_margin=0.9).fits_slo


def test_draft_cost_is_priced_in():
    shape = TreeShapeConfig(verify_budget=64, draft_budget=32, c1=1, max_depth=8, max_width=4)
    prof = profile(draft={1: 1.0, 64: 4.0})
    t, tree = iteration_latency_s(prof, 8, 1, shape)
    assert tuple(tree) == (3, 4)  # floor(8 / 2) - 1 = 3; width min(32, 4)
    assert t == pytest.approx((9.0 + 3 * (1.0 + 3 * 3.0 / 63)) / 1e3)
    t1, tree1 = iteration_latency_s(prof, 4, 4, shape)
    assert tree1.depth == 0 and t1 == pytest.approx(0.0087)  # roots only: no drafting
    # Costly drafting pushes a lone request back to plain decoding.
    heavy = profile(draft=5.0)  # 5 ms per draft token
    assert choose_budget(heavy, 1, ACC, LOOSE, shape=shape).budget == 1


def test_expected_tokens_capped_by_tree_depth():
    shape = TreeShapeConfig(max_depth=1)
    choice = choose_budget(profile(), 1, GeometricAcceptance(0.95), LOOSE, shape=shape)
    assert choice.expected_accepted <= 2.0


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 256),
    st.floats(0.0, 0.95),
    st.lists(st.floats(0.001, 0.5), min_size=1, max_size=8),
)
def test_choice_is_a_feasible_argmax(n, alpha, slos):
    prof = LatencyProfile.cpu_reference()
    acc = GeometricAcceptance(alpha)
    choice = choose_budget(prof, n, acc, slos)
    assert choice.budget in prof.buckets and choice.budget >= n
    if choice.fits_slo:
        assert choice.t_iter_s <= min(slos) * choice.expected_accepted / n + 1e-12
    else:
        assert choice.budget == min(b for b in prof.buckets if b >= n)
    assert math.isfinite(choice.tokens_per_s) and choice.tokens_per_s > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(num_requests=0), "num_requests"),
        (dict(num_requests=300), "num_requests"),
        (dict(tpot_slos_s=[]), "tpot_slos_s"),
        (dict(tpot_slos_s=[0.0]), "tpot_slos_s"),
        (dict(tpot_slos_s=[float("nan")]), "tpot_slos_s"),
        (dict(slo_margin=0.0), "slo_margin"),
        (dict(acceptance=lambda k: 0.5), "acceptance"),
    ],
)
def test_choose_budget_validation(kwargs, field):
    args = dict(profile=profile(), num_requests=2, acceptance=ACC, tpot_slos_s=LOOSE)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        choose_budget(**args)


def test_budget_from_trees_reads_expected_tokens_off_the_trees():
    from adaserve_jax.scheduler.budget import LatencyProfile, choose_budget_from_trees

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
    from adaserve_jax.scheduler.budget import LatencyProfile, choose_budget_from_trees

    prof = LatencyProfile.from_tables({2: 10.0, 4: 10.0, 8: 40.0, 16: 80.0})
    log_f = np.log(np.array([[1.0, 0.9, 0.8, 0.01, 0.01], [1.0, 0.9, 0.8, 0.01, 0.01]]))
    alone = choose_budget_from_trees(prof, log_f, [1.0, 1.0], max_budget=16)
    busy = choose_budget_from_trees(prof, log_f, [1.0, 1.0], max_budget=16, prefill_tokens=4)
    assert alone.t_iter_s == pytest.approx(0.010)
    assert busy.budget == 4 and busy.t_iter_s == pytest.approx(0.040)  # verify(4 + 4)
    with pytest.raises(ValueError, match="prefill_tokens"):
        choose_budget_from_trees(prof, log_f, [1.0, 1.0], max_budget=16, prefill_tokens=-1)

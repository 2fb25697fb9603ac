"""The scatter's memory a bench records (`speed_corr_ms`, bench/speed_memory.py)."""

import math

import numpy as np
import pytest

from adaserve_jax.bench.speed_memory import (
    MIN_CALLS,
    correlation_time_ms,
    lag_correlations,
    normal_scores,
)


def ou_calls(tau_ms: float, n: int, gap_ms: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calls every `gap_ms` whose log ratio follows an Ornstein-Uhlenbeck process."""
    rng = np.random.default_rng(seed)
    keep = math.exp(-gap_ms / tau_ms) if tau_ms > 0 else 0.0
    z = np.empty(n)
    z[0] = rng.standard_normal()
    for i in range(1, n):
        z[i] = keep * z[i - 1] + math.sqrt(1 - keep * keep) * rng.standard_normal()
    return np.arange(n) * gap_ms / 1e3, np.exp(0.2 * z)


@pytest.mark.parametrize("tau_ms", [5.0, 20.0, 60.0])
def test_fit_recovers_the_time_constant(tau_ms):
    """Calls 8 ms apart (this VM's light-load decode steps), four replays pooled."""
    rounds = [ou_calls(tau_ms, 1500, 8.0, seed) for seed in range(4)]
    fit = correlation_time_ms(rounds)
    assert 0.75 * tau_ms < fit < 1.33 * tau_ms


def test_independent_calls_have_no_memory_and_few_calls_no_estimate():
    rng = np.random.default_rng(0)
    t = np.arange(3000) * 0.008
    fit = correlation_time_ms([(t, rng.lognormal(0, 0.2, t.size))])
    assert fit < 2.0  # at most a small fraction of the 8 ms between calls
    assert correlation_time_ms([(t[: MIN_CALLS - 1], np.ones(MIN_CALLS - 1))]) is None
    # a monotone rank sequence alternating high and low: negative at lag 1 -> no memory
    alt = np.where(np.arange(200) % 2, 2.0, 0.5) * (1 + np.arange(200) / 1e4)
    assert correlation_time_ms([(t[:200], alt)]) == 0.0


def test_lags_stay_inside_each_replay_and_scores_are_normal():
    """Two replays: lag pairs never span them (a 3-call replay has no lag-3 pair, so lag 3
    comes from the other alone), and the pooled scores are standard normal quantiles of the
    ranks."""
    a = (np.array([0.0, 0.01, 0.02]), np.array([1.0, 2.0, 3.0]))
    b = (np.array([0.0, 0.05, 0.10, 0.15, 0.20]), np.array([5.0, 4.0, 6.0, 7.0, 8.0]))
    acf, gaps = lag_correlations([a, b], max_lag=6)
    assert acf.size == gaps.size == 4  # lag 5 reaches no replay
    np.testing.assert_allclose(gaps, [0.05, 0.10, 0.15, 0.20], atol=1e-12)  # b's lags (median)
    z = normal_scores(np.array([3.0, 1.0, 2.0]))
    np.testing.assert_allclose(z, [0.6744897501960817, -0.6744897501960817, 0.0], atol=1e-12)

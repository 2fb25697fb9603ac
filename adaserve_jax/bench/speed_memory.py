"""How long a device call's deviation from its second's speed persists (bench `speed_corr_ms`).

A replay's per-second `speed_trace` holds each second's mean speed and `speed_scatter` how
single calls stray from it, but not their order. On this VM slow calls come in spells: the
calls' deviations from their second's speed correlate 0.44 with the next call's (8.7 ms
later) and 0.15 with the fifth's (one autoregressive replay at light load). Independent
draws spread such a spell over every request's steps, costing each a little; in the real run
it costs the few requests decoding through it a lot, which moves SLO attainment
(SIMULATION.md, "Correlated scatter").

`correlation_time_ms` fits that memory as one time constant tau: each call's residual (its
wall time over price, over its second's time-weighted ratio, as in `speed_scatter`) is turned
into a normal score (its rank's standard normal quantile), and the autocorrelation of the
scores at lags of 1..`max_lag` calls (pooled over the replays) is fitted by exp(-gap / tau),
gap being the lag's median time between call starts (least squares over a log grid of tau).
That is the model the simulator draws from (sim/engine.py `SimEngine._factor`: a latent
Ornstein-Uhlenbeck normal with this tau, mapped through the scatter's quantiles).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

MIN_CALLS = 50  # fewer calls than this give no estimate
TAU_GRID_MS = np.geomspace(0.1, 1e4, 601)


def normal_scores(x: np.ndarray) -> np.ndarray:
    """f64[n]: each value's rank (ties by order) as a standard normal quantile."""
    ranks = np.empty(x.size)
    ranks[np.argsort(x, kind="stable")] = np.arange(1, x.size + 1)
    inv = NormalDist().inv_cdf
    return np.array([inv(r / (x.size + 1)) for r in ranks])


def lag_correlations(
    rounds: Sequence[tuple[np.ndarray, np.ndarray]], max_lag: int
) -> tuple[np.ndarray, np.ndarray]:
    """rounds: per replay, (call start times in s, residual ratios), in call order.

    Returns (acf f64[L], gap_s f64[L]) for lags 1..L (L <= max_lag: lags no round reaches
    are left out): the scores' autocorrelation pooled over the rounds, and the median time
    between a call's start and that of the call `lag` later."""
    scored = [(np.asarray(t, np.float64), np.asarray(r, np.float64)) for t, r in rounds]
    pooled = np.concatenate([r for _, r in scored])
    z_all = normal_scores(np.log(pooled))
    z_all -= z_all.mean()
    zs, start = [], 0
    for t, r in scored:
        zs.append((t, z_all[start : start + r.size]))
        start += r.size
    var = float(np.dot(z_all, z_all))
    acf, gaps = [], []
    for lag in range(1, max_lag + 1):
        num, d = 0.0, []
        for t, z in zs:
            if z.size > lag:
                num += float(np.dot(z[:-lag], z[lag:]))
                d.append(t[lag:] - t[:-lag])
        if not d:
            break
        acf.append(num / var if var > 0 else 0.0)
        gaps.append(float(np.median(np.concatenate(d))))
    return np.array(acf), np.array(gaps)


def correlation_time_ms(
    rounds: Sequence[tuple[np.ndarray, np.ndarray]], max_lag: int = 10
) -> float | None:
    """The fitted tau in ms (0.0: no positive memory at lag 1), or None with fewer than
    `MIN_CALLS` calls (see the module docstring)."""
    if sum(np.asarray(r).size for _, r in rounds) < MIN_CALLS:
        return None
    acf, gaps = lag_correlations(rounds, max_lag)
    if not acf.size or acf[0] <= 0:
        return 0.0
    gaps_ms = np.maximum(gaps, 1e-6)[None, :] * 1e3
    model = np.exp(-gaps_ms / TAU_GRID_MS[:, None])
    err = ((model - acf[None, :]) ** 2).sum(axis=1)
    return round(float(TAU_GRID_MS[int(np.argmin(err))]), 2)

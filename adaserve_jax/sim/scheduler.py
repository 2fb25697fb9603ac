"""The shared `Scheduler` with one host-time fix that changes no decision (numpy only).

`Scheduler._observe_acceptance` (scheduler/loop.py) refits the geometric acceptance model
inside the per-request commit loop, so on a refit iteration (every 32nd) it runs
`GeometricAcceptance.fit` once *per decoding request* — 64 fits of ~15 ms each with 64
running requests. Only the last fit of the iteration is ever used (the model is read by the
next iteration's budget rule), so `SimScheduler` records the samples exactly as the stock
method does and fits once, after the iteration, on the same samples. The fit itself groups
samples by their verified-token count (a handful of distinct values) before the same
999-point grid search, so it returns the same alpha up to floating-point summation order.

Every other line of the scheduler (admission, budget rule, selection, acceptance walk, KV
bookkeeping) is the shared code; `tests/sim/test_sim.py` checks that a replay with
`SimScheduler` and with the stock `Scheduler` produce identical request outputs and
timings. The same change belongs in loop.py (reported in SIMULATION.md).
"""

from __future__ import annotations

import numpy as np

from adaserve_jax.scheduler.budget import GeometricAcceptance
from adaserve_jax.scheduler.loop import Scheduler

_ALPHAS = np.arange(0.0, 0.999, 0.001)[:, None]  # [G, 1], the grid of GeometricAcceptance.fit


def fit_geometric(tokens_per_request, accepted) -> GeometricAcceptance:
    """`GeometricAcceptance.fit` with samples grouped by distinct k (same grid, same argmin)."""
    k = np.maximum(np.asarray(tokens_per_request, dtype=np.float64), 1.0)
    acc = np.asarray(accepted, dtype=np.float64)
    ks, inv = np.unique(k, return_inverse=True)
    n = np.bincount(inv, minlength=ks.size).astype(np.float64)  # samples per k
    s = np.bincount(inv, weights=acc, minlength=ks.size)  # sum of accepted per k
    pred = (1.0 - _ALPHAS**ks) / (1.0 - _ALPHAS)  # [G, K]
    sse = (n * pred * pred - 2.0 * s * pred).sum(axis=1) + float((acc * acc).sum())
    return GeometricAcceptance(float(_ALPHAS[np.argmin(sse), 0]))


class SimScheduler(Scheduler):
    """`Scheduler` fitting the acceptance model once per refit iteration (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._refit_due = False

    def _observe_acceptance(self, verified: int, accepted: int) -> None:
        self._acc_samples.append((verified, accepted + 1))
        if len(self._acc_samples) >= 16 and self.iterations % 32 == 0:
            self._refit_due = True

    def step(self) -> None:
        super().step()
        if self._refit_due:
            self._refit_due = False
            k, a = zip(*self._acc_samples, strict=True)
            self.acceptance = fit_geometric(k, a)

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

import time

import numpy as np

from adaserve_jax.engine.tree import DraftTrees
from adaserve_jax.scheduler.budget import GeometricAcceptance, choose_budget
from adaserve_jax.scheduler.loop import NO_SLO_MS, Scheduler
from adaserve_jax.scheduler.request import RequestState
from adaserve_jax.scheduler.selector import SelectionInput, select
from adaserve_jax.scheduler.tree_shape import TreeShapeConfig

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

    def __init__(self, *args, budget_fallback: str = "stock", **kwargs) -> None:
        if budget_fallback not in ("stock", "throughput"):
            raise ValueError(f"{budget_fallback=} must be 'stock' or 'throughput'")
        super().__init__(*args, **kwargs)
        self._refit_due = False
        self.budget_fallback = budget_fallback

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

    def _adaserve_select(self, decode: list[RequestState], trees: DraftTrees) -> list[np.ndarray]:
        """Stock selection, or (experiment, `budget_fallback="throughput"`) the same with one
        change to the budget rule: when no bucket meets the tightest SLO, take the bucket with
        the most expected tokens per second instead of the smallest bucket."""
        if self.budget_fallback == "stock" or self.profile is None:
            return super()._adaserve_select(decode, trees)
        t0 = time.perf_counter()
        shape = self.policy.shape
        n = len(decode)
        now = self.clock()
        slos = np.array([(r.request.tpot_slo_ms or NO_SLO_MS) / 1e3 for r in decode])
        avail = max(self.token_budget - self._prefill_tokens, n)
        cfg = TreeShapeConfig(
            verify_budget=self.token_budget, draft_budget=1 << 20, min_depth=shape.depth,
            max_depth=shape.depth, max_width=shape.width,
        )  # fmt: skip
        choice = choose_budget(self.profile, n, self.acceptance, slos, shape=cfg)
        if not choice.fits_slo:
            choice = choose_budget(self.profile, n, self.acceptance, slos, shape=cfg,
                                   slo_margin=1e12)  # fmt: skip
        budget, t_iter = max(min(choice.budget, avail), n), choice.t_iter_s
        rows = np.array([r.slot for r in decode])
        sel = select(
            SelectionInput(
                parents=trees.parents[rows],
                log_f=trees.log_f[rows],
                num_nodes=np.full(n, trees.tokens.shape[1]),
                decoded=np.array([max(len(r.output) - 1, 0) for r in decode]),
                elapsed_s=np.array([now - (r.first_token_time or now) for r in decode]),
                tpot_slo_s=slos,
                budget=int(budget),
                t_iter_s=float(t_iter),
                max_depth=shape.depth,
            )
        )
        self._select_seconds += time.perf_counter() - t0
        return list(sel.nodes)

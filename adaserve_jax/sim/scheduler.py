"""Two opt-in scheduling experiments on top of the shared `Scheduler` (numpy only).

`SimScheduler()` with default arguments *is* the shared scheduler (scheduler/loop.py); the
simulator uses it so that experiments are flags, never a fork. (An earlier version carried a
host-time fix here, one acceptance refit per iteration instead of one per request; it is
upstream now, commit e3cc563.) The experiments, each one changed line of the AdaServe path,
measure two findings of the paper-scale simulation (SIMULATION.md):

- `budget_fallback="throughput"`: when no budget bucket meets the tightest SLO, the budget
  rule takes the bucket with the most expected tokens per second instead of the smallest.
- `decode_reserve="tree"`: AdaServe reserves every decoding request's whole candidate tree
  (as the fixed policies reserve theirs) before chunked prefill takes the rest of the token
  budget; stock AdaServe reserves only the roots, so a busy prefill queue leaves it
  roots-only steps.
- `fair_cap=c`: pass the selector's existing `node_cap` = ceil(c x budget / n) per request
  (stock passes none), so the SLO phase cannot hand whole trees to the most-behind requests.
- `fixed_alpha=a`: the budget rule's acceptance model is `GeometricAcceptance(a)`, never
  refitted (stock refits a geometric chain model to the trees AdaServe itself selected).
"""

from __future__ import annotations

import time

import numpy as np

from adaserve_jax.engine.tree import DraftTrees
from adaserve_jax.scheduler.budget import GeometricAcceptance, choose_budget
from adaserve_jax.scheduler.loop import NO_SLO_MS, Scheduler
from adaserve_jax.scheduler.policy import PolicyKind
from adaserve_jax.scheduler.request import RequestState
from adaserve_jax.scheduler.selector import SelectionInput, select
from adaserve_jax.scheduler.tree_shape import TreeShapeConfig


class SimScheduler(Scheduler):
    """The shared `Scheduler` plus the opt-in experiments of the module docstring."""

    def __init__(
        self,
        *args,
        budget_fallback: str = "stock",
        decode_reserve: str = "stock",
        fixed_alpha: float | None = None,
        fair_cap: float | None = None,
        **kwargs,
    ) -> None:
        if budget_fallback not in ("stock", "throughput"):
            raise ValueError(f"{budget_fallback=} must be 'stock' or 'throughput'")
        if decode_reserve not in ("stock", "tree"):
            raise ValueError(f"{decode_reserve=} must be 'stock' or 'tree'")
        self.decode_reserve = decode_reserve
        super().__init__(*args, **kwargs)
        self.budget_fallback = budget_fallback
        self.fixed_alpha = fixed_alpha
        self.fair_cap = fair_cap
        if fixed_alpha is not None:
            self.acceptance = GeometricAcceptance(fixed_alpha)

    def _refit_acceptance(self) -> None:
        if self.fixed_alpha is None:
            super()._refit_acceptance()

    def _decode_reserve(self, decode: list[RequestState]) -> int:
        """Stock, or (experiment, `decode_reserve="tree"`) for AdaServe: keep room for every
        decoding request's whole candidate tree before chunked prefill takes the rest, as
        the fixed policies do (stock AdaServe reserves only the roots)."""
        shape = self.policy.shape
        stock = super()._decode_reserve(decode)
        if self.decode_reserve == "stock" or self.policy.kind is not PolicyKind.ADASERVE:
            return stock
        return max(stock, min(self.token_budget, len(decode) * shape.num_nodes))

    def _adaserve_select(self, decode: list[RequestState], trees: DraftTrees) -> list[np.ndarray]:
        """Stock selection, or (experiment, `budget_fallback="throughput"`) the same with one
        change to the budget rule: when no bucket meets the tightest SLO, take the bucket with
        the most expected tokens per second instead of the smallest bucket."""
        if (self.budget_fallback == "stock" and self.fair_cap is None) or self.profile is None:
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
        if not choice.fits_slo and self.budget_fallback == "throughput":
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
                node_cap=None
                if self.fair_cap is None
                else max(2, int(np.ceil(self.fair_cap * budget / n))),
            )
        )
        self._select_seconds += time.perf_counter() - t0
        return list(sel.nodes)

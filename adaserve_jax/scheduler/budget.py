"""Hardware-aware token budget: how many tokens the next verify step should carry.

Inputs: a latency profile measured at start-up (verify-step latency per token-count bucket and,
optionally, draft-step latency), the number `n` of running requests, an acceptance model
`E(k)` = expected accepted tokens per request (bonus included) when `k` tokens (root included)
are verified for it, and the running requests' TPOT SLOs.

The rule (DESIGN.md §4 leaves it open; this is the one we use):

    candidates  B in profile buckets with B >= n              (every request needs its root)
    t_iter(B) = verify(B) + depth(B) * draft(n * width(B)) + host overhead
    E_tot(B)  = n * min(E(B / n), depth(B) + 1)               (tokens split evenly)
    feasible    t_iter(B) <= margin * min_r(t_r) * E_tot(B) / n
    choose      argmax over feasible B of E_tot(B) / t_iter(B)    (ties: smaller B)
    fallback    the smallest bucket >= n when no B is feasible

Why this rule:
- *Goodput is tokens per second of iteration*, so maximize `E_tot / t_iter`, not `E_tot` alone.
  On a flat profile region (this CPU: T≈4..64) extra tokens are almost free and the rule grows
  `B`; past it latency grows faster than the concave `E` and the rule stops. A lone request sits
  at the steep T=1..4 start of the profile, so it only speculates when `E` pays for the jump.
- *The SLO constraint is per-iteration slack.* The tightest request produces about `E(B/n)`
  tokens per iteration, so it stays within its TPOT `t_r` iff `t_iter <= t_r * E(B/n)`. Checking
  `t_iter <= t_r` alone (one token per step) would forbid exactly the speculation that lets a
  tight request beat its SLO; using the even share `B/n` (not what the SLO phase may give the
  tightest request) keeps the check conservative. `margin < 1` leaves extra headroom.
- *Buckets only*: the verify step is compiled per bucket and pads to it, so a budget between
  buckets costs the next bucket's latency anyway.
- Falling back to the smallest bucket >= n (not to "no step") keeps every request progressing
  with the cheapest step when the SLOs cannot all be met; the selector's SLO phase then spends
  the little budget on the most-behind requests.

The draft term uses the adaptive tree shape (paper §5.2) with `B1 = B`: `depth` draft steps of
`n * width` tokens each. A profile without draft timing counts drafting as free.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from adaserve_jax.scheduler.tree_shape import TreeShape, TreeShapeConfig

AcceptanceModel = Callable[[float], float]
"""E(k): expected accepted tokens per request (bonus included) with k >= 1 tokens verified."""


@dataclasses.dataclass(frozen=True, slots=True)
class LatencyCurve:
    """Monotone piecewise-linear step latency over token counts.

    tokens: strictly increasing positive ints (the buckets), ms: matching latencies, finite,
    >= 0 and non-decreasing. Between points: linear. Below the first point: the first latency
    (a smaller step pads to it). Past the last point: the last segment's slope (compute-bound),
    or proportional `ms * T / tokens` for a single point (a per-token cost).
    """

    tokens: tuple[int, ...]
    ms: tuple[float, ...]

    def __post_init__(self) -> None:
        tokens, ms = tuple(self.tokens), tuple(float(x) for x in self.ms)
        if not tokens:
            raise ValueError("tokens=() must hold at least one bucket")
        if len(ms) != len(tokens):
            raise ValueError(f"ms has {len(ms)} entries but tokens has {len(tokens)}")
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 1:
                raise ValueError(f"tokens={tokens}: every bucket must be an int >= 1")
        if any(b <= a for a, b in zip(tokens, tokens[1:], strict=False)):
            raise ValueError(f"tokens={tokens} must be strictly increasing")
        if not all(math.isfinite(x) and x >= 0 for x in ms):
            raise ValueError(f"ms={ms} must be finite and >= 0")
        for i in range(1, len(ms)):
            if ms[i] < ms[i - 1]:
                raise ValueError(
                    f"ms={ms}: latency at {tokens[i]} tokens ({ms[i]}) is below the latency at "
                    f"{tokens[i - 1]} tokens ({ms[i - 1]}); must be non-decreasing "
                    "(use from_measurements to smooth a noisy profile)"
                )
        object.__setattr__(self, "tokens", tuple(int(t) for t in tokens))
        object.__setattr__(self, "ms", ms)

    @classmethod
    def from_dict(cls, table: Mapping[int, float]) -> LatencyCurve:
        """From {tokens: ms}; validated as is."""
        items = sorted(table.items())
        return cls(tuple(t for t, _ in items), tuple(m for _, m in items))

    @classmethod
    def from_measurements(cls, table: Mapping[int, float]) -> LatencyCurve:
        """From noisy measurements: a running max makes the curve non-decreasing."""
        items = sorted(table.items())
        ms = np.maximum.accumulate(np.array([m for _, m in items], dtype=np.float64))
        return cls(tuple(t for t, _ in items), tuple(ms.tolist()))

    @classmethod
    def per_token(cls, ms_per_token: float) -> LatencyCurve:
        """A cost proportional to the token count."""
        return cls((1,), (ms_per_token,))

    def latency_ms(self, tokens: float | np.ndarray) -> float | np.ndarray:
        """Interpolated latency at `tokens` (scalar -> float, array -> f64 array)."""
        x = np.asarray(tokens, dtype=np.float64)
        if np.any(np.isnan(x)):
            raise ValueError(f"tokens={tokens} must not be NaN")
        xs = np.array(self.tokens, dtype=np.float64)
        ys = np.array(self.ms, dtype=np.float64)
        if xs.size == 1:
            slope = ys[0] / xs[0]
        else:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        out = np.interp(x, xs, ys)  # clamps to the end values outside [xs[0], xs[-1]]
        out = np.where(x > xs[-1], ys[-1] + slope * (x - xs[-1]), out)
        return float(out) if out.ndim == 0 else out


@dataclasses.dataclass(frozen=True, slots=True)
class LatencyProfile:
    """Per-machine, per-model step latencies; `verify.tokens` are the compiled buckets.

    verify: verify (target) step latency per token count.
    draft: one draft expansion step's latency per token count, or None (drafting counted free).
    host_ms: fixed host overhead per iteration (selection, batch building).
    """

    verify: LatencyCurve
    draft: LatencyCurve | None = None
    host_ms: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.verify, LatencyCurve):
            raise ValueError(f"verify={self.verify!r} must be a LatencyCurve")
        if self.draft is not None and not isinstance(self.draft, LatencyCurve):
            raise ValueError(f"draft={self.draft!r} must be a LatencyCurve or None")
        if not (math.isfinite(self.host_ms) and self.host_ms >= 0):
            raise ValueError(f"host_ms={self.host_ms} must be finite and >= 0")

    @classmethod
    def from_tables(
        cls,
        verify_ms: Mapping[int, float],
        draft_ms: Mapping[int, float] | float | None = None,
        host_ms: float = 0.0,
    ) -> LatencyProfile:
        """`draft_ms` is a {tokens: ms} table per draft step, or a float = ms per draft token."""
        if draft_ms is None:
            draft = None
        elif isinstance(draft_ms, Mapping):
            draft = LatencyCurve.from_dict(draft_ms)
        else:
            draft = LatencyCurve.per_token(float(draft_ms))
        return cls(LatencyCurve.from_dict(verify_ms), draft, float(host_ms))

    @classmethod
    def cpu_reference(cls) -> LatencyProfile:
        """Verify latencies of DESIGN.md §4 (15.7M-parameter target, 2 CPU cores) with an
        illustrative draft curve; for tests and docs, not a substitute for profiling."""
        return cls.from_tables(
            {1: 3.5, 2: 5.6, 4: 8.7, 8: 9.0, 16: 13.0, 32: 16.0, 64: 20.0, 128: 35.0, 256: 60.0},
            draft_ms={1: 0.4, 4: 0.6, 16: 1.0, 64: 2.0, 256: 6.0},
        )

    @property
    def buckets(self) -> tuple[int, ...]:
        return self.verify.tokens

    def to_json_dict(self) -> dict:
        """Plain dict for the per-machine profile cache (inverse of `from_json_dict`)."""

        def table(curve: LatencyCurve) -> dict[str, float]:
            return {str(t): m for t, m in zip(curve.tokens, curve.ms, strict=True)}

        out: dict = {"verify_ms": table(self.verify), "host_ms": self.host_ms}
        if self.draft is not None:
            out["draft_ms"] = table(self.draft)
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping) -> LatencyProfile:
        draft = data.get("draft_ms")
        return cls.from_tables(
            {int(t): float(m) for t, m in data["verify_ms"].items()},
            None if draft is None else {int(t): float(m) for t, m in draft.items()},
            float(data.get("host_ms", 0.0)),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class GeometricAcceptance:
    """E(k) = (1 - alpha^k) / (1 - alpha): a chain whose every drafted token is accepted with
    probability `alpha` — concave, E(1) = 1 (the bonus token), saturating at 1 / (1 - alpha)."""

    alpha: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha < 1.0):
            raise ValueError(f"alpha={self.alpha} must lie in [0, 1)")

    def __call__(self, tokens_per_request: float) -> float:
        k = max(float(tokens_per_request), 1.0)
        return (1.0 - self.alpha**k) / (1.0 - self.alpha)

    @classmethod
    def fit(
        cls,
        tokens_per_request: Sequence[float] | np.ndarray,
        accepted: Sequence[float] | np.ndarray,
    ) -> GeometricAcceptance:
        """Least-squares alpha (grid step 0.001) from recent (tokens verified, tokens accepted)
        observations, e.g. a sliding window of per-request verify results."""
        k = np.maximum(np.asarray(tokens_per_request, dtype=np.float64), 1.0)
        acc = np.asarray(accepted, dtype=np.float64)
        if k.ndim != 1 or acc.shape != k.shape or k.size == 0:
            raise ValueError(f"need matching non-empty 1-D samples, got {k.shape} and {acc.shape}")
        if not (np.all(np.isfinite(k)) and np.all(np.isfinite(acc))):
            raise ValueError("tokens_per_request and accepted must be finite")
        alphas = np.arange(0.0, 0.999, 0.001)[:, None]  # [G, 1]
        # group samples by distinct k (a handful of values): same squared error, K << S columns
        ks, inv = np.unique(k, return_inverse=True)
        count = np.bincount(inv, minlength=ks.size).astype(np.float64)
        total = np.bincount(inv, weights=acc, minlength=ks.size)
        pred = (1.0 - alphas**ks) / (1.0 - alphas)  # [G, K]
        sse = (count * pred * pred - 2.0 * total * pred).sum(axis=1)  # + const sum(acc^2)
        return cls(float(alphas[np.argmin(sse), 0]))


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetChoice:
    """The chosen budget and what the rule predicted for it.

    budget: tokens per verify step (a profile bucket >= n). t_iter_s: predicted iteration latency.
    expected_accepted: n * E(budget / n). tokens_per_s: expected_accepted / t_iter_s.
    fits_slo: False when no bucket met the SLO constraint and the fallback was taken.
    shape: the tree shape priced into t_iter_s (depth 0 when budget == n).
    """

    budget: int
    t_iter_s: float
    expected_accepted: float
    tokens_per_s: float
    fits_slo: bool
    shape: TreeShape


def iteration_latency_s(
    profile: LatencyProfile, budget: int, num_requests: int, shape: TreeShapeConfig
) -> tuple[float, TreeShape]:
    """Predicted iteration latency with `budget` verify tokens, and the tree shape it assumes."""
    if budget <= num_requests:  # roots only: nothing to draft
        tree = TreeShape(0, 1)
    else:
        tree = shape.shape(num_requests, verify_budget=budget)
    ms = float(profile.verify.latency_ms(budget)) + profile.host_ms
    if profile.draft is not None and tree.depth > 0:
        ms += tree.depth * float(profile.draft.latency_ms(num_requests * tree.width))
    return ms / 1e3, tree


def choose_budget(
    profile: LatencyProfile,
    num_requests: int,
    acceptance: AcceptanceModel,
    tpot_slos_s: Sequence[float] | np.ndarray,
    *,
    shape: TreeShapeConfig | None = None,
    slo_margin: float = 1.0,
) -> BudgetChoice:
    """Picks the verify budget for the next iteration; see the module docstring for the rule."""
    n = num_requests
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_requests={n!r} must be an int >= 1")
    slos = np.asarray(tpot_slos_s, dtype=np.float64)
    if slos.ndim != 1 or slos.size == 0:
        raise ValueError(f"tpot_slos_s.shape={slos.shape} must be [n] with n >= 1")
    if not np.all(np.isfinite(slos) & (slos > 0)):
        raise ValueError(f"tpot_slos_s={slos} must be finite and > 0")
    if not (math.isfinite(slo_margin) and slo_margin > 0):
        raise ValueError(f"slo_margin={slo_margin} must be finite and > 0")
    candidates = [b for b in profile.buckets if b >= n]
    if not candidates:
        raise ValueError(
            f"num_requests={n} exceeds the largest bucket {profile.buckets[-1]}: the roots alone "
            "do not fit one verify step"
        )
    shape = TreeShapeConfig() if shape is None else shape
    tightest = float(slos.min())
    best: BudgetChoice | None = None
    fallback: BudgetChoice | None = None
    for b in candidates:
        t_iter, tree = iteration_latency_s(profile, b, n, shape)
        per_request = float(acceptance(b / n))
        if not (math.isfinite(per_request) and per_request >= 1.0 - 1e-9):
            raise ValueError(f"acceptance({b / n})={per_request}: E(k) must be finite and >= 1")
        if tree.depth + 1 < per_request:  # a tree of depth d yields at most d + 1 tokens
            per_request = float(tree.depth + 1)
        total = n * per_request
        fits = t_iter <= slo_margin * tightest * per_request
        rate = total / t_iter if t_iter > 0 else math.inf
        choice = BudgetChoice(b, t_iter, total, rate, fits, tree)
        if fallback is None:
            fallback = dataclasses.replace(choice, fits_slo=False)
        if fits and (best is None or choice.tokens_per_s > best.tokens_per_s):
            best = choice
    assert fallback is not None
    return best if best is not None else fallback


def choose_budget_from_trees(
    profile: LatencyProfile,
    log_f: np.ndarray,
    tpot_slos_s: Sequence[float] | np.ndarray,
    *,
    max_budget: int,
    draft_ms: float = 0.0,
    prefill_tokens: int = 0,
    slo_margin: float = 1.0,
) -> BudgetChoice:
    """The budget rule with `E` read off this iteration's (calibrated) drafted trees.

    log_f: f32[n, N] path log-probabilities of every drafted node (root = 0), calibrated so
    that `f` estimates acceptance (scheduler/confidence.py). For a budget `B`:

        t_iter(B) = verify(B + prefill_tokens) + draft_ms + host overhead
                    (the prefill chunks ride in the same verify step); B = n (roots only)
                    is priced without draft_ms, because choosing it switches the scheduler
                    to plain decoding without the draft model until it explores again
        E_tot(B)  = sum of the B largest f over all requests: the best any selection can
                    expect (a greedy pick of highest-f nodes is a connected forest with every
                    root, since roots have f = 1 and f(child) <= f(parent))
        feasible    t_iter(B) <= margin * min_r(t_r) * E_tot(B) / n
        choose      argmax over feasible B of E_tot(B) / t_iter(B)  (ties: smaller B)
        fallback    argmax of E_tot(B) / t_iter(B) over all B (throughput when no SLO fits)

    The SLO check uses the even share E_tot / n for the tightest request; the selector's SLO
    phase then moves tokens to the requests that need them. Candidates are profile buckets in
    [n, max_budget]; B = n is "roots only".
    """
    f = np.exp(np.asarray(log_f, dtype=np.float64))
    if f.ndim != 2 or f.shape[0] < 1:
        raise ValueError(f"log_f.shape={f.shape} must be [n >= 1, N]")
    n = f.shape[0]
    slos = np.asarray(tpot_slos_s, dtype=np.float64)
    if slos.shape != (n,) or not np.all(np.isfinite(slos) & (slos > 0)):
        raise ValueError(f"tpot_slos_s must be {n} finite values > 0")
    if isinstance(prefill_tokens, bool) or not isinstance(prefill_tokens, int | np.integer):
        raise ValueError(f"prefill_tokens={prefill_tokens!r} must be an int >= 0")
    if prefill_tokens < 0:
        raise ValueError(f"prefill_tokens={prefill_tokens} must be >= 0")
    top = -np.sort(-f.ravel())
    cum = np.cumsum(top)
    cands = np.array([b for b in profile.buckets if n <= b <= max_budget] or [n])
    verify_ms = np.asarray(profile.verify.latency_ms((cands + prefill_tokens).astype(float)))
    drafting = np.where(cands > n, draft_ms, 0.0)
    t_iter = (verify_ms.reshape(-1) + drafting + profile.host_ms) / 1e3  # [K]
    total = cum[np.minimum(cands, cum.size) - 1]  # [K]
    rate = total / np.maximum(t_iter, 1e-12)
    fits = t_iter <= slo_margin * float(slos.min()) * total / n
    k = int(np.lexsort((cands, -rate, ~fits))[0])  # feasible first, then rate, then small B
    return BudgetChoice(
        int(cands[k]), float(t_iter[k]), float(total[k]), float(rate[k]), bool(fits[k]),
        TreeShape(0, 1),
    )  # fmt: skip

"""Hardware-aware token budget: how many tokens the next verify step should carry.

Inputs: a latency profile measured at start-up (verify-step latency per token-count bucket and
draft-step latency), this iteration's drafted candidate trees with their path probabilities
`f` *calibrated* against observed acceptance (scheduler/confidence.py), the tokens of the
prefill chunks that ride in the same step, and the running requests' TPOT SLOs.

The rule (DESIGN.md §4 leaves it open; this is the one we use, `choose_budget_from_trees`):

    candidates  B in profile buckets with n <= B <= the budget left after prefill chunks
    t_iter(B) = verify(B + prefill) + draft + host overhead     (B = n: no draft, see below)
                (draft: the catch-up step plus the measured expansion call, `expand_call_ms`;
                without one, depth draft steps; the scheduler computes it, speculative_steps.py)
    E_tot(B)  = sum of the B largest calibrated f over all requests
    feasible    t_iter(B) <= margin * min_r(t_r) * E_tot(B) / n
    choose      argmax over feasible B of E_tot(B) / t_iter(B)    (ties: smaller B)
    fallback    argmax of E_tot(B) / t_iter(B) over all B

Why this rule:
- *Goodput is tokens per second of iteration*, so maximize `E_tot / t_iter`, not `E_tot` alone.
  On a flat profile region extra tokens are almost free and the rule grows `B`; past it
  latency grows faster than the concave `E_tot` and the rule stops. A lone request on this CPU
  sits at the steep T=1..4 start of the profile, so it only speculates when `E` pays for it.
- *E is read off the trees*, not from a fitted model: the greedy top-B pick is exactly what the
  selector can reach, and calibration makes `f` an acceptance estimate (a raw, under-confident
  draft made every deep node look worthless and pinned the rule to roots only).
- *The SLO constraint is per-iteration slack.* The tightest request produces about
  `E_tot / n` tokens per iteration, so it stays within its TPOT `t_r` iff
  `t_iter <= t_r * E_tot / n`; the selector's SLO phase then moves tokens to whoever needs them.
- *Roots only means no drafting.* Choosing B = n switches the scheduler to plain decoding
  without the draft model until it explores again (scheduler/loop.py), so that candidate is
  priced without the draft's cost; the draft cost of this iteration itself is already spent.
- *Buckets only*: the verify step is compiled per bucket and pads to it, so a budget between
  buckets costs the next bucket's latency anyway. So roots only (B = n, priced without the
  draft) is a candidate only when n is itself a bucket; between buckets the rule weighs
  speculative budgets alone. Adding B = n there too made AdaServe stop speculating at the
  paper's scale (9 roots at 31.6 ms beat bucket 128 at 63.3 ms on the even split E_tot / n,
  although the selector's SLO phase needed those tokens for the tight requests: 100 -> 56%
  attainment on 300 requests of rps 2.4; SIMULATION.md, "Explorations judged in advance").
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np


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
        if type(tokens) in (int, float) and tokens == tokens:  # a plain number, not NaN
            return _scalar_latency_ms(self, tokens)  # cached
        return self._interpolate(tokens)

    def _interpolate(self, tokens: float | np.ndarray) -> float | np.ndarray:
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


@functools.lru_cache(maxsize=1024)
def _scalar_latency_ms(curve: LatencyCurve, tokens: float) -> float:
    """`curve.latency_ms` of one token count (the scheduler asks the same few every
    iteration)."""
    return float(curve._interpolate(tokens))


@dataclasses.dataclass(frozen=True, slots=True)
class LatencyProfile:
    """Per-machine, per-model step latencies; `verify.tokens` are the compiled buckets.

    verify: verify (target) step latency per token count.
    draft: one draft expansion step's latency per token count, or None (drafting counted free).
    host_ms: fixed host overhead per iteration (selection, batch building).
    expand: the draft's measured expansion calls (steps/expand.py: depth - 1 draft steps in
        one call), per tree shape: ((depth, width, topk), row buckets, ms per bucket) entries,
        row buckets strictly increasing; () = not measured (`expand_call_ms` returns None and
        the scheduler prices drafting by the draft table alone).
    """

    verify: LatencyCurve
    draft: LatencyCurve | None = None
    host_ms: float = 0.0
    expand: tuple[tuple[tuple[int, int, int], tuple[int, ...], tuple[float, ...]], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.verify, LatencyCurve):
            raise ValueError(f"verify={self.verify!r} must be a LatencyCurve")
        if self.draft is not None and not isinstance(self.draft, LatencyCurve):
            raise ValueError(f"draft={self.draft!r} must be a LatencyCurve or None")
        if not (math.isfinite(self.host_ms) and self.host_ms >= 0):
            raise ValueError(f"host_ms={self.host_ms} must be finite and >= 0")
        for shape, rows, ms in self.expand:
            if len(shape) != 3 or not rows or len(rows) != len(ms):
                raise ValueError(f"expand entry {shape}: rows {rows} and ms {ms} do not match")
            if any(b <= a for a, b in zip(rows, rows[1:], strict=False)) or rows[0] < 1:
                raise ValueError(f"expand entry {shape}: rows {rows} must increase from >= 1")
            if not all(math.isfinite(x) and x >= 0 for x in ms):
                raise ValueError(f"expand entry {shape}: ms {ms} must be finite and >= 0")

    @classmethod
    def from_tables(
        cls,
        verify_ms: Mapping[int, float],
        draft_ms: Mapping[int, float] | float | None = None,
        host_ms: float = 0.0,
        expand_ms: Mapping | None = None,
    ) -> LatencyProfile:
        """`draft_ms` is a {tokens: ms} table per draft step, or a float = ms per draft token;
        `expand_ms` is {shape: {rows: ms}} with shape "depth,width,topk" (the profiler's
        keys) or a (depth, width, topk) tuple."""
        if draft_ms is None:
            draft = None
        elif isinstance(draft_ms, Mapping):
            draft = LatencyCurve.from_dict(draft_ms)
        else:
            draft = LatencyCurve.per_token(float(draft_ms))
        expand = []
        for key, table in sorted((expand_ms or {}).items(), key=lambda kv: str(kv[0])):
            shape = tuple(int(x) for x in (key.split(",") if isinstance(key, str) else key))
            items = sorted((int(r), float(m)) for r, m in table.items())
            expand.append((shape, tuple(r for r, _ in items), tuple(m for _, m in items)))
        return cls(LatencyCurve.from_dict(verify_ms), draft, float(host_ms), tuple(expand))

    def expand_call_ms(self, shape, rows: int) -> float | None:
        """The measured expansion call growing `rows` trees of `shape` (a TreeShape): the
        smallest row bucket >= rows (the engine pads to it; the largest bucket past them), or
        None when the profile did not measure this shape."""
        key = (shape.depth, shape.width, shape.topk)
        for entry, buckets, ms in self.expand:
            if entry == key:
                return ms[min(bisect.bisect_left(buckets, rows), len(buckets) - 1)]
        return None

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
        if self.expand:
            out["expand_ms"] = {
                ",".join(map(str, shape)): {str(r): m for r, m in zip(rows, ms, strict=True)}
                for shape, rows, ms in self.expand
            }
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping) -> LatencyProfile:
        draft = data.get("draft_ms")
        return cls.from_tables(
            {int(t): float(m) for t, m in data["verify_ms"].items()},
            None if draft is None else {int(t): float(m) for t, m in draft.items()},
            float(data.get("host_ms", 0.0)),
            data.get("expand_ms"),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetChoice:
    """The chosen budget and what the rule predicted for it.

    budget: tokens per verify step (a profile bucket >= n). t_iter_s: predicted iteration latency.
    expected_accepted: E_tot(budget), the calibrated f of the budget's best nodes.
    tokens_per_s: expected_accepted / t_iter_s.
    fits_slo: False when no bucket met the SLO constraint and the fallback was taken.
    """

    budget: int
    t_iter_s: float
    expected_accepted: float
    tokens_per_s: float
    fits_slo: bool


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
    log_f = np.asarray(log_f)
    if log_f.ndim != 2 or log_f.shape[0] < 1:
        raise ValueError(f"log_f.shape={log_f.shape} must be [n >= 1, N]")
    n = log_f.shape[0]
    slos = np.asarray(tpot_slos_s, dtype=np.float64)
    if slos.shape != (n,) or not (slos.min() > 0 and slos.max() < np.inf):  # NaN fails too
        raise ValueError(f"tpot_slos_s must be {n} finite values > 0")
    if isinstance(prefill_tokens, bool) or not isinstance(prefill_tokens, int | np.integer):
        raise ValueError(f"prefill_tokens={prefill_tokens!r} must be an int >= 0")
    if prefill_tokens < 0:
        raise ValueError(f"prefill_tokens={prefill_tokens} must be >= 0")
    return choose_budget_trusted(
        profile,
        log_f,
        float(slos.min()),
        max_budget=int(max_budget),
        draft_ms=float(draft_ms),
        prefill_tokens=int(prefill_tokens),
        slo_margin=slo_margin,
    )


def choose_budget_trusted(
    profile: LatencyProfile,
    log_f: np.ndarray,
    tightest_slo_s: float,
    *,
    max_budget: int,
    draft_ms: float,
    prefill_tokens: int,
    slo_margin: float = 1.0,
) -> BudgetChoice:
    """`choose_budget_from_trees` without its input checks, for the scheduler's hot path:
    log_f float[n >= 1, N] (valid by construction), the tightest request's TPOT SLO in seconds
    (> 0), plain ints and floats. Same result (tests/scheduler/test_budget.py)."""
    n = log_f.shape[0]
    # E_tot of the B largest f, for every B: exp is increasing, so sort log f, then exponentiate
    cum = np.exp(np.sort(log_f, axis=None)[::-1].astype(np.float64)).cumsum()
    cands, t_iter = _candidates(profile, n, max_budget, prefill_tokens, draft_ms)
    total = cum[np.minimum(cands, cum.size) - 1]  # [K]
    rate = total / np.maximum(t_iter, 1e-12)
    fits = t_iter <= slo_margin * tightest_slo_s * total / n
    # feasible first, then the rate, then the smaller budget (candidates are ascending)
    fits_l, rate_l = fits.tolist(), rate.tolist()
    k = max(range(len(fits_l)), key=lambda i: (fits_l[i], rate_l[i], -i))
    return BudgetChoice(int(cands[k]), float(t_iter[k]), float(total[k]), rate_l[k], fits_l[k])


@functools.lru_cache(maxsize=256)
def _candidates(
    profile: LatencyProfile, n: int, max_budget: int, prefill_tokens: int, draft_ms: float
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate budgets of `choose_budget_from_trees` and their t_iter (seconds); they
    depend on the profile and the step's sizes only, which repeat from iteration to iteration
    (read-only, cached)."""
    cands = np.array([b for b in profile.buckets if n <= b <= max_budget] or [n])
    verify_ms = np.asarray(profile.verify.latency_ms((cands + prefill_tokens).astype(float)))
    drafting = np.where(cands > n, draft_ms, 0.0)
    t_iter = (verify_ms.reshape(-1) + drafting + profile.host_ms) / 1e3  # [K]
    for a in (cands, t_iter):
        a.flags.writeable = False
    return cands, t_iter

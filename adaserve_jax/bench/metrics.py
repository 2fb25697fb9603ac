"""Serving metrics of one replay (numpy only), with the paper's definitions (DESIGN.md §1).

- A request *attains* its SLO when its mean TPOT over decoding (first output token to
  last, divided by the tokens decoded after the first) is <= its TPOT SLO; a request
  with a single output token has no TPOT and attains.
- attainment = attained / completed; violations = 1 - attainment.
- goodput = output tokens of attained requests / wall-clock seconds of the run.
- mean accepted tokens per verify step = (accepted drafted tokens + 1 bonus per
  request-step) / request-steps; 1.0 for non-speculative policies.
- selection overhead = host selection seconds / iteration seconds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, slots=True)
class RequestResult:
    """What the metrics need from one completed request."""

    category: str
    output_tokens: int
    tpot_slo_s: float
    ttft_s: float | None  # from its (scheduled) arrival to its first output token
    tpot_s: float | None  # mean time per output token after the first
    verify_steps: int = 0  # request-steps (decode steps it took part in)
    accepted: int = 0  # drafted tokens accepted over those steps (bonus not counted)

    @property
    def attained(self) -> bool:
        return self.tpot_s is None or self.tpot_s <= self.tpot_slo_s


def percentile(values: Sequence[float | None], q: float) -> float | None:
    """q-th percentile (linear interpolation) of the non-None values; None when empty."""
    xs = np.array([v for v in values if v is not None], np.float64)
    if xs.size == 0:
        return None
    return float(np.percentile(xs, q))


def request_result(state, speculative: bool) -> RequestResult:
    """The metrics' view of one finished scheduler `RequestState` (real or simulated run)."""
    steps = state.stats.steps if speculative else max(len(state.output) - 1, 0)
    return RequestResult(
        category=state.request.category or "none",
        output_tokens=len(state.output),
        tpot_slo_s=(state.request.tpot_slo_ms or float("inf")) / 1e3,
        ttft_s=state.ttft_s(),
        tpot_s=state.mean_tpot_s(),
        verify_steps=steps,
        accepted=state.stats.accepted if speculative else 0,
    )


def attainment(results: Sequence[RequestResult]) -> float:
    if not results:
        return float("nan")
    return sum(r.attained for r in results) / len(results)


def goodput(results: Sequence[RequestResult], wall_s: float) -> float:
    """Output tokens of attained requests per wall-clock second."""
    if wall_s <= 0:
        raise ValueError(f"{wall_s=} must be > 0")
    return sum(r.output_tokens for r in results if r.attained) / wall_s


def mean_accepted_per_step(results: Sequence[RequestResult]) -> float:
    steps = sum(r.verify_steps for r in results)
    if steps == 0:
        return 1.0
    return (sum(r.accepted for r in results) + steps) / steps


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def latency_stats(results: Sequence[RequestResult]) -> dict[str, float | None]:
    """TTFT and TPOT p50/p99 in milliseconds."""
    ttft = [r.ttft_s for r in results]
    tpot = [r.tpot_s for r in results]
    return {
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "tpot_p50_ms": _ms(percentile(tpot, 50)),
        "tpot_p99_ms": _ms(percentile(tpot, 99)),
    }


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def summarize(
    results: Sequence[RequestResult],
    wall_s: float,
    *,
    step_seconds: Sequence[float] = (),
    select_seconds: Sequence[float] = (),
) -> dict:
    """The JSON-ready summary of one policy run (see README 'Multi-SLO benchmark')."""
    att = attainment(results)
    per_category = {}
    for cat in sorted({r.category for r in results}):
        sub = [r for r in results if r.category == cat]
        a = attainment(sub)
        per_category[cat] = {
            "requests": len(sub),
            "attainment": a,
            "violations": 1.0 - a,
            "goodput_tokens_per_s": goodput(sub, wall_s),
            "tpot_slo_ms": sub[0].tpot_slo_s * 1e3,
            **latency_stats(sub),
        }
    step_total = float(sum(step_seconds))
    return {
        "requests": len(results),
        "attainment": _nan_to_none(att),
        "violations": _nan_to_none(1.0 - att),
        "goodput_tokens_per_s": goodput(results, wall_s),
        "throughput_tokens_per_s": sum(r.output_tokens for r in results) / wall_s,
        "wall_s": wall_s,
        "output_tokens": sum(r.output_tokens for r in results),
        **latency_stats(results),
        "mean_accepted_per_step": mean_accepted_per_step(results),
        "iterations": len(step_seconds),
        "selection_overhead": float(sum(select_seconds)) / step_total if step_total else 0.0,
        "per_category": per_category,
    }

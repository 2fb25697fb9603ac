"""Multi-SLO workload traces: load, validate and scale (numpy only).

A trace is the AdaServe artifact's JSON list of requests, each
`{emission_time_ms, input_length, output_length, prompt, slo_ratio}`. The SLO
category follows from `slo_ratio` (DESIGN.md §5):

    slo_ratio   category        TPOT SLO
    1.2         coding          1.2 x baseline
    -50         chat            50 ms on the paper's 30 ms baseline -> 50/30 x baseline
    -150        summarization   150/30 = 5 x baseline

A positive ratio is a multiple of the baseline; a negative one is an absolute
latency (ms) on the paper's hardware, whose baseline was 30 ms/token. Arrival times
are scaled by `baseline / 30 ms` (so the offered load keeps its meaning on this
machine) and then by the user's `time_scale` (> 1 lighter, < 1 heavier).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

PAPER_BASELINE_MS = 30.0
CATEGORY_BY_SLO_RATIO = {1.2: "coding", -50.0: "chat", -150.0: "summarization"}
FIELDS = ("emission_time_ms", "input_length", "output_length", "prompt", "slo_ratio")


class WorkloadError(ValueError):
    """A malformed trace; the message names the file, the entry index and the field."""


@dataclasses.dataclass(frozen=True, slots=True)
class TraceEntry:
    index: int  # position in the file
    emission_time_ms: float
    input_length: int
    output_length: int
    prompt: str
    slo_ratio: float

    @property
    def category(self) -> str:
        return category_of(self.slo_ratio)

    @property
    def slo_multiple(self) -> float:
        """TPOT SLO as a multiple of the engine's baseline TPOT."""
        return slo_multiple(self.slo_ratio)


def category_of(slo_ratio: float) -> str:
    for ratio, name in CATEGORY_BY_SLO_RATIO.items():
        if math.isclose(slo_ratio, ratio, rel_tol=1e-9, abs_tol=1e-9):
            return name
    raise ValueError(f"{slo_ratio=} is not one of {sorted(CATEGORY_BY_SLO_RATIO)}")


def slo_multiple(slo_ratio: float) -> float:
    """1.2 -> 1.2; -50 -> 50/30; -150 -> 5 (negative = ms on the paper's 30 ms baseline)."""
    return slo_ratio if slo_ratio > 0 else -slo_ratio / PAPER_BASELINE_MS


def _number(path: Path, i: int, item: dict, name: str, *, integer: bool) -> float:
    v = item[name]
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    if ok and integer:
        ok = isinstance(v, int) or (math.isfinite(v) and float(v).is_integer())
    if not ok or not math.isfinite(v):
        kind = "an integer" if integer else "a finite number"
        raise WorkloadError(f"{path}: entry {i}: field {name!r} must be {kind}, got {v!r}")
    if v < 0:
        raise WorkloadError(f"{path}: entry {i}: field {name!r} must be >= 0, got {v!r}")
    return int(v) if integer else float(v)


def parse_entry(path: Path, i: int, item: object) -> TraceEntry:
    """Validate one trace entry; WorkloadError naming file, index and field."""
    if not isinstance(item, dict):
        raise WorkloadError(f"{path}: entry {i}: expected an object, got {type(item).__name__}")
    for name in FIELDS:
        if name not in item:
            raise WorkloadError(f"{path}: entry {i}: missing field {name!r}")
    emission = _number(path, i, item, "emission_time_ms", integer=False)
    input_length = _number(path, i, item, "input_length", integer=True)
    output_length = _number(path, i, item, "output_length", integer=True)
    if output_length == 0:
        raise WorkloadError(f"{path}: entry {i}: field 'output_length' must be > 0, got 0")
    prompt = item["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise WorkloadError(f"{path}: entry {i}: field 'prompt' must be a non-empty string")
    ratio = item["slo_ratio"]
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or not math.isfinite(ratio):
        raise WorkloadError(f"{path}: entry {i}: field 'slo_ratio' must be a number, got {ratio!r}")
    try:
        category_of(float(ratio))
    except ValueError:
        raise WorkloadError(
            f"{path}: entry {i}: field 'slo_ratio' = {ratio!r} is unknown; expected one of "
            f"{sorted(CATEGORY_BY_SLO_RATIO)} (coding, chat, summarization)"
        ) from None
    return TraceEntry(i, emission, input_length, output_length, prompt, float(ratio))


def load_workload(path: str | Path) -> list[TraceEntry]:
    """Read and validate a trace file; entries sorted by emission time (stable)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read workload: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: expected a JSON list of requests, got {type(data).__name__}")
    if not data:
        raise WorkloadError(f"{path}: the workload has no requests")
    entries = [parse_entry(path, i, item) for i, item in enumerate(data)]
    return sorted(entries, key=lambda e: e.emission_time_ms)


def take(entries: list[TraceEntry], num_requests: int | None) -> list[TraceEntry]:
    """The first `num_requests` arrivals (all when None): keeps the trace's arrival rate."""
    if num_requests is None:
        return list(entries)
    if num_requests <= 0:
        raise ValueError(f"{num_requests=} must be > 0")
    return list(entries[:num_requests])


def arrival_times_s(
    entries: list[TraceEntry], baseline_tpot_ms: float, time_scale: float = 1.0
) -> np.ndarray:
    """f64[N] arrival seconds: emission x (baseline / 30 ms) x time_scale, first at 0."""
    if not (math.isfinite(baseline_tpot_ms) and baseline_tpot_ms > 0):
        raise ValueError(f"{baseline_tpot_ms=} must be finite and > 0")
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"{time_scale=} must be finite and > 0")
    ms = np.array([e.emission_time_ms for e in entries], np.float64)
    if ms.size:
        ms -= ms.min()
    return ms / 1e3 * (baseline_tpot_ms / PAPER_BASELINE_MS) * time_scale


def offered_rps(arrivals_s: np.ndarray) -> float | None:
    """Mean arrival rate (requests/s) over the span of the arrivals; None if they coincide."""
    if arrivals_s.size < 2 or arrivals_s.max() <= arrivals_s.min():
        return None
    return float((arrivals_s.size - 1) / (arrivals_s.max() - arrivals_s.min()))

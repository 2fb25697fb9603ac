"""Start-up latency profile: verify-step latency per token bucket, draft-step latency,
and the draft tree expansion call per warmed tree shape and row bucket.

Measured on this machine with the engine's own compiled steps (a chain of T tokens
on top of `context` committed rows; median of `repeats`), then cached as JSON under
`~/.cache/adaserve_jax/profiles/` keyed by machine + model + buckets, so a restart
reuses it (`reprofile=True` measures again; a cached profile that lacks one of the
engine's expansion shapes is measured again too). Results are plain tables
(`Profile`); the Engine turns them into the scheduler's `LatencyProfile` for the
budget rule (scheduler/budget.py). The baseline TPOT (single-request
autoregressive time per token at near-zero load) scales the SLO categories.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from adaserve_jax.engine.batch import Segment
from adaserve_jax.engine.device import DeviceModel

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    verify_ms: dict[int, float]  # verify (target) step latency per token bucket
    draft_ms: dict[int, float] | None  # draft step latency per token bucket
    baseline_tpot_ms: float  # single-request autoregressive step: the baseline TPOT
    # one draft expansion call (`steps/expand.py`) per tree shape, keyed "depth,width,topk"
    # (`shape_key`), then per compiled row bucket (rows growing a tree); None = not measured
    expand_ms: dict[str, dict[int, float]] | None = None

    def to_json(self) -> dict:
        return {
            "verify_ms": {str(k): v for k, v in self.verify_ms.items()},
            "draft_ms": None
            if self.draft_ms is None
            else {str(k): v for k, v in self.draft_ms.items()},
            "expand_ms": None
            if self.expand_ms is None
            else {k: {str(r): ms for r, ms in rows.items()} for k, rows in self.expand_ms.items()},
            "baseline_tpot_ms": self.baseline_tpot_ms,
        }

    @classmethod
    def from_json(cls, data: dict) -> Profile:
        draft, expand = data.get("draft_ms"), data.get("expand_ms")
        return cls(
            {int(k): float(v) for k, v in data["verify_ms"].items()},
            None if draft is None else {int(k): float(v) for k, v in draft.items()},
            float(data["baseline_tpot_ms"]),
            None
            if expand is None
            else {
                str(k): {int(r): float(ms) for r, ms in rows.items()} for k, rows in expand.items()
            },
        )


class CallPrices:
    """A device call's price in seconds by the profile: the verify step by its padded token
    bucket, a draft step by its token count (padded to the draft's next measured bucket), an
    expansion call by its tree shape and decoding rows (the next measured row bucket). None
    where the profile has no such entry (a bucket past the largest, an unmeasured shape)."""

    def __init__(self, profile: Profile) -> None:
        self._verify = {b: ms / 1e3 for b, ms in profile.verify_ms.items()}
        draft = sorted((profile.draft_ms or {}).items())
        self._draft_buckets = [b for b, _ in draft]
        self._draft_s = [ms / 1e3 for _, ms in draft]
        self._expand = {
            key: (sorted(rows), [rows[r] / 1e3 for r in sorted(rows)])
            for key, rows in (profile.expand_ms or {}).items()
        }

    def verify_s(self, bucket: int) -> float | None:
        return self._verify.get(bucket)

    def draft_s(self, tokens: int) -> float | None:
        i = bisect.bisect_left(self._draft_buckets, tokens)
        return self._draft_s[i] if i < len(self._draft_s) else None

    def expand_s(self, shape, active: int) -> float | None:
        table = self._expand.get(shape_key(shape))
        if table is None:
            return None
        i = bisect.bisect_left(table[0], max(active, 1))
        return table[1][i] if i < len(table[1]) else None


def shape_key(shape) -> str:
    """The key of `Profile.expand_ms` for a `TreeShape`: "depth,width,topk"."""
    return f"{shape.depth},{shape.width},{shape.topk}"


def expansion_shapes(expander) -> list:
    """The expander's (a `DraftDevice`) shapes that make an expansion call (depth > 1)."""
    return [] if expander is None else [s for s in expander.shapes if s.depth > 1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def profile_key(target: DeviceModel, draft: DeviceModel | None) -> str:
    parts = {
        "machine": [platform.node(), _cpu_model(), os.cpu_count()],
        "target": [target.config.to_dict(), str(target.model.path), target.token_buckets],
        "draft": None if draft is None else [draft.config.to_dict(), str(draft.model.path)],
        "impl": target.attention_impl,
        # how the tables are measured: 2 = the draft's calls timed in their serving sequence
        "method": 2,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_call(dev: DeviceModel, tokens: int, context: int, head: str):
    """A step of `tokens` tokens on slot 0 from row `context` (rewriting those K/V rows on
    every call: use before serving), as a callable for `time_calls`."""
    seg = Segment.chain(0, context, [1] * tokens)
    return lambda: dev.run([seg], head=head)


def expand_call(expander, shape, rows: int, context: int):
    """One expansion call with `rows` slots growing a tree of `shape` from row `context` (it
    writes the best path's draft K/V at rows `context + 1 ...` of those slots: use before
    serving), as a callable for `time_calls`."""
    s, k = expander.device.num_slots, shape.topk
    vals = np.log(np.full((s, k), 1.0 / k, np.float32))
    toks = np.ones((s, k), np.int32)
    root_pos = np.where(np.arange(s) < rows, context, -1).astype(np.int32)
    return lambda: expander.expand(vals, toks, root_pos, shape)


def verify_step_before(target: DeviceModel, tokens: int, context: int):
    """What runs ahead of a draft step of `tokens` tokens in serving: a verify step of about
    its size (the target's next bucket)."""
    bucket = next((b for b in sorted(target.token_buckets) if b >= tokens), None)
    return step_call(target, bucket or max(target.token_buckets), context, "sample")


def calls_before_expansion(target: DeviceModel, expander, shape, rows: int, context: int):
    """What runs ahead of an expansion over `rows` slots in serving: a verify step of their
    trees' size, then the draft's step over their rows."""
    verify = verify_step_before(target, rows * (1 + shape.depth), context)
    draft = step_call(expander.device, rows, context, "topk_last")

    def before() -> None:
        verify()
        draft()

    return before


def time_calls(call, repeats: int, before=None) -> list[float]:
    """Seconds of `repeats` timed `call()`s after one untimed warm-up, each preceded by an
    untimed `before()` when given (what runs ahead of the call in serving). `call` must wait
    for the device (the engine's calls return numpy)."""
    if before is not None:
        before()
    call()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def low_quantile_ms(times: list[float]) -> float:
    """ms of a low quantile of `times` (s): other processes on the machine only ever add time."""
    return float(statistics.quantiles(times, n=5)[0]) * 1e3 if len(times) >= 5 else min(times) * 1e3


def _monotone(table: dict[int, float]) -> None:
    """Make latencies non-decreasing in T from the right: L(T) = min over buckets >= T.

    A bigger bucket never costs less than a smaller one; taking the minimum from the right
    (rather than a running maximum from the left) keeps one noisy spike from inflating every
    larger bucket.
    """
    running = float("inf")
    for t in sorted(table, reverse=True):
        running = table[t] = min(running, table[t])


def measure_profile(
    target: DeviceModel,
    draft: DeviceModel | None = None,
    *,
    expander=None,
    context: int = 128,
    repeats: int = 15,
    progress: bool = True,
) -> Profile:
    """Measure the tables. Uses slot 0 of the caches (call before serving); `expander` (a
    `DraftDevice`) adds its expansion call per shape and row bucket, writing draft rows of
    its slots."""
    from tqdm import tqdm

    context = min(context, target.max_len - max(target.token_buckets))
    verify = {}
    for t in tqdm(target.token_buckets, desc="profile verify step", disable=not progress):
        verify[t] = low_quantile_ms(time_calls(step_call(target, t, context, "sample"), repeats))

    # The draft's calls are timed as they run in serving, where a speculative iteration goes
    # verify -> draft step -> expansion -> verify: each draft step right after a target step
    # of its size, each expansion right after a target step and a draft step over its rows.
    # Timed alone (the draft's weights and caches still warm from the call before) they cost
    # up to 1.6x less than in that sequence on this 2-core CPU (BENCHMARKS.md, "The draft's
    # calls in sequence"), and the budget rule would take drafting for cheaper than it is.
    draft_ms = None
    if draft is not None:
        draft_ms = {}
        for t in tqdm(draft.token_buckets, desc="profile draft step", disable=not progress):
            call = step_call(draft, t, context, "topk_last")
            before = verify_step_before(target, t, context)
            draft_ms[t] = low_quantile_ms(time_calls(call, repeats, before))
    expand = None
    shapes = expansion_shapes(expander)
    if shapes:
        expand = {}
        combos = [(sh, r) for sh in shapes for r in expander.row_buckets]
        for shape, r in tqdm(combos, desc="profile draft expansion", disable=not progress):
            call = expand_call(expander, shape, r, context)
            before = calls_before_expansion(target, expander, shape, r, context)
            expand.setdefault(shape_key(shape), {})[r] = low_quantile_ms(
                time_calls(call, repeats, before)
            )
    _monotone(verify)
    if draft_ms:
        _monotone(draft_ms)
    return Profile(verify, draft_ms, verify[min(verify)], expand)


def load_or_measure(
    target: DeviceModel,
    draft: DeviceModel | None = None,
    *,
    expander=None,
    cache_dir: str | Path | None = None,
    reprofile: bool = False,
    progress: bool = True,
) -> tuple[Profile, Path]:
    """The cached profile for this machine + model, measuring it when absent (or when it
    lacks one of `expander`'s expansion shapes)."""
    cache_dir = Path(
        cache_dir
        or os.environ.get("ADASERVE_JAX_PROFILES")
        or Path.home() / ".cache" / "adaserve_jax" / "profiles"
    )
    path = cache_dir / f"{profile_key(target, draft)}.json"
    if path.is_file() and not reprofile:
        try:
            cached = Profile.from_json(json.loads(path.read_text()))
            have = cached.expand_ms or {}
            rows = set(expander.row_buckets) if expander is not None else set()
            if all(rows <= set(have.get(shape_key(s), ())) for s in expansion_shapes(expander)):
                return cached, path
            log.info("profile %s lacks expansion shapes: measuring again", path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable profile %s: %s", path, exc)
    profile = measure_profile(target, draft, expander=expander, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=2))
    tmp.replace(path)
    log.info("latency profile written to %s", path)
    return profile, path

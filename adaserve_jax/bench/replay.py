"""Real-time replay of a multi-SLO trace against one scheduling policy.

The driver is an open-loop client glued to the scheduler's host loop:

  1. Before the clock starts, every trace entry becomes a validated `Request`: the
     prompt is tokenized with the model's tokenizer and truncated (head kept) so
     prompt + output fits the context; output length = min(output_length,
     max_output_len); greedy; TPOT SLO = the category's multiple of the engine's
     baseline TPOT (`Engine.category_slo_ms`).
  2. The clock starts at 0. Each request is submitted once its scaled arrival time
     has passed; its TTFT is measured from that scheduled arrival (not from when
     the loop noticed it), so a busy loop cannot hide queueing delay.
  3. While the scheduler has work, `step()` runs one iteration; when it has none,
     the driver sleeps until the next arrival.
  4. The run ends when the last request finishes; wall time = its finish time.

Policies share one warmed engine and run one after another (never concurrently:
device caches are shared).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from adaserve_jax.bench.metrics import request_result, summarize
from adaserve_jax.bench.speed_memory import correlation_time_ms
from adaserve_jax.bench.workload import TraceEntry, arrival_times_s, offered_rps
from adaserve_jax.scheduler.policy import parse_policy
from adaserve_jax.scheduler.request import FinishReason, Phase, Request, RequestState

# Context rows kept free beyond prompt + output: a speculation tree verified near the
# end of a full slot would otherwise need rows past the context (the scheduler only
# checks prompt + max_tokens <= context).
SPEC_HEADROOM = 32
# device calls whose speed against the start-up profile a replay records (`*_speed`)
SPEED_KINDS = ("verify", "draft", "expand")
# how the policies take turns when a sweep repeats every load (`run_sweep`)
SWEEP_ORDERS = ("alternate", "cycle", "rotate")


@dataclasses.dataclass(frozen=True, slots=True)
class _Raw:
    """What one replay measured, before summarizing (replays of one policy pool these)."""

    results: list
    wall_s: float
    step_seconds: list[float]
    select_seconds: list[float]
    decode_batches: list[int]
    failed: int
    host_s: float | None
    # each device call's wall time / the profile's price of it, by kind ("verify", "draft",
    # "expand")
    speeds: dict[str, list[float]]
    # per kind, per second of the replay since its start: (wall time, price) summed over the
    # calls that began in that second
    speed_bins: dict[str, list[list[float]]] = dataclasses.field(default_factory=dict)
    # per kind, when each call of `speeds` began (seconds since the replay's start; its int
    # is the call's index into speed_bins)
    call_starts: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    baseline_tpot_ms: float | None = None  # the replay's own baseline (per-run baselines)
    offered_rps: float | None = None  # of the replay's own arrivals (per-run baselines)


@dataclasses.dataclass(frozen=True, slots=True)
class ReplayRun:
    """One policy's replay: the JSON summary plus the raw request states."""

    policy: str
    summary: dict
    states: list[RequestState]
    raw: _Raw  # what the summary was computed from (rounds of one policy pool these)


def build_requests(
    engine,
    entries: Sequence[TraceEntry],
    *,
    max_output_len: int,
    max_prompt_len: int | None = None,
    baseline_tpot_ms: float | None = None,
) -> list[Request]:
    """Tokenize, truncate and validate the trace entries (before any timing).

    TPOT SLO = the entry's multiple of `baseline_tpot_ms` (default: the engine's).
    """
    baseline = baseline_tpot_ms or engine.baseline_tpot_ms
    if max_output_len <= 0:
        raise ValueError(f"{max_output_len=} must be > 0")
    if engine.tokenizer is None:
        raise ValueError("the target model has no tokenizer: cannot tokenize trace prompts")
    requests = []
    for e in entries:
        out_len = min(e.output_length, max_output_len)
        room = engine.max_len - out_len - SPEC_HEADROOM
        if max_prompt_len is not None:
            room = min(room, max_prompt_len)
        if room <= 0:
            raise ValueError(
                f"entry {e.index}: output length {out_len} leaves no room for the prompt "
                f"in the {engine.max_len}-token context"
            )
        ids = engine.encode_prompt(e.prompt)[:room]
        requests.append(
            engine.make_request(
                ids,
                max_tokens=out_len,
                request_id=f"trace-{e.index}",
                temperature=0.0,
                seed=0,
                category=e.category,
                tpot_slo_ms=e.slo_multiple * baseline,
            )
        )
    return requests


def measure_baseline_tpot_ms(engine, request: Request, repeats: int = 3) -> float:
    """Median TPOT (ms) of `request` served alone, autoregressively, through the scheduler.

    Unlike the start-up profile (the bare device step), this includes the host loop and
    whatever else the machine is running now.
    """
    tpots = []
    for _ in range(repeats):
        sched = engine._scheduler("autoregressive")
        state = sched.submit(request)
        sched.run_until_done()
        if state.mean_tpot_s() is None:
            raise ValueError(f"{request.max_tokens=} must be >= 2 to measure a TPOT")
        tpots.append(state.mean_tpot_s() * 1e3)
    return float(np.median(tpots))


def replay(
    engine,
    policy: str,
    requests: Sequence[Request],
    arrivals_s: np.ndarray,
    *,
    progress: bool = True,
    desc: str | None = None,
) -> ReplayRun:
    """Replay `requests` at `arrivals_s` (seconds from start, sorted) with `policy`."""
    from tqdm import tqdm

    if len(requests) != len(arrivals_s):
        raise ValueError(f"{len(requests)} requests but {len(arrivals_s)} arrival times")
    if np.any(np.diff(arrivals_s) < 0):
        raise ValueError("arrival times must be sorted")
    bar = tqdm(total=len(requests), desc=desc or policy, unit="req", disable=not progress)
    finished: list[float] = []

    def on_finish(state: RequestState) -> None:
        finished.append(sched.clock())
        bar.update(1)

    sched = engine._scheduler(policy, on_finish=on_finish)
    clock = sched.clock
    device_s0 = getattr(engine, "device_seconds", None)
    # how fast the machine ran each kind of device call against its start-up profile
    speeds: dict[str, list[float]] = {kind: [] for kind in SPEED_KINDS}
    bins: dict[str, list[list[float]]] = {kind: [] for kind in SPEED_KINDS}
    call_starts: dict[str, list[float]] = {kind: [] for kind in SPEED_KINDS}
    observes = hasattr(engine, "on_device_call")
    if observes:

        def on_device_call(kind: str, price_s: float, seconds: float) -> None:
            if price_s > 0:
                speeds[kind].append(seconds / price_s)
                start = clock() - seconds - t0
                sec, row = int(start), bins[kind]
                call_starts[kind].append(start)
                while len(row) <= sec:
                    row.append([0.0, 0.0])
                row[sec][0] += seconds
                row[sec][1] += price_s

        engine.on_device_call = on_device_call
    states: list[RequestState] = []
    t0 = clock()
    nxt = 0
    try:
        while nxt < len(requests) or sched.has_work():
            now = clock() - t0
            while nxt < len(requests) and arrivals_s[nxt] <= now:
                state = sched.submit(requests[nxt])
                state.arrival = t0 + float(arrivals_s[nxt])  # TTFT from the scheduled arrival
                states.append(state)
                nxt += 1
            if sched.has_work():
                sched.step()
            elif nxt < len(requests):
                time.sleep(max(0.0, float(arrivals_s[nxt]) - (clock() - t0)))
    finally:
        if observes:
            engine.on_device_call = None
    bar.close()
    wall_s = max((max(finished) if finished else clock()) - t0, 1e-9)
    unfinished = [s.request.request_id for s in states if s.phase is not Phase.DONE]
    if unfinished:
        raise RuntimeError(f"policy {policy}: requests {unfinished[:5]} never finished")
    speculative = parse_policy(policy).speculative
    log = sched.step_log
    host_s = None
    if device_s0 is not None:
        host_s = sum(r.seconds for r in log) - (engine.device_seconds - device_s0)
    raw = _Raw(
        results=[request_result(s, speculative) for s in states],
        wall_s=wall_s,
        step_seconds=[r.seconds for r in log],
        select_seconds=[r.select_seconds for r in log],
        decode_batches=[r.decode_requests for r in log],
        failed=sum(s.finish_reason is FinishReason.ERROR for s in states),
        host_s=host_s,
        speeds=speeds,
        speed_bins=bins,
        call_starts=call_starts,
    )
    return ReplayRun(policy, _summary([raw], arrivals_s), states, raw)


def _summary(raws: Sequence[_Raw], arrivals_s: np.ndarray) -> dict:
    """The JSON summary of one policy's replays of one trace and load, pooled: attainment over
    all their requests, goodput over their summed wall time."""
    log_steps = [x for r in raws for x in r.step_seconds]
    batches = [b for r in raws for b in r.decode_batches if b]
    summary = summarize(
        [x for r in raws for x in r.results],
        sum(r.wall_s for r in raws),
        step_seconds=log_steps,
        select_seconds=[x for r in raws for x in r.select_seconds],
    )
    summary["failed"] = sum(r.failed for r in raws)
    summary["mean_decode_batch"] = float(np.mean(batches)) if batches else 0.0
    summary["offered_rps"] = offered_rps(np.asarray(arrivals_s))
    if all(r.baseline_tpot_ms is not None for r in raws):  # per-run baselines
        summary["baseline_tpot_ms"] = [r.baseline_tpot_ms for r in raws]
        rps = [r.offered_rps for r in raws if r.offered_rps is not None]
        summary["offered_rps"] = float(np.mean(rps)) if rps else None
    # scheduler Python per iteration: iteration wall time outside the engine's device calls
    summary["host_ms_per_iteration"] = None
    if all(r.host_s is not None for r in raws) and log_steps:
        summary["host_ms_per_iteration"] = 1e3 * sum(r.host_s for r in raws) / len(log_steps)
    # per kind of device call, its median wall time over the profile's price of it: how fast
    # the machine ran during this replay (sim/validate.py `--speed cell` prices the run with
    # them); `verify_speed`, `draft_speed`, `expand_speed` (None: no such call was priced)
    for kind in SPEED_KINDS:
        ratios = [x for r in raws for x in r.speeds[kind]]
        summary[f"{kind}_speed"] = float(np.median(ratios)) if ratios else None
    # the same, time-weighted (the calls' summed wall time over their summed price: the ratio
    # that scales a replay's total device time), and per round its per-second trace (None
    # for a second without such calls): `{kind}_time_ratio`, `speed_trace[kind][round]`
    trace: dict[str, list[list[float | None]]] = {}
    for kind in SPEED_KINDS:
        cells = [b for r in raws for b in r.speed_bins.get(kind, [])]
        price = sum(p for _, p in cells)
        summary[f"{kind}_time_ratio"] = sum(w for w, _ in cells) / price if price > 0 else None
        trace[kind] = [
            [None if np.isnan(x) else round(float(x), 4) for x in _per_second(r, kind)]
            for r in raws
        ]
    summary["speed_trace"] = trace
    summary["speed_scatter"] = {kind: _scatter(raws, kind) for kind in SPEED_KINDS}
    # how long a call's deviation from its second's speed persists (bench/speed_memory.py)
    summary["speed_corr_ms"] = correlation_time_ms([_residuals(r) for r in raws])
    if len(raws) > 1:
        summary["repeats"] = len(raws)
    return summary


def run_sweep(
    engine,
    entries: Sequence[TraceEntry],
    requests: Sequence[Request],
    policies: Sequence[str],
    time_scales: Sequence[float],
    *,
    baseline_tpot_ms: float | None = None,
    progress: bool = True,
    log=print,
    on_run: Callable[[list[dict]], None] | None = None,
    repeats: int = 1,
    order: str = "alternate",
    rebaseline: Callable[[], float] | None = None,
    requests_for: Callable[[float], Sequence[Request]] | None = None,
    rebaseline_every: str = "run",
) -> list[dict]:
    """Every policy at every time scale; returns [{time_scale, offered_rps, policies}].

    A policy run that raises is recorded as `{"error": "..."}` and the sweep goes on.

    `requests[i]` is `entries[i]` built by `build_requests`. `on_run(partial)` is called
    after every policy run (e.g. to save partial results of a long sweep).

    `repeats` > 1: at every time scale the policies take turns `repeats` times, so a machine
    whose speed drifts over minutes slows every policy about alike; each policy's summary
    pools its rounds (attainment over all their requests, goodput over their summed wall
    time, `"repeats": N`). `order` "alternate": in reverse order every other round (ABC CBA
    ABC ...; balanced against a steady drift, but the last policy's rounds run back to back,
    so one slow minute can take both); "cycle": the same order every round (ABC ABC ...;
    every policy's rounds the same number of replays apart); "rotate": each round starts one
    policy later (ABC BCA CAB ...): with baselines measured per load or per round, the
    policy right after a measurement runs nearest to the speed the SLOs were set at, and a
    policy's place in the round moves on (with as many rounds as policies, every policy has
    every place once).

    `rebaseline` (with `requests_for`): per-run baselines. Right before every replay the
    baseline TPOT is measured again (`rebaseline()`), and that replay's requests
    (`requests_for(baseline)`: SLOs = the categories' multiples of it) and arrivals (scaled
    by it) are built from it, so every policy is judged against the machine's speed when it
    ran (this shared CPU's speed drifts by tens of percent between minutes). Each summary
    records its rounds' `"baseline_tpot_ms"` (a list). `rebaseline_every="load"`: measured
    once right before each time scale instead, and every policy and round at that scale
    gets the same requests and arrivals (the point records its `"baseline_tpot_ms"`), so the
    policies at one load are compared on equal terms at the machine's speed of that stretch.
    `rebaseline_every="round"`: measured right before each round of a load (one replay of
    every policy), and every policy in that round gets its requests and arrivals: the
    policies of a round compare on equal terms, and the SLOs follow the machine's speed round
    by round instead of standing for all of a load's rounds (at x8 with 5 policies and 3
    rounds, 11 minutes of a CPU whose speed drifts by tens of percent between minutes). Each
    summary records its rounds' `"baseline_tpot_ms"` (a list), as with per-run baselines.
    """
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"{repeats=} must be an int >= 1")
    if order not in SWEEP_ORDERS:
        raise ValueError(f"{order=} must be one of {SWEEP_ORDERS}")
    if (rebaseline is None) != (requests_for is None):
        raise ValueError("rebaseline and requests_for go together")
    if rebaseline_every not in ("run", "load", "round"):
        raise ValueError(f"{rebaseline_every=} must be 'run', 'load' or 'round'")
    per_load = rebaseline is not None and rebaseline_every == "load"
    per_round = rebaseline is not None and rebaseline_every == "round"
    per_run = rebaseline is not None and rebaseline_every == "run"
    out = []
    baseline = baseline_tpot_ms or engine.baseline_tpot_ms
    for scale in time_scales:
        point_requests = requests
        if per_load:
            baseline = float(rebaseline())
            point_requests = requests_for(baseline)
        arrivals = arrival_times_s(list(entries), baseline, scale)
        point = {"time_scale": scale, "offered_rps": offered_rps(arrivals), "policies": {}}
        if per_load:
            point["baseline_tpot_ms"] = baseline
        raws: dict[str, list[_Raw]] = {p: [] for p in policies}
        for rnd in range(repeats):
            if per_round:  # this round's baseline, requests and arrivals: every policy's
                round_base = float(rebaseline())
                round_reqs = requests_for(round_base)
                round_arr = arrival_times_s(list(entries), round_base, scale)
            turn = list(policies)
            if order == "alternate" and rnd % 2 == 1:
                turn.reverse()
            elif order == "rotate":
                k = rnd % len(turn)
                turn = turn[k:] + turn[:k]
            for policy in turn:
                if "error" in point["policies"].get(policy, {}):
                    continue
                desc = f"{policy} x{scale:g}" + (f" ({rnd + 1}/{repeats})" if repeats > 1 else "")
                try:
                    reqs, arr, base = point_requests, arrivals, None
                    if per_run:
                        base = float(rebaseline())
                        reqs = requests_for(base)
                        arr = arrival_times_s(list(entries), base, scale)
                    elif per_round:
                        reqs, arr, base = round_reqs, round_arr, round_base
                    raw = replay(engine, policy, reqs, arr, progress=progress, desc=desc).raw
                    if base is not None:
                        raw = dataclasses.replace(
                            raw, baseline_tpot_ms=base, offered_rps=offered_rps(arr)
                        )
                except Exception as exc:  # one policy's failure must not lose the whole sweep
                    point["policies"][policy] = {"error": f"{type(exc).__name__}: {exc}"}
                    log(f"[{policy} @ time-scale {scale:g}] FAILED: {type(exc).__name__}: {exc}")
                else:
                    raws[policy].append(raw)
                    if len(raws[policy]) == repeats:
                        summary = _summary(raws[policy], arrivals)
                        point["policies"][policy] = summary
                        log(format_summary(policy, scale, summary), flush=True)
                if on_run is not None:
                    on_run([*out, point])
        # keep the caller's policy order in the JSON
        point["policies"] = {p: point["policies"][p] for p in policies if p in point["policies"]}
        out.append(point)
    return out


SCATTER_LEVELS = 51  # quantiles 0, 2, ..., 100% of `speed_scatter`


def _scatter(raws: Sequence[_Raw], kind: str) -> list[float] | None:
    """How this kind of call scattered around its second's speed, pooled over the rounds:
    quantiles (0, 2, ..., 100%) of each call's wall time / price over its second's
    time-weighted ratio (the `speed_trace` entry). None when no call was timed; a simulated
    replay fed the trace draws from it (sim/engine.py SpeedJitter, validate --jitter cell)."""
    rel = [x for r in raws if (x := _relative(r, kind)).size]
    if not rel:
        return None
    q = np.quantile(np.concatenate(rel), np.linspace(0.0, 1.0, SCATTER_LEVELS))
    return [round(float(x), 4) for x in q]


def _relative(raw: _Raw, kind: str) -> np.ndarray:
    """f64[calls]: each call of `kind`'s wall time / price over its second's ratio."""
    ratios = np.asarray(raw.speeds.get(kind, []), np.float64)
    if not ratios.size:  # (`replay` appends a call's ratio and its start together)
        return ratios
    secs = np.asarray(raw.call_starts[kind], np.float64).astype(np.int64)
    return ratios / _per_second(raw, kind)[secs]


def _residuals(raw: _Raw) -> tuple[np.ndarray, np.ndarray]:
    """Every timed call of one replay, all kinds, in order of start: (starts in s, wall time
    / price over its second's ratio for its kind), for `correlation_time_ms`."""
    starts = [np.asarray(raw.call_starts.get(k, []), np.float64) for k in SPEED_KINDS]
    rel = [_relative(raw, k) for k in SPEED_KINDS]
    t, x = np.concatenate(starts), np.concatenate(rel)
    order = np.argsort(t, kind="stable")
    return t[order], x[order]


def _per_second(raw: _Raw, kind: str) -> np.ndarray:
    """f64[seconds]: each second's calls of `kind`, summed wall time over summed price (NaN for
    a second without such calls)."""
    bins = np.asarray(raw.speed_bins.get(kind, []), np.float64).reshape(-1, 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(bins[:, 1] > 0, bins[:, 0] / bins[:, 1], np.nan)


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(policy: str, time_scale: float, s: dict) -> str:
    """A few human-readable lines for one policy run."""
    lines = [
        f"[{policy} @ time-scale {time_scale:g}] attainment {_fmt(s['attainment'], '.1%')} "
        f"(violations {_fmt(s['violations'], '.1%')}), goodput "
        f"{s['goodput_tokens_per_s']:.1f} tok/s, throughput {s['throughput_tokens_per_s']:.1f} "
        f"tok/s, wall {s['wall_s']:.1f} s",
        f"    TTFT p50/p99 {_fmt(s['ttft_p50_ms'])}/{_fmt(s['ttft_p99_ms'])} ms, TPOT p50/p99 "
        f"{_fmt(s['tpot_p50_ms'])}/{_fmt(s['tpot_p99_ms'])} ms, accepted/step "
        f"{s['mean_accepted_per_step']:.2f}, selection overhead {s['selection_overhead']:.2%}, "
        f"mean decode batch {s['mean_decode_batch']:.1f}",
    ]
    for cat, c in s["per_category"].items():
        lines.append(
            f"    {cat:<13} n={c['requests']:<3} SLO {c['tpot_slo_ms']:.1f} ms: attainment "
            f"{c['attainment']:.1%}, TTFT p50/p99 {_fmt(c['ttft_p50_ms'])}/"
            f"{_fmt(c['ttft_p99_ms'])} ms, TPOT p50/p99 {_fmt(c['tpot_p50_ms'])}/"
            f"{_fmt(c['tpot_p99_ms'])} ms"
        )
    return "\n".join(lines)

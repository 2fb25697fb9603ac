"""Replay a multi-SLO trace against the real `Scheduler` driving a `SimEngine`.

The same open-loop client as the real bench (bench/replay.py), on a virtual clock:

  1. Every trace entry becomes a `Request` with `input_length` prompt tokens (or the prompt's
     length under the real tokenizer, truncated as the real bench truncates it, when a
     tokenizer is given), `min(output_length, max_output_len)` output tokens and the TPOT SLO
     of its category (`multiple x baseline_tpot_ms` of the profile).
  2. The virtual clock starts at 0; requests are submitted once their scaled arrival time has
     passed (TTFT counts from the scheduled arrival). When the scheduler is idle, the clock
     jumps to the next arrival: nothing ever sleeps.
  3. `step()` runs the scheduler's own iteration; the engine advances the clock.
  4. The run ends when the last request finishes; wall time = its virtual finish time.

Results use the real bench's metrics (bench/metrics.py), so the JSON schema is the same.
Extra per-policy fields: `sim_seconds` (host seconds the replay took) and `host_overhead`
(scheduler host CPU time per iteration, outside the engine, as a share of the virtual
iteration; CPU time, so other processes on the machine do not inflate it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from adaserve_jax.bench.metrics import request_result, summarize
from adaserve_jax.bench.workload import TraceEntry, offered_rps
from adaserve_jax.scheduler.loop import Scheduler
from adaserve_jax.scheduler.policy import parse_policy
from adaserve_jax.scheduler.request import Phase, Request, RequestState
from adaserve_jax.sim.calibration import Calibration
from adaserve_jax.sim.engine import SimEngine, SpeedJitter, SpeedTrace, VirtualClock
from adaserve_jax.sim.profiles import SimProfile

PAPER_SLO_MULTIPLE = {"coding": 1.2, "chat": 50.0 / 30.0, "summarization": 5.0}


@dataclasses.dataclass(frozen=True, slots=True)
class SimSettings:
    """Engine and scheduler sizing of one simulated replay."""

    max_batch: int = 128  # KV slots = max running requests
    token_budget: int = 1024  # tokens per verify step
    prefill_chunk: int = 512  # sarathi's per-step prefill chunk
    prefill_floor: int = 0  # adaserve: tokens per step kept for prompts before trees
    slo_pacing: bool = True  # adaserve: SLO pacing of plain-decoding steps (scheduler/pacing.py)
    max_len: int = 4096  # context per slot
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_batch", "token_budget", "prefill_chunk", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")
        if self.max_batch > self.token_budget:
            raise ValueError(
                f"max_batch={self.max_batch} exceeds token_budget={self.token_budget}: "
                "every request needs its root"
            )


def build_requests(
    entries: Sequence[TraceEntry],
    baseline_tpot_ms: float,
    *,
    max_output_len: int,
    max_len: int,
    prompt_lengths: Sequence[int] | None = None,
    max_prompt_len: int | None = None,
) -> list[Request]:
    """Token-free requests: prompt ids are placeholders of the right length."""
    if max_output_len <= 0:
        raise ValueError(f"{max_output_len=} must be > 0")
    out = []
    for i, e in enumerate(entries):
        out_len = min(e.output_length, max_output_len)
        n = e.input_length if prompt_lengths is None else prompt_lengths[i]
        n = max(1, min(n, max_len - out_len, max_prompt_len or n))
        out.append(
            Request(
                request_id=f"trace-{e.index}",
                prompt_ids=(1,) * n,
                max_tokens=out_len,
                tpot_slo_ms=PAPER_SLO_MULTIPLE[e.category] * baseline_tpot_ms,
                category=e.category,
            )
        )
    return out


def tokenized_lengths(
    entries: Sequence[TraceEntry],
    tokenizer_path: str,
    *,
    max_len: int,
    max_output_len: int,
    max_prompt_len: int | None = None,
) -> list[int]:
    """Prompt lengths exactly as bench/replay.py truncates them (head kept)."""
    from adaserve_jax.model.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    out = []
    for e in entries:
        room = max_len - min(e.output_length, max_output_len)
        if max_prompt_len is not None:
            room = min(room, max_prompt_len)
        out.append(min(len(tok.encode(e.prompt)), room))
    return out


@dataclasses.dataclass(slots=True)
class SimRun:
    policy: str
    summary: dict
    states: list[RequestState]
    host_step_s: np.ndarray  # f64[I] scheduler host seconds per iteration (engine excluded)
    virtual_step_s: np.ndarray  # f64[I] virtual seconds per iteration
    running: np.ndarray  # i64[I] decode requests per iteration
    budget_tokens: np.ndarray  # i64[I] tokens verified per iteration


def simulate(
    profile: SimProfile,
    calibration: Calibration,
    policy: str,
    requests: Sequence[Request],
    arrivals_s: np.ndarray,
    settings: SimSettings = SimSettings(),
    speed: SpeedTrace | None = None,
    jitter: SpeedJitter | None = None,
) -> SimRun:
    """Replay `requests` at `arrivals_s` (sorted seconds from 0) with `policy`; `speed`
    scales the device calls over time and `jitter` scatters each call around it (sim/engine.py)."""
    if len(requests) != len(arrivals_s):
        raise ValueError(f"{len(requests)} requests but {len(arrivals_s)} arrival times")
    arrivals_s = np.asarray(arrivals_s, np.float64)
    if np.any(np.diff(arrivals_s) < 0):
        raise ValueError("arrival times must be sorted")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    clock = VirtualClock()
    engine = SimEngine(
        profile,
        calibration,
        num_slots=settings.max_batch,
        max_len=settings.max_len,
        clock=clock,
        seed=settings.seed,
        speed=speed,
        jitter=jitter,
    )
    finished: list[float] = []
    sched = Scheduler(
        engine,
        policy=policy,
        token_budget=settings.token_budget,
        prefill_chunk=settings.prefill_chunk,
        prefill_floor=settings.prefill_floor,
        slo_pacing=settings.slo_pacing,
        clock=clock,
        profile=profile.latency_profile(),
        on_finish=lambda s: finished.append(clock()),
    )
    states: list[RequestState] = []
    host: list[float] = []
    nxt, total = 0, len(requests)
    while nxt < total or sched.has_work():
        now = clock()
        while nxt < total and arrivals_s[nxt] <= now:
            state = sched.submit(requests[nxt])
            state.arrival = float(arrivals_s[nxt])
            states.append(state)
            nxt += 1
        if sched.has_work():
            w0, e0, it = time.thread_time(), engine.cpu_seconds, sched.iterations
            sched.step()
            if sched.iterations > it:
                host.append(time.thread_time() - w0 - (engine.cpu_seconds - e0))
        elif nxt < total:
            clock.advance_to(arrivals_s[nxt])
    unfinished = [s.request.request_id for s in states if s.phase is not Phase.DONE]
    if unfinished:
        raise RuntimeError(f"policy {policy}: requests {unfinished[:5]} never finished")
    wall_s = max(max(finished, default=0.0), 1e-9)
    speculative = parse_policy(policy).speculative
    log = sched.step_log
    summary = summarize(
        [request_result(s, speculative) for s in states],
        wall_s,
        step_seconds=[r.seconds for r in log],
        select_seconds=[r.select_seconds for r in log],
    )
    virtual = np.array([r.seconds for r in log])
    host_arr = np.array(host)
    decode = np.array([r.decode_requests for r in log])
    summary["failed"] = 0
    summary["mean_decode_batch"] = float(decode[decode > 0].mean()) if np.any(decode) else 0.0
    summary["offered_rps"] = offered_rps(arrivals_s)
    summary["host_overhead"] = float(host_arr.sum() / virtual.sum()) if virtual.sum() else 0.0
    summary["sim_seconds"] = time.perf_counter() - t_start
    summary["sim_cpu_seconds"] = time.process_time() - cpu_start
    return SimRun(
        policy,
        summary,
        states,
        host_arr,
        virtual,
        decode,
        np.array([r.tokens for r in log]),
    )

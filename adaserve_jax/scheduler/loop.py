"""The host scheduling loop (numpy only; never imports jax).

A request's life:
  1. `submit` validates it (prompt fits the context, max_tokens > 0) and queues it
     as WAITING. Nothing touches the device for an invalid request.
  2. `step` admits WAITING requests while KV slots are free (slot allocator), in
     arrival order; each becomes PREFILL.
  3. Every iteration builds one flat batch under the token budget: first the
     DECODE requests (each a tree: the pending token as root, plus any
     speculated nodes the policy selects), then chunks of PREFILL prompts with
     what is left (chunked prefill shares the budget with decoding).
  4. The engine runs the batch; the tokens a request gains are appended to its
     output and streamed to `on_tokens`; the prompt's last chunk yields the first
     output token and moves the request to DECODE.
  5. A request finishes on max_tokens, EOS, a stop string, a full slot, or
     cancellation; its slot is freed in the same iteration and reused by the next
     WAITING request (continuous batching).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from adaserve_jax.engine.batch import Segment
from adaserve_jax.engine.kv_alloc import SlotAllocator
from adaserve_jax.scheduler.request import FinishReason, Phase, Request, RequestState

TokenCallback = Callable[[RequestState, list[int]], None]


class StepEngine(Protocol):
    num_slots: int
    max_len: int

    def forward(self, segments: list[Segment]) -> tuple[np.ndarray, tuple[int, ...]]:
        """Run the target on the segments; returns (sampled next token per token, offsets)."""
        ...


class Scheduler:
    def __init__(
        self,
        engine: StepEngine,
        *,
        token_budget: int = 256,
        eos_id: int | None = None,
        decode_text: Callable[[list[int]], str] | None = None,
        on_tokens: TokenCallback | None = None,
        on_finish: Callable[[RequestState], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if token_budget < 1:
            raise ValueError(f"{token_budget=} must be >= 1")
        self.engine = engine
        self.token_budget = token_budget
        self.eos_id = eos_id
        self.decode_text = decode_text
        self.on_tokens = on_tokens
        self.on_finish = on_finish
        self.clock = clock
        self.alloc = SlotAllocator(engine.num_slots, engine.max_len)
        self.waiting: collections.deque[RequestState] = collections.deque()
        self.running: list[RequestState] = []
        self.iterations = 0

    # ---- public ----------------------------------------------------------------------
    def submit(self, request: Request) -> RequestState:
        need = len(request.prompt_ids) + request.max_tokens
        if need > self.engine.max_len:
            raise ValueError(
                f"request {request.request_id!r}: prompt ({len(request.prompt_ids)} tokens) + "
                f"max_tokens ({request.max_tokens}) = {need} exceeds the context of "
                f"{self.engine.max_len} tokens"
            )
        state = RequestState(request, arrival=self.clock())
        self.waiting.append(state)
        return state

    def cancel(self, state: RequestState) -> None:
        if state.phase is Phase.DONE:
            return
        if state in self.waiting:
            self.waiting.remove(state)
        self._finish(state, FinishReason.CANCELLED)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def step(self) -> None:
        """One iteration: admit, plan one flat batch, run it, commit the results."""
        self._admit()
        if not self.running:
            return
        decode = [r for r in self.running if r.phase is Phase.DECODE]
        segments: list[Segment] = [
            Segment.chain(r.slot, r.cached, [r.pending_token], r.request.sampling) for r in decode
        ]
        budget = self.token_budget - len(segments)
        prefill: list[tuple[RequestState, int]] = []
        for r in self.running:
            if r.phase is not Phase.PREFILL or budget <= 0:
                continue
            n = min(r.prompt_len - r.cached, budget)
            chunk = r.request.prompt_ids[r.cached : r.cached + n]
            segments.append(Segment.chain(r.slot, r.cached, chunk, r.request.sampling))
            prefill.append((r, n))
            budget -= n
        sampled, offsets = self.engine.forward(segments)
        now = self.clock()
        for r, off in zip(decode, offsets, strict=False):
            r.cached += 1
            self._emit(r, [int(sampled[off])], now)
        for (r, n), off in zip(prefill, offsets[len(decode) :], strict=True):
            r.cached += n
            if r.cached == r.prompt_len:
                r.phase = Phase.DECODE
                self._emit(r, [int(sampled[off + n - 1])], now)
        self.iterations += 1

    # ---- internals -------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and self.alloc.free_slots:
            r = self.waiting.popleft()
            r.slot = self.alloc.admit(r.request.request_id, r.prompt_len + r.request.max_tokens)
            r.phase = Phase.PREFILL
            self.running.append(r)

    def _emit(self, r: RequestState, tokens: list[int], now: float) -> None:
        """Append produced tokens, applying the finish rules token by token."""
        kept: list[int] = []
        reason = None
        for tok in tokens:
            kept.append(tok)
            r.output.append(tok)
            if self.eos_id is not None and tok == self.eos_id:
                reason = FinishReason.EOS
            elif len(r.output) >= r.request.max_tokens:
                reason = FinishReason.LENGTH
            elif r.request.stop and self.decode_text is not None:
                text = self.decode_text(r.output)
                if any(s in text for s in r.request.stop):
                    reason = FinishReason.STOP
            if reason is not None:
                break
        if r.first_token_time is None:
            r.first_token_time = now
        r.last_token_time = now
        if self.on_tokens is not None and kept:
            self.on_tokens(r, kept)
        if reason is not None:
            self._finish(r, reason)

    def _finish(self, r: RequestState, reason: FinishReason) -> None:
        r.finish_reason = reason
        r.phase = Phase.DONE
        if r in self.running:
            self.running.remove(r)
            self.alloc.free(r.slot)
        if self.on_finish is not None:
            self.on_finish(r)

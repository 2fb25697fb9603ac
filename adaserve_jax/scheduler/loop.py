"""The host scheduling loop (numpy only; never imports jax).

A request's life:
  1. `submit` validates it (prompt fits the context, max_tokens > 0) and queues it
     as WAITING. Nothing touches the device for an invalid request.
  2. `step` admits WAITING requests while KV slots are free (slot allocator), in
     arrival order; each becomes PREFILL.
  3. Every iteration builds one flat batch under the token budget: first the
     DECODE requests (each a tree: the pending token as root, plus any
     speculated nodes the policy selects), then chunks of PREFILL prompts with
     what is left (chunked prefill shares the budget with decoding). AdaServe
     on hardware where batching slows the step paces its plain steps: a request
     ahead of its SLO may sit out, and a prompt waits until its request can
     keep its SLO once decoding (scheduler/pacing.py).
  4. The engine runs the batch; the tokens a request gains are appended to its
     output and streamed to `on_tokens`; the prompt's last chunk yields the first
     output token and moves the request to DECODE.
  5. A request finishes on max_tokens, EOS, a stop string, a full slot, or
     cancellation; its slot is freed in the same iteration and reused by the next
     WAITING request (continuous batching).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from adaserve_jax.engine.batch import Move, Segment, SegmentBatch
from adaserve_jax.engine.kv_alloc import SlotAllocator
from adaserve_jax.engine.tree import DraftTrees, TreeShape
from adaserve_jax.scheduler.budget import LatencyProfile
from adaserve_jax.scheduler.confidence import AcceptanceCalibrator
from adaserve_jax.scheduler.paced_steps import PacedSteps
from adaserve_jax.scheduler.pacing import StepTimes
from adaserve_jax.scheduler.policy import (
    ADASERVE_RESERVE,
    Policy,
    PolicyKind,
    fit_adaserve_shape,
    parse_policy,
)
from adaserve_jax.scheduler.request import FinishReason, Phase, Request, RequestState
from adaserve_jax.scheduler.roster import Roster
from adaserve_jax.scheduler.segments import chain_segments, roots
from adaserve_jax.scheduler.speculative_steps import SpeculativeSteps, VerifyPlan

TokenCallback = Callable[[RequestState, list[int]], None]


@dataclasses.dataclass(frozen=True, slots=True)
class StepRecord:
    seconds: float  # wall time of the iteration
    tokens: int  # target tokens verified / prefilled
    decode_requests: int
    accepted: int  # drafted tokens accepted (bonus tokens not counted)
    select_seconds: float = 0.0  # host time in budget choice + selection


class StepEngine(Protocol):
    """What the scheduler drives. Optional attribute `pads_to_buckets` (bool, default True):
    whether a step is priced at the compiled token bucket it pads to (the real engine) or at
    its exact token count (the simulator on an interpolated profile); SLO pacing reads it."""

    num_slots: int
    max_len: int
    has_draft: bool

    def forward(
        self, segments: Sequence[Segment], moves: list[Move]
    ) -> tuple[np.ndarray, tuple[int, ...]]:
        """Run the target; returns (sampled token per batch token, segment offsets). The
        scheduler passes a `SegmentBatch` (engine/batch.py: flat arrays, also a sequence of
        segments)."""
        ...

    def draft_step(self, segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray, tuple]:
        """Run the draft; returns (top-k log-probs [n,k], top-k tokens [n,k], offsets)."""
        ...

    def expand(self, root_vals, root_toks, root_pos, shape: TreeShape) -> DraftTrees:
        """Grow candidate trees for every slot (row s = slot s)."""
        ...


class Scheduler(PacedSteps, SpeculativeSteps):
    """The host loop (see the module docstring); SLO pacing and speculative iterations live in
    scheduler/paced_steps.py and scheduler/speculative_steps.py."""

    def __init__(
        self,
        engine: StepEngine,
        *,
        policy: Policy | str = "autoregressive",
        token_budget: int = 256,
        prefill_chunk: int = 64,
        prefill_floor: int = 0,
        adaserve_reserve: int = ADASERVE_RESERVE,
        eos_id: int | None = None,
        decode_text: Callable[[list[int]], str] | None = None,
        on_tokens: TokenCallback | None = None,
        on_finish: Callable[[RequestState], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        profile: LatencyProfile | None = None,
        slo_pacing: bool = True,
    ) -> None:
        if token_budget < 1:
            raise ValueError(f"{token_budget=} must be >= 1")
        self.engine = engine
        self.policy = parse_policy(policy) if isinstance(policy, str) else policy
        if self.policy.speculative and not engine.has_draft:
            raise ValueError(f"policy {self.policy.name!r} needs a draft model")
        if self.policy.kind is PolicyKind.ADASERVE:
            # AdaServe's candidate tree is its own choice: shallower when a deep one would not
            # fit the draft's catch-up step (every slot may accept depth + 1 tokens)
            shape = fit_adaserve_shape(self.policy.shape, token_budget, engine.num_slots)
            self.policy = dataclasses.replace(self.policy, shape=shape)
        if self.policy.shape is not None:
            need = engine.num_slots * (self.policy.shape.depth + 1)
            if token_budget < need:
                raise ValueError(
                    f"{token_budget=} is below {engine.num_slots} slots x (depth "
                    f"{self.policy.shape.depth} + 1) = {need}: the draft's catch-up step "
                    f"would not fit; lower max_batch or the depth, or raise the budget"
                )
        self.token_budget = token_budget
        self.prefill_chunk = prefill_chunk
        if not isinstance(prefill_floor, int) or not 0 <= prefill_floor <= token_budget:
            raise ValueError(f"{prefill_floor=} must be an int in [0, token_budget]")
        # adaserve: tokens per step kept for waiting prompts before candidate trees are
        # reserved (0: trees first, best TPOT attainment, prompts queue under overload; larger:
        # lower TTFT, more requests decoding at once, tighter SLOs missed sooner; SIMULATION.md)
        self.prefill_floor = prefill_floor
        if not isinstance(adaserve_reserve, int) or adaserve_reserve < 1:
            raise ValueError(f"{adaserve_reserve=} must be an int >= 1")
        # adaserve: tokens per decoding request kept from prefill (policy.ADASERVE_RESERVE)
        self.adaserve_reserve = adaserve_reserve
        self.profile = profile
        # adaserve with a profile: in iterations without speculation (one token per request),
        # requests ahead of their SLO may sit out a step and prompt chunks are sized to the
        # decoding requests' slack (scheduler/pacing.py)
        self.slo_pacing = bool(slo_pacing)
        self._times: StepTimes | None = None  # plain-step seconds by tokens (observed)
        self._pacing_on: bool | None = None  # decided once, from the profile
        # with pacing: moving average of how much longer a speculative iteration took than the
        # budget rule's estimate (draft and verify calls, host), charged to drafting from then on
        self._spec_overrun_ms = 0.0
        self._spec_predicted_s: float | None = None
        self.max_skips = 4
        self.calibrator = AcceptanceCalibrator()
        # what `_speculate` sent to verify this step, for `_commit_trees` (speculative_steps.py)
        self._verify: VerifyPlan | None = None
        self._roster: Roster | None = None  # the decoding requests' fixed fields, as arrays
        self._slack_memo: tuple | None = None  # (iteration, decode list, `_slack` of it)
        self._rank = np.zeros((0, 0), np.int32)
        self._select_seconds = 0.0
        self._prefill_tokens = 0
        # `reuse_draft_kv=False` ignores the draft cache's K/V of verified nodes
        # (steps/expand.py) and catches every accepted token up (for tests)
        self.reuse_draft_kv = True
        # adaserve: after a roots-only budget choice the next iterations skip the draft model
        # entirely (plain decoding, no drafting cost); after `_explore_gap` such iterations one
        # speculative iteration re-checks the choice with fresh trees. The gap starts at
        # `explore_every` and doubles (up to `explore_max`) while explorations keep choosing
        # roots only, so a machine where speculation does not pay wastes little on drafting.
        # While the draft is off it runs over nothing: prompts are prefilled by the target
        # alone and the draft's cache falls behind by a token per decoding request and
        # iteration. Only when an exploration is due is it caught up (`_skip_drafting`: draft
        # steps over up to a budget of the backlog, oldest tokens first, until the rest fits the
        # exploration's own draft step), so a request that finishes between explorations never
        # costs a draft call.
        self._draft_off = False
        self._draft_off_iters = 0
        self._catch_up_tokens = 0  # > 0: this roots-only iteration catches the draft up
        self.explore_every = 8
        # 256, not 64: on this CPU explorations keep confirming roots only, and every one
        # (with the catch-up it needs) costs the running requests a slow step; at the paper's
        # scale AdaServe's attainment moved by at most 1.3 pp (SIMULATION.md)
        self.explore_max = 256
        self._explore_gap = self.explore_every
        # the trees the last exploration drafted (parents, raw log f, depths, sibling ranks;
        # None before the first) let a due exploration be judged in advance
        # (`_speculation_could_pay`): one whose roots-only outcome is foregone is skipped, its
        # catch-up included, except every `predicted_skips_max`-th in a row
        self._explored: tuple[np.ndarray, ...] | None = None
        self._predicted_skips = 0
        self.predicted_skips_max = 4
        self._judged_worth = False  # the due exploration was judged worth running
        self.node_share = 1.0  # adaserve per-request node cap, in fair shares of the budget
        self.eos_id = eos_id
        self.decode_text = decode_text
        self.on_tokens = on_tokens
        self.on_finish = on_finish
        self.clock = clock
        self.alloc = SlotAllocator(engine.num_slots, engine.max_len)
        self.waiting: collections.deque[RequestState] = collections.deque()
        self.running: list[RequestState] = []
        self.iterations = 0
        self.step_log: list[StepRecord] = []
        self._moves: list[Move] = []

    # ---- public ----------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """ValueError if the request can never run on this engine."""
        need = len(request.prompt_ids) + request.max_tokens
        if need > self.engine.max_len:
            raise ValueError(
                f"request {request.request_id!r}: prompt ({len(request.prompt_ids)} tokens) + "
                f"max_tokens ({request.max_tokens}) = {need} exceeds the context of "
                f"{self.engine.max_len} tokens"
            )

    def submit(self, request: Request) -> RequestState:
        self.check(request)
        state = RequestState(request, arrival=self.clock())
        self.waiting.append(state)
        return state

    def cancel(self, state: RequestState) -> None:
        if state.phase is Phase.DONE:
            return
        if state in self.waiting:
            self.waiting.remove(state)
        self._finish(state, FinishReason.CANCELLED)

    def fail(self, state: RequestState) -> None:
        """Finish a request with an error (its slot is freed)."""
        self._finish(state, FinishReason.ERROR)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def step(self) -> None:
        """One iteration: admit, plan one flat batch, (speculate,) run it, commit the results."""
        t0 = self.clock()
        self._admit()
        if not self.running:
            return
        decode = [r for r in self.running if r.phase is Phase.DECODE]
        prefilling = []  # running = decoding + prefilling requests
        if len(decode) < len(self.running):
            prefilling = [r for r in self.running if r.phase is Phase.PREFILL]
        self._catch_up_tokens = 0
        spec = self.policy.speculative and bool(decode) and not self._skip_drafting(decode)
        self._select_seconds = 0.0
        prefill_budget = self.token_budget
        if spec:
            if prefilling and self._pacing_applies():
                # a speculative step admits prompts on the same terms as a paced plain step
                prefilling = self._gate_prompts(prefilling, *self._slack(decode))
            reserve = self._decode_reserve(decode, prefilling)
        else:
            if decode and self._pacing_applies():
                decode, prefilling, limit = self._pace(decode, prefilling)
                prefill_budget = min(prefill_budget, limit)
            reserve = max(len(decode), self._catch_up_tokens)
        prefill = self._plan_prefill(prefilling, budget=prefill_budget - reserve)
        self._prefill_tokens = sum(n for _, n in prefill)
        prefill_segs = [
            Segment.chain(
                r.slot, r.cached, r.request.prompt_ids[r.cached : r.cached + n], r.request.sampling
            )
            for r, n in prefill
        ]
        if spec:
            decode_segs, decode_tokens = self._speculate(decode, prefill)
        else:
            decode_segs, decode_tokens = self._root_segments(decode), len(decode)
            if self.engine.has_draft and self.policy.speculative:
                self._plain_draft_step(decode, prefill)
        moves, self._moves = self._moves, []
        sampled, offsets = self.engine.forward(decode_segs + prefill_segs, moves)
        now = self.clock()
        accepted = 0
        if spec and decode:
            accepted = self._commit_trees(decode, decode_segs, sampled, offsets, now)
        elif decode:
            for r in decode:
                r.cached += 1
            roots = sampled[np.asarray(offsets[: len(decode)], np.int64)].tolist()
            self._emit_chunks(decode, roots, range(1, len(decode) + 1), now)
        for (r, n), off in zip(prefill, offsets[len(decode) :], strict=True):
            r.cached += n
            if r.cached == r.prompt_len:
                r.phase = Phase.DECODE
                self._emit(r, [int(sampled[off + n - 1])], now)
        if spec:
            self.calibrator.flush()
            if self._draft_off:  # explorations are rare: what this one verified counts now
                self.calibrator.refit()
            if self._spec_predicted_s is not None:
                over = (now - t0 - self._spec_predicted_s) * 1e3
                self._spec_overrun_ms += 0.2 * (over - self._spec_overrun_ms)
                self._spec_predicted_s = None
        elif self._pacing_applies():
            self._step_times().observe(decode_tokens + self._prefill_tokens, now - t0)
        self.iterations += 1
        self.step_log.append(
            StepRecord(
                seconds=now - t0,
                tokens=decode_tokens + self._prefill_tokens,
                decode_requests=len(decode),
                accepted=accepted,
                select_seconds=self._select_seconds,
            )
        )

    def _skip_drafting(self, decode: list[RequestState]) -> bool:
        """AdaServe only: decode this iteration without the draft model (see `_draft_off`).

        When an exploration is due, it runs once the draft's whole backlog (the decoding
        requests' catch-up chains and the prompt tokens it skipped) fits its draft step beside
        two tokens a request; until then each iteration the slack allows catches up to a budget
        of the backlog (`_catch_up_tokens`, `_plain_draft_step`), unless the exploration can
        never fit (three tokens a request exceed the budget). A due exploration that the last
        one's acceptance says would choose roots only again is skipped, catch-up and all
        (`_speculation_could_pay`)."""
        if self.policy.kind is not PolicyKind.ADASERVE or not self._draft_off:
            return False
        if self._draft_off_iters >= self._explore_gap and not self._judged_worth:
            # judged once per due exploration (it may wait for slack or catch-up steps)
            if self._speculation_could_pay(decode):
                self._judged_worth = True
            else:  # the last exploration's trees say this one would choose roots only again
                self._explore_gap = min(2 * self._explore_gap, self.explore_max)
                self._draft_off_iters = 0
        if self._draft_off_iters >= self._explore_gap:
            lag = self._draft_backlog(decode)
            if lag + 2 * len(decode) <= self.token_budget:
                if self._exploration_affordable(decode):
                    return False  # explore
            elif 3 * len(decode) <= self.token_budget:
                # (the backlog never drops below the n pending tokens: with 3n > budget the
                # exploration can never follow, and catching up would only spend draft steps)
                chunk = min(lag, self.token_budget)
                if self._catch_up_affordable(decode, chunk):
                    self._catch_up_tokens = chunk
        self._draft_off_iters += 1
        return True

    def _plain_draft_step(
        self, decode: list[RequestState], prefill: list[tuple[RequestState, int]]
    ) -> None:
        """The draft's step in an iteration that does not speculate. With AdaServe's draft off
        it runs only to catch up `_catch_up_tokens` of the backlog before an exploration;
        otherwise it prefills this step's prompt chunks beside the target, so that the next
        speculative step can draft from them."""
        if self._draft_off:
            if self._catch_up_tokens:
                self._draft_run(self._backlog_chunk(decode, self._catch_up_tokens))
            return
        self._draft_run(self._draft_prefill(prefill))

    def _draft_run(self, plan: list[tuple[RequestState, int, int]]) -> None:
        """One draft step over rows [start, stop) of each planned request; commits them."""
        if not plan:
            return
        self.engine.draft_step(chain_segments(plan))
        for r, _, b in plan:
            r.draft_cached = b

    def _draft_prefill(
        self, prefill: list[tuple[RequestState, int]]
    ) -> list[tuple[RequestState, int, int]]:
        """The draft's rows for the prompts: every prefilling request from what its draft
        cache holds up to what the target holds after this step's chunk (its own chunk, and
        the prompt tokens skipped while the draft was off)."""
        chunk = {id(r): n for r, n in prefill}
        plan = []
        for r in self.running:
            if r.phase is Phase.PREFILL:
                stop = r.cached + chunk.get(id(r), 0)
                if stop > r.draft_cached:
                    plan.append((r, r.draft_cached, stop))
        return plan

    def _backlog_chunk(
        self, decode: list[RequestState], limit: int
    ) -> list[tuple[RequestState, int, int]]:
        """Up to `limit` of the draft's backlog, request by request: the decoding requests'
        catch-up chains (up to and including the pending token) first, then the prompt tokens
        the target has prefilled and the draft has not."""
        plan = []
        ends = [(r, r.cached + 1) for r in decode]
        ends += [(r, r.cached) for r in self.running if r.phase is Phase.PREFILL]
        for r, end in ends:
            take = min(end - r.draft_cached, limit)
            if take > 0:
                plan.append((r, r.draft_cached, r.draft_cached + take))
                limit -= take
            if limit <= 0:
                break
        return plan

    def _decode_reserve(self, decode: list[RequestState], prefilling: list[RequestState]) -> int:
        """Budget kept for decoding requests before prefill chunks are planned.

        Covers both steps that carry the prefill chunks: the target's verify step (roots, or
        the fixed tree of a fixed policy) and, under speculation, the draft step (each
        request's catch-up chain of accepted tokens + root).
        """
        n = len(decode)
        shape = self.policy.shape
        if shape is None:
            return n
        catch_up = self._draft_backlog(decode)
        if self.policy.kind is PolicyKind.ADASERVE:
            # `adaserve_reserve` tokens per decoding request (at least its candidate tree),
            # minus the prefill floor and the prompts of requests that asked for a first-token
            # deadline (ttft_slo_ms): those are prefilled before the reservation
            floor = max(self.prefill_floor, self._ttft_prompt_tokens(prefilling))
            per_request = max(shape.num_nodes, self.adaserve_reserve)
            verify = min(n * per_request, max(n, self.token_budget - floor))
        else:
            verify = n * (1 + shape.depth * shape.width)
        return max(verify, catch_up)

    def _draft_backlog(self, decode: list[RequestState]) -> int:
        """Tokens the draft cache lacks: the decoding requests' catch-up chains (up to and
        including each pending token) and the prompt tokens the target has prefilled and the
        draft has not (AdaServe skips them while its draft is off)."""
        prompts = [r.cached - r.draft_cached for r in self.running if r.phase is Phase.PREFILL]
        return sum([r.cached - r.draft_cached for r in decode]) + len(decode) + sum(prompts)

    @staticmethod
    def _ttft_prompt_tokens(prefilling: list[RequestState]) -> int:
        """Prompt tokens still to prefill of admitted requests with a TTFT SLO."""
        return sum(r.prompt_len - r.cached for r in prefilling if r.request.ttft_slo_ms is not None)

    def _plan_prefill(
        self, prefilling: list[RequestState], budget: int
    ) -> list[tuple[RequestState, int]]:
        """Prompt chunks for the PREFILL requests (in running order) within `budget`."""
        plan = []
        if self.policy.kind is PolicyKind.SARATHI:
            budget = min(budget, self.prefill_chunk)
        # requests with a TTFT SLO first (stable: arrival order within each group)
        prefilling = sorted(prefilling, key=lambda r: r.request.ttft_slo_ms is None)
        for r in prefilling:
            if budget <= 0:
                break
            n = min(r.prompt_len - r.cached, budget)
            plan.append((r, n))
            budget -= n
        return plan

    def _root_segments(self, decode: list[RequestState]) -> SegmentBatch:
        """One token per decoding request (its pending token): plain decoding."""
        roster = self._roster_of(decode)
        lens, parents = roots(len(decode))
        tokens = np.array([r.output[-1] for r in decode], np.int32)
        cached = [r.cached for r in decode]
        return SegmentBatch.trusted(roster.slots, cached, lens, tokens, parents, roster.sampling)

    def _roster_of(self, decode: list[RequestState]) -> Roster:
        if self._roster is None or not self._roster.matches(decode):
            self._roster = Roster.build(decode)
        return self._roster

    # ---- internals -------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and self.alloc.free_slots:
            r = self.waiting.popleft()
            r.slot = self.alloc.admit(r.request.request_id, r.prompt_len + r.request.max_tokens)
            r.phase = Phase.PREFILL
            self.running.append(r)

    def _emit(self, r: RequestState, tokens: list[int], now: float) -> None:
        """Append produced tokens, applying the finish rules token by token."""
        self._emit_chunks([r], tokens, (len(tokens),), now)

    def _emit_chunks(
        self, reqs: list[RequestState], tokens: list[int], ends: Sequence[int], now: float
    ) -> None:
        """`_emit(reqs[i], tokens[ends[i - 1]:ends[i]], now)` for every request: a chunk in
        which no finish rule fires (no EOS, below max_tokens, no stop string) is appended whole;
        otherwise the rules run token by token (`_finish_rules`)."""
        eos, decode_text, on_tokens = self.eos_id, self.decode_text, self.on_tokens
        a = 0
        for r, b in zip(reqs, ends, strict=True):
            chunk = tokens[a:b]
            a = b
            out, req = r.output, r.request
            stop = req.stop if decode_text is not None else ()
            reason = None
            if (
                (eos is None or eos not in chunk)
                and len(out) + len(chunk) < req.max_tokens
                and not (stop and any(x in decode_text(out + chunk) for x in stop))
            ):
                out += chunk
                kept = chunk
            else:
                kept, reason = self._finish_rules(r, chunk)
            if r.first_token_time is None:
                r.first_token_time = now
            r.last_token_time = now
            if on_tokens is not None and kept:
                on_tokens(r, kept)
            if reason is not None:
                self._finish(r, reason)

    def _finish_rules(
        self, r: RequestState, tokens: list[int]
    ) -> tuple[list[int], FinishReason | None]:
        """Append `tokens` one at a time until a finish rule fires; (kept tokens, reason)."""
        kept: list[int] = []
        for tok in tokens:
            kept.append(tok)
            r.output.append(tok)
            if self.eos_id is not None and tok == self.eos_id:
                return kept, FinishReason.EOS
            if len(r.output) >= r.request.max_tokens:
                return kept, FinishReason.LENGTH
            if r.request.stop and self.decode_text is not None:
                text = self.decode_text(r.output)
                if any(s in text for s in r.request.stop):
                    return kept, FinishReason.STOP
        return kept, None

    def _finish(self, r: RequestState, reason: FinishReason) -> None:
        r.finish_reason = reason
        r.phase = Phase.DONE
        if r in self.running:
            self.running.remove(r)
            self.alloc.free(r.slot)
            self._moves = [m for m in self._moves if m.slot != r.slot]
        if self.on_finish is not None:
            self.on_finish(r)

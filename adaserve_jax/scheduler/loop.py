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
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from adaserve_jax.engine.batch import Move, Segment, ragged_index
from adaserve_jax.engine.kv_alloc import SlotAllocator
from adaserve_jax.engine.tree import DraftTrees, TreeShape, accept_paths
from adaserve_jax.scheduler.budget import (
    LatencyProfile,
    choose_budget_from_trees,
)
from adaserve_jax.scheduler.confidence import AcceptanceCalibrator, sibling_rank
from adaserve_jax.scheduler.policy import (
    ADASERVE_RESERVE,
    Policy,
    PolicyKind,
    fit_adaserve_shape,
    fixed_selection,
    parse_policy,
)
from adaserve_jax.scheduler.request import FinishReason, Phase, Request, RequestState
from adaserve_jax.scheduler.selector import SelectionInput, select

NO_SLO_MS = 1e9  # requests without a TPOT SLO are never behind

TokenCallback = Callable[[RequestState, list[int]], None]


@dataclasses.dataclass(frozen=True, slots=True)
class StepRecord:
    seconds: float  # wall time of the iteration
    tokens: int  # target tokens verified / prefilled
    decode_requests: int
    accepted: int  # drafted tokens accepted (bonus tokens not counted)
    select_seconds: float = 0.0  # host time in budget choice + selection


class StepEngine(Protocol):
    num_slots: int
    max_len: int
    has_draft: bool

    def forward(
        self, segments: list[Segment], moves: list[Move]
    ) -> tuple[np.ndarray, tuple[int, ...]]:
        """Run the target; returns (sampled token per batch token, segment offsets)."""
        ...

    def draft_step(self, segments: list[Segment]) -> tuple[np.ndarray, np.ndarray, tuple]:
        """Run the draft; returns (top-k log-probs [n,k], top-k tokens [n,k], offsets)."""
        ...

    def expand(self, root_vals, root_toks, root_pos, shape: TreeShape) -> DraftTrees:
        """Grow candidate trees for every slot (row s = slot s)."""
        ...


class Scheduler:
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
        self.calibrator = AcceptanceCalibrator()
        # what `_speculate` recorded of the nodes it sent to verify, flat over this step's
        # trees in `decode` order, for `_commit_trees`: (raw log f, depth, sibling rank) for
        # the calibrator (adaserve), and whether the draft cache holds each node's K/V
        self._verify_stats: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._verify_in_cache: np.ndarray | None = None
        self._rank = np.zeros((0, 0), np.int32)
        self._select_seconds = 0.0
        self._prefill_tokens = 0
        # `reuse_draft_kv=False` ignores the draft cache's K/V of verified nodes
        # (steps/expand.py) and catches every accepted token up (for tests)
        self.reuse_draft_kv = True
        # adaserve: after a roots-only budget choice the next iterations skip the draft model
        # entirely (plain decoding, no drafting cost); after `_explore_gap` such iterations
        # (or sooner, when the draft's catch-up would grow past half the budget) one
        # speculative iteration re-checks the choice with fresh trees. The gap starts at
        # `explore_every` and doubles (up to `explore_max`) while explorations keep choosing
        # roots only, so a machine where speculation does not pay wastes little on drafting
        self._draft_off = False
        self._draft_off_iters = 0
        self.explore_every = 8
        self.explore_max = 64
        self._explore_gap = self.explore_every
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
        spec = self.policy.speculative and bool(decode) and not self._skip_drafting(decode)
        self._select_seconds = 0.0
        reserve = self._decode_reserve(decode) if spec else len(decode)
        prefill = self._plan_prefill(budget=self.token_budget - reserve)
        self._prefill_tokens = sum(n for _, n in prefill)
        prefill_segs = [
            Segment.chain(
                r.slot, r.cached, r.request.prompt_ids[r.cached : r.cached + n], r.request.sampling
            )
            for r, n in prefill
        ]
        if spec:
            decode_segs, trees = self._speculate(decode, prefill_segs)
        else:
            decode_segs = [
                Segment.chain(r.slot, r.cached, [r.pending_token], r.request.sampling)
                for r in decode
            ]
            if prefill_segs and self.engine.has_draft and self.policy.speculative:
                self.engine.draft_step(prefill_segs)  # keep the draft's prefill in step
                for r, n in prefill:
                    r.draft_cached = r.cached + n
        moves, self._moves = self._moves, []
        sampled, offsets = self.engine.forward(decode_segs + prefill_segs, moves)
        now = self.clock()
        accepted = 0
        if spec and decode:
            accepted = self._commit_trees(decode, decode_segs, sampled, offsets, now)
        else:
            for r, off in zip(decode, offsets, strict=False):
                r.cached += 1
                self._emit(r, [int(sampled[off])], now)
        for (r, n), off in zip(prefill, offsets[len(decode) :], strict=True):
            r.cached += n
            if r.cached == r.prompt_len:
                r.phase = Phase.DECODE
                self._emit(r, [int(sampled[off + n - 1])], now)
        if spec:
            self.calibrator.flush()
        self.iterations += 1
        self.step_log.append(
            StepRecord(
                seconds=now - t0,
                tokens=sum(len(s) for s in decode_segs + prefill_segs),
                decode_requests=len(decode),
                accepted=accepted,
                select_seconds=self._select_seconds,
            )
        )

    def _skip_drafting(self, decode: list[RequestState]) -> bool:
        """AdaServe only: decode this iteration without the draft model (see `_draft_off`)."""
        if self.policy.kind is not PolicyKind.ADASERVE or not self._draft_off:
            return False
        lag = sum(r.cached + 2 - r.draft_cached for r in decode)  # catch-up chains, + 1 step
        if self._draft_off_iters >= self._explore_gap or 2 * lag > self.token_budget:
            return False
        self._draft_off_iters += 1
        return True

    def _decode_reserve(self, decode: list[RequestState]) -> int:
        """Budget kept for decoding requests before prefill chunks are planned.

        Covers both steps that carry the prefill chunks: the target's verify step (roots, or
        the fixed tree of a fixed policy) and, under speculation, the draft step (each
        request's catch-up chain of accepted tokens + root).
        """
        n = len(decode)
        shape = self.policy.shape
        if shape is None:
            return n
        catch_up = sum(r.cached + 1 - r.draft_cached for r in decode)
        if self.policy.kind is PolicyKind.ADASERVE:
            # `adaserve_reserve` tokens per decoding request (at least its candidate tree),
            # minus the prefill floor and the prompts of requests that asked for a first-token
            # deadline (ttft_slo_ms): those are prefilled before the reservation
            floor = max(self.prefill_floor, self._ttft_prompt_tokens())
            per_request = max(shape.num_nodes, self.adaserve_reserve)
            verify = min(n * per_request, max(n, self.token_budget - floor))
        else:
            verify = n * (1 + shape.depth * shape.width)
        return max(verify, catch_up)

    def _ttft_prompt_tokens(self) -> int:
        """Prompt tokens still to prefill of admitted requests with a TTFT SLO."""
        return sum(
            r.prompt_len - r.cached
            for r in self.running
            if r.phase is Phase.PREFILL and r.request.ttft_slo_ms is not None
        )

    def _plan_prefill(self, budget: int) -> list[tuple[RequestState, int]]:
        plan = []
        if self.policy.kind is PolicyKind.SARATHI:
            budget = min(budget, self.prefill_chunk)
        prefilling = [r for r in self.running if r.phase is Phase.PREFILL]
        # requests with a TTFT SLO first (stable: arrival order within each group)
        prefilling.sort(key=lambda r: r.request.ttft_slo_ms is None)
        for r in prefilling:
            if budget <= 0:
                break
            n = min(r.prompt_len - r.cached, budget)
            plan.append((r, n))
            budget -= n
        return plan

    def _speculate(self, decode: list[RequestState], prefill_segs: list[Segment]):
        """Draft catch-up + roots (+ prefill), expand trees, select, build verify segments."""
        shape = self.policy.shape
        draft_segs = [
            Segment.chain(r.slot, r.draft_cached, r.tokens_between(r.draft_cached, r.cached + 1))
            for r in decode
        ]
        vals, idx, offsets = self.engine.draft_step(draft_segs + prefill_segs)
        s = self.engine.num_slots
        root_vals = np.zeros((s, vals.shape[1]), np.float32)
        root_toks = np.zeros((s, vals.shape[1]), np.int32)
        root_pos = np.full(s, -1, np.int32)  # -1: slot not decoding
        slots = np.fromiter((r.slot for r in decode), np.int64, len(decode))
        last = np.asarray(offsets[: len(decode)]) + [len(seg) - 1 for seg in draft_segs]
        root_vals[slots], root_toks[slots] = vals[last], idx[last]
        for r in decode:
            root_pos[r.slot] = r.cached
            r.draft_cached = r.cached + 1
        for seg in prefill_segs:
            owner = next(r for r in self.running if r.slot == seg.slot)
            owner.draft_cached = seg.ctx_len + len(seg)
        trees = self.engine.expand(root_vals, root_toks, root_pos, shape)
        adaserve = self.policy.kind is PolicyKind.ADASERVE
        if adaserve:
            self._rank = sibling_rank(trees.parents)
            selections = self._adaserve_select(decode, trees)
        else:
            # a fixed tree per request, trimmed evenly when they do not all fit the step
            share = max(1, (self.token_budget - self._prefill_tokens) // len(decode))
            selections = [fixed_selection(trees, r.slot, shape)[:share] for r in decode]
        # never verify past the slot's rows or past the tokens the request still wants;
        # selections are sorted by node index, so a prefix is still a connected tree
        sels = [
            sel[: max(1, min(self.engine.max_len - r.cached, r.request.max_tokens - len(r.output)))]
            for r, sel in zip(decode, selections, strict=True)
        ]
        # every request's selected subtree at once: gather, renumber parents, then split
        lens = np.fromiter((len(x) for x in sels), np.int64, len(sels))
        owner, local, starts = ragged_index(lens)
        row_of = np.fromiter((r.slot for r in decode), np.int64, len(decode))[owner]
        nodes = np.concatenate(sels).astype(np.int64)
        pos = np.full(trees.parents.shape, -1, np.int64)
        pos[row_of, nodes] = local
        parents = pos[row_of, np.maximum(trees.parents[row_of, nodes], 0)].astype(np.int32)
        tokens = trees.tokens[row_of, nodes].astype(np.int32)
        parents[starts] = -1  # node 0 of every selection is its root,
        tokens[starts] = [r.pending_token for r in decode]  # holding the pending token
        bounds = np.append(starts, len(nodes)).tolist()
        self._verify_stats = None
        if adaserve:  # what the calibrator needs to learn from the verification
            self._verify_stats = (
                trees.log_f[row_of, nodes],
                trees.depth[row_of, nodes],
                self._rank[row_of, nodes],
            )
        self._verify_in_cache = None
        if trees.in_cache is not None and self.reuse_draft_kv:
            self._verify_in_cache = trees.in_cache[row_of, nodes]
        drafted = trees.tokens.shape[1] - 1
        segs = []
        for i, r in enumerate(decode):
            a, b = bounds[i], bounds[i + 1]
            segs.append(Segment(r.slot, r.cached, tokens[a:b], parents[a:b], r.request.sampling))
            r.stats.drafted += drafted
            r.stats.selected += b - a - 1
        return segs, trees

    def _adaserve_select(self, decode: list[RequestState], trees: DraftTrees) -> list[np.ndarray]:
        """Budget from the latency profile (budget.py), then the two-phase selector."""
        t0 = time.perf_counter()
        shape = self.policy.shape
        n = len(decode)
        now = self.clock()
        slos = np.array([(r.request.tpot_slo_ms or NO_SLO_MS) / 1e3 for r in decode])
        avail = max(self.token_budget - self._prefill_tokens, n)
        budget, t_iter = avail, 0.0
        rows = np.array([r.slot for r in decode])
        depth = int(trees.depth.max())  # this iteration's tree depth
        # path probabilities rebuilt from calibrated conditionals: f as observed acceptance
        log_f = self.calibrator.apply(
            trees.parents[rows], trees.log_f[rows], trees.depth[rows], self._rank[rows]
        )
        decoded = np.array([max(len(r.output) - 1, 0) for r in decode])
        elapsed = np.array([now - (r.first_token_time or now) for r in decode])
        remaining = np.array([r.request.max_tokens - len(r.output) for r in decode])
        if self.profile is not None:
            draft_ms = 0.0
            if self.profile.draft is not None:  # catch-up step + (depth - 1) expansion steps
                draft_ms = depth * float(self.profile.draft.latency_ms(n * shape.width))
            choice = choose_budget_from_trees(
                self.profile,
                log_f,
                slos,
                max_budget=avail,
                draft_ms=draft_ms,
                prefill_tokens=self._prefill_tokens,
            )
            budget, t_iter = max(min(choice.budget, avail), n), choice.t_iter_s
            roots_only = budget <= n or choice.expected_accepted <= n * 1.25
            if roots_only and self._draft_off:  # an exploration confirmed the choice: back off
                self._explore_gap = min(2 * self._explore_gap, self.explore_max)
            elif not roots_only:
                self._explore_gap = self.explore_every
            self._draft_off, self._draft_off_iters = roots_only, 0
        num_nodes = trees.tokens.shape[1]
        sel = select(
            SelectionInput(
                parents=trees.parents[rows],
                log_f=log_f,
                num_nodes=np.full(n, num_nodes),
                decoded=decoded,
                elapsed_s=elapsed,
                tpot_slo_s=slos,
                budget=int(budget),
                t_iter_s=float(t_iter),
                max_depth=depth,
                remaining=remaining,
                # per-request cap: `node_share` fair shares of the budget, so the SLO phase cannot
                # hand a far-behind request its whole tree of low-f nodes (SIMULATION.md)
                node_cap=max(2, math.ceil(self.node_share * budget / n)),
            )
        )
        self._select_seconds += time.perf_counter() - t0
        return list(sel.nodes)

    def _commit_trees(
        self,
        decode: list[RequestState],
        segs: list[Segment],
        sampled: np.ndarray,
        offsets: tuple[int, ...],
        now: float,
    ) -> int:
        """Acceptance walk for every verified tree at once (padded [R, n] arrays, engine/tree.py
        `accept_paths`); queue KV compaction; feed the calibrator; emit tokens. Returns the
        drafted tokens accepted."""
        n_req = len(decode)
        lens = np.fromiter((len(s) for s in segs), np.int64, n_req)
        width = int(lens.max())
        row_of, col, _ = ragged_index(lens)
        parents = np.full((n_req, width), -1, np.int64)
        parents[row_of, col] = np.concatenate([s.parents for s in segs])
        tokens = np.zeros((n_req, width), np.int64)
        tokens[row_of, col] = np.concatenate([s.tokens for s in segs])
        target = np.zeros((n_req, width), np.int64)
        target[row_of, col] = sampled[np.repeat(np.asarray(offsets[:n_req]), lens) + col]
        acc = accept_paths(parents, tokens, target, lens)
        rows = np.arange(n_req)
        bonus = target[rows, np.where(acc, np.arange(width), 0).max(1)].tolist()
        if self._verify_stats is not None:
            self._observe_trees(parents, acc, row_of, col, *self._verify_stats)
        in_cache = None
        if self._verify_in_cache is not None:  # node's K/V already in the draft cache
            in_cache = np.zeros((n_req, width), bool)
            in_cache[row_of, col] = self._verify_in_cache
        self._verify_stats = self._verify_in_cache = None
        path_rows, path_cols = np.nonzero(acc[:, 1:])
        path_cols += 1  # node indices, increasing along each path
        bounds = np.searchsorted(path_rows, np.arange(n_req + 1)).tolist()
        path_tokens = tokens[path_rows, path_cols].tolist()
        path_cols = path_cols.tolist()
        total = 0
        for i, r in enumerate(decode):
            path = path_cols[bounds[i] : bounds[i + 1]]
            base = r.cached
            for k, node in enumerate(path, start=1):
                if node != k:
                    self._moves.append(Move(r.slot, base + node, base + k))
            r.cached += 1 + len(path)
            if in_cache is not None and r.draft_cached == base + 1:
                # the draft holds the K/V of the accepted path's leading in-cache nodes at
                # their committed rows already: its next catch-up starts after them
                for node in path:
                    if not in_cache[i, node]:
                        break
                    r.draft_cached += 1
            r.stats.steps += 1
            r.stats.accepted += len(path)
            total += len(path)
            self._emit(r, path_tokens[bounds[i] : bounds[i + 1]] + [bonus[i]], now)
        return total

    def _observe_trees(self, parents, acc, row_of, col, *flat: np.ndarray) -> None:
        """AdaServe: every verified edge out of an accepted node, with the raw log f, depth and
        sibling rank the selection saw (`flat`: over all trees, laid out by row_of/col), to the
        acceptance calibrator (one batch)."""
        shape = parents.shape
        fields = []
        for values, dtype in zip(flat, (np.float64, np.int64, np.int64), strict=True):
            pad = np.zeros(shape, dtype)
            pad[row_of, col] = values
            fields.append(pad)
        log_f, depth, rank = fields
        rows = np.arange(shape[0])[:, None]
        par = np.maximum(parents[:, 1:], 0)
        live = (parents[:, 1:] >= 0) & acc[rows, par]
        log_q = (log_f[:, 1:] - log_f[rows, par])[live]
        self.calibrator.observe_edges(
            log_q, depth[:, 1:][live], rank[:, 1:][live], acc[:, 1:][live]
        )

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
        stop = r.request.stop if self.decode_text is not None else ()
        if (
            (self.eos_id is None or self.eos_id not in tokens)
            and len(r.output) + len(tokens) < r.request.max_tokens
            and not (stop and any(x in self.decode_text(r.output + tokens) for x in stop))
        ):  # no rule fires in this chunk (the common case): append it whole
            r.output.extend(tokens)
            kept, tokens = tokens, []
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
            self._moves = [m for m in self._moves if m.slot != r.slot]
        if self.on_finish is not None:
            self.on_finish(r)

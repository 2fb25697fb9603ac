"""One speculative iteration of the scheduler (numpy only): the draft's catch-up chains,
AdaServe's budget rule and selection (or a fixed policy's tree), the verify segments, and the
acceptance walk with its KV compaction, calibration and token emission.

`SpeculativeSteps` is a part of `Scheduler` (scheduler/loop.py), kept in its own file: its
methods read and update the scheduler's state and are called from `Scheduler.step`. Every
request at once: the requests' state is read into arrays once, chains and verified subtrees
are built as flat arrays, and the engine gets one `SegmentBatch` per call.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np

from adaserve_jax.engine.batch import SegmentBatch, ragged_index
from adaserve_jax.engine.tree import DraftTrees, accept_nodes, layout_depths
from adaserve_jax.scheduler.budget import choose_budget_trusted
from adaserve_jax.scheduler.confidence import sibling_rank
from adaserve_jax.scheduler.policy import PolicyKind, fixed_selection
from adaserve_jax.scheduler.request import RequestState
from adaserve_jax.scheduler.roster import Roster
from adaserve_jax.scheduler.segments import chain_segments, moves, segments
from adaserve_jax.scheduler.selector import SelectionInput, select_nodes


class VerifyPlan(NamedTuple):
    """What `_speculate` sent to verification this step, for `_commit_trees`: the flat arrays
    the verify segments were cut from (nodes in `decode` order, tree by tree), the requests'
    state it read, and what the acceptance walk feeds back."""

    counts: np.ndarray  # i64[n] nodes per tree
    owner: np.ndarray  # i64[K] each node's request
    local: np.ndarray  # i64[K] each node's index in its tree (0 = root)
    tokens: np.ndarray  # i32[K]
    parents: np.ndarray  # i32[K] local parents, -1 for roots
    cached: list[int]  # KV rows per request before the step
    roster: Roster
    out_len: np.ndarray  # i64[n] output tokens per request before the step
    drafted: int  # nodes each request's draft tree held (its stats count them)
    stats: tuple[np.ndarray, ...] | None  # adaserve: raw log f, depth, sibling rank per node
    in_cache: np.ndarray | None  # bool[K]: the draft cache holds the node's K/V


class SpeculativeSteps:
    """Speculative iterations for `Scheduler` (see the module docstring)."""

    def _catch_up_chains(self, decode: list[RequestState], roster: Roster):
        """The draft's catch-up segments: for every decoding request the tokens its draft
        cache lacks, up to and including the pending token (the next tree's root).

        Returns (segments, flat tokens i32, chain lengths, chain ends, cached list, output
        lengths list)."""
        cached_l, behind_l, out_len_l = [], [], []
        catch_up: list[int] = []
        for r, p in zip(decode, roster.prompt_len, strict=True):
            out, a, c = r.output, r.draft_cached, r.cached
            cached_l.append(c)
            behind_l.append(a)
            out_len_l.append(len(out))
            catch_up += out[a - p : c + 1 - p] if a >= p else r.tokens_between(a, c + 1)
        lens = np.array(cached_l, np.int64) + 1 - np.array(behind_l, np.int64)
        ends = lens.cumsum()
        if len(catch_up) != ends[-1]:
            raise RuntimeError("draft catch-up chains do not match the requests' KV rows")
        chains = np.array(catch_up, np.int32)
        draft_segs = segments(roster.slots, behind_l, chains, None, ends)
        return draft_segs, chains, lens, ends, cached_l, out_len_l

    def _speculate(
        self,
        decode: list[RequestState],
        prefill: list[tuple[RequestState, int]],
    ) -> tuple[SegmentBatch, int]:
        """Draft catch-up + roots (+ prefill), expand trees, select, build verify segments.

        Every request at once: its state is read into arrays once, the catch-up chains and
        the verified subtrees are built as flat arrays, and each segment gets a slice of them.
        Returns the verify segments (in `decode` order) and their total tokens."""
        shape = self.policy.shape
        n = len(decode)
        roster = self._roster_of(decode)
        slots_l, slots = roster.slots_l, roster.slots
        draft_segs, chains, lens, ends, cached_l, out_len_l = self._catch_up_chains(decode, roster)
        cached = np.array(cached_l, np.int64)
        # the prompts' rows for the draft: this step's chunks and any it skipped while off
        draft_prefill = self._draft_prefill(prefill)
        vals, idx, offsets = self.engine.draft_step(draft_segs + chain_segments(draft_prefill))
        s = self.engine.num_slots
        root_vals = np.zeros((s, vals.shape[1]), np.float32)
        root_toks = np.zeros((s, vals.shape[1]), np.int32)
        root_pos = np.full(s, -1, np.int32)  # -1: slot not decoding
        last = np.asarray(offsets[:n]) + lens - 1
        root_vals[slots], root_toks[slots] = vals[last], idx[last]
        root_pos[slots] = cached
        for r, _, b in draft_prefill:
            r.draft_cached = b
        trees = self.engine.expand(root_vals, root_toks, root_pos, shape)
        out_len = np.array(out_len_l, np.int64)
        adaserve = self.policy.kind is PolicyKind.ADASERVE
        if adaserve:
            nodes, counts = self._adaserve_select(decode, trees, roster, out_len, chains.size)
        else:
            # a fixed tree per request, trimmed evenly when they do not all fit the step
            share = max(1, (self.token_budget - self._prefill_tokens) // n)
            picks = [fixed_selection(trees, row, shape)[:share] for row in slots_l]
            nodes = np.concatenate(picks)
            counts = np.fromiter((len(x) for x in picks), np.int64, n)
        # never verify past the slot's rows or past the tokens the request still wants;
        # selections are sorted by node index, so a prefix is still a connected tree
        limit = np.minimum(self.engine.max_len - cached, roster.max_tokens - out_len)
        owner, local, starts = ragged_index(counts)
        if (counts > limit).any():
            limit = np.maximum(limit, 1)
            keep = local < limit[owner]
            nodes, counts = nodes[keep], np.minimum(counts, limit)
            owner, local, starts = ragged_index(counts)
        # every request's selected subtree at once: gather, renumber parents, then slice
        row_of = slots[owner]
        nodes = nodes.astype(np.int64)
        pos = np.full(trees.parents.shape, -1, np.int64)
        pos[row_of, nodes] = local
        parents = pos[row_of, np.maximum(trees.parents[row_of, nodes], 0)].astype(np.int32)
        tokens = trees.tokens[row_of, nodes].astype(np.int32)
        parents[starts] = -1  # node 0 of every selection is its root,
        tokens[starts] = chains[ends - 1]  # holding the pending token (its chain's last)
        stats = in_cache = None
        if adaserve:  # what the calibrator needs to learn from the verification
            stats = (
                trees.log_f[row_of, nodes],
                trees.depth[row_of, nodes],
                self._rank[nodes] if self._rank.ndim == 1 else self._rank[owner, nodes],
            )
        if trees.in_cache is not None and self.reuse_draft_kv:
            in_cache = trees.in_cache[row_of, nodes]
        drafted = trees.tokens.shape[1] - 1
        self._verify = VerifyPlan(
            counts, owner, local, tokens, parents, cached_l, roster, out_len, drafted, stats,
            in_cache,
        )  # fmt: skip
        verify = segments(slots, cached_l, tokens, parents, starts + counts, roster.sampling)
        return verify, int(tokens.size)

    def _adaserve_select(
        self,
        decode: list[RequestState],
        trees: DraftTrees,
        roster: Roster,
        out_len: np.ndarray,
        catch_up: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Budget from the latency profile (budget.py), then the two-phase selector.

        roster: the requests' fixed fields; out_len: their output so far; catch_up: tokens in
        this iteration's draft catch-up chains. Returns the selected node indices, flat and
        sorted by (request, node), and the count per request."""
        t0 = time.perf_counter()
        shape = self.policy.shape
        n = len(decode)
        now = self.clock()
        slos = roster.tpot_slo_s
        avail = max(self.token_budget - self._prefill_tokens, n)
        budget, t_iter = avail, 0.0
        rows = roster.slots
        parents = trees.parents[rows]
        # sibling ranks and depths, for the calibrator now and after verify: per column ([N])
        # when the trees come in the engines' layout, else per node ([n, N]); and this
        # iteration's tree depth
        if trees.rank is not None:
            self._rank = trees.rank
            depths = layout_depths(parents.shape[1], shape.width, shape.topk)
            depth = int(depths[-1])  # the layout's depths are non-decreasing
        else:
            self._rank, depths = sibling_rank(parents), trees.depth[rows]
            depth = int(trees.depth.max())
        # path probabilities rebuilt from calibrated conditionals: f as observed acceptance
        log_f = self.calibrator.apply(parents, trees.log_f[rows], depths, self._rank)
        if self.profile is not None:
            choice = choose_budget_trusted(
                self.profile,
                log_f,
                roster.tightest_slo_s,
                max_budget=avail,
                draft_ms=self._draft_price_ms(n, catch_up, depth),
                prefill_tokens=self._prefill_tokens,
            )
            budget, t_iter = max(min(choice.budget, avail), n), choice.t_iter_s
            # with pacing: what a speculative iteration really took beyond this estimate
            self._spec_predicted_s = t_iter if budget > n and self._pacing_applies() else None
            roots_only = _roots_only(choice, n)
            if roots_only and self._draft_off:  # an exploration confirmed the choice: back off
                self._explore_gap = min(2 * self._explore_gap, self.explore_max)
            elif not roots_only:
                self._explore_gap = self.explore_every
            if roots_only:  # what this exploration drafted, for judging the next in advance
                self._explored = (parents, trees.log_f[rows], depths, self._rank)
            self._draft_off, self._draft_off_iters = roots_only, 0
            self._predicted_skips, self._judged_worth = 0, False
        nodes, counts = select_nodes(
            SelectionInput.trusted(
                parents=parents,
                log_f=log_f,
                decoded=np.maximum(out_len - 1, 0),
                elapsed_s=roster.elapsed(now),
                tpot_slo_s=slos,
                budget=int(budget),
                t_iter_s=float(t_iter),
                max_depth=depth,
                remaining=roster.max_tokens - out_len,
                # per-request cap: `node_share` fair shares of the budget, so the SLO phase cannot
                # hand a far-behind request its whole tree of low-f nodes (SIMULATION.md)
                node_cap=max(2, math.ceil(self.node_share * budget / n)),
            )
        )
        self._select_seconds += time.perf_counter() - t0
        return nodes, counts

    def _draft_price_ms(self, n: int, catch_up: int, depth: int) -> float:
        """The draft's cost of a speculative iteration as the budget rule prices it: the
        catch-up step over `catch_up` tokens, then the measured expansion call for `n`
        requests; without one, `depth` draft steps over the frontier's n x width tokens; plus
        the speculative iterations' measured overrun."""
        draft_ms = 0.0
        if self.profile.draft is not None:
            shape = self.policy.shape
            expand_ms = self.profile.expand_call_ms(shape, n)
            if expand_ms is None:
                draft_ms = depth * float(self.profile.draft.latency_ms(n * shape.width))
            else:
                draft_ms = float(self.profile.draft.latency_ms(catch_up)) + expand_ms
        return draft_ms + max(self._spec_overrun_ms, 0.0)

    def _speculation_could_pay(self, decode: list[RequestState]) -> bool:
        """AdaServe, when an exploration is due: False when the budget rule would choose
        roots only again given, for every decoding request, the trees the last exploration
        drafted (calibrated as the calibrator stands now, which has learned from their
        verification: each request's f best first, averaged over its requests), no prompt
        tokens and the cheapest draft step (a catch-up of one token a request). Such an
        exploration would only spend its catch-up and draft calls to confirm it, so it is
        counted as confirmed without them (the gap doubles). Every `predicted_skips_max`-th
        due exploration in a row runs anyway, so a change in acceptance is still seen; and
        until the calibrator has seen a drafted token verified, every one runs (its f is
        then the draft's own confidence, which may be far off: a roots-only exploration
        verifies no drafted token and teaches it nothing, a speculative one does)."""
        if self._explored is None or not self.calibrator.observations:  # (set with a profile)
            return True
        if self._predicted_skips >= self.predicted_skips_max:
            return True
        gain = _mean_gain(self.calibrator.apply(*self._explored))
        n = len(decode)
        choice = choose_budget_trusted(
            self.profile,
            np.broadcast_to(gain, (n, gain.size)),
            self._roster_of(decode).tightest_slo_s,
            max_budget=max(self.token_budget, n),
            draft_ms=self._draft_price_ms(n, n, self.policy.shape.depth),
            prefill_tokens=0,
        )
        if not _roots_only(choice, n):
            return True
        self._predicted_skips += 1
        return False

    def _commit_trees(
        self,
        decode: list[RequestState],
        segs: SegmentBatch,
        sampled: np.ndarray,
        offsets: tuple[int, ...],
        now: float,
    ) -> int:
        """Acceptance walk for every verified tree at once (flat over all trees, engine/tree.py
        `accept_nodes`); queue KV compaction; feed the calibrator; emit tokens. Returns the
        drafted tokens accepted."""
        n_req = len(decode)
        plan, self._verify = self._verify, None
        lens, row_of, col = plan.counts, plan.owner, plan.local  # per tree; per node (2)
        tokens, parents = plan.tokens, plan.parents
        cached_l, roster, out_len = plan.cached, plan.roster, plan.out_len
        slots = roster.slots
        nodes = np.arange(col.size)
        root = nodes - col  # flat index of each node's root
        up = root + np.maximum(parents, 0)  # flat index of the parent (a root: itself)
        target = sampled[np.repeat(np.asarray(offsets[:n_req]), lens) + col]
        match = tokens == target[up]
        match[parents < 0] = True
        acc = accept_nodes(up, match)
        if plan.stats is not None:
            self._observe_trees(acc, up, parents, *plan.stats)
        in_cache = plan.in_cache  # node's K/V already in the draft cache
        # the accepted paths: flat nodes, increasing along each path, and their positions
        on_path = np.flatnonzero(acc & (parents >= 0))
        path_rows, path_cols = row_of[on_path], col[on_path]
        path_len = np.bincount(path_rows, minlength=n_req)
        _, step, _ = ragged_index(path_len)
        step += 1  # 1-based position along the path: the KV row (past the root) it commits to
        moved = path_cols != step
        if moved.any():  # compact: accepted nodes move to consecutive rows after the root
            who = path_rows[moved]
            base = np.asarray(cached_l, np.int64)[who]
            self._moves += moves(
                slots[who].tolist(),
                (base + path_cols[moved]).tolist(),
                (base + step[moved]).tolist(),
            )
        # the draft's next catch-up starts after the pending token and, when its K/V came
        # from the draft tree, after the accepted path's leading in-cache nodes (already at
        # their committed rows)
        run_l = [1] * n_req
        if in_cache is not None:
            along = np.zeros((n_req, int(step.max(initial=0)) + 1), bool)
            along[path_rows, step - 1] = in_cache[on_path]
            run_l = (np.logical_and.accumulate(along, axis=1).sum(axis=1) + 1).tolist()
        # emitted per request: its path's tokens, then the bonus token (the target's token at
        # the path's last node)
        ends = (path_len + 1).cumsum()
        last = np.cumsum(lens) - lens  # each tree's root, or its path's last node:
        has_path = path_len > 0
        last[has_path] = on_path[path_len.cumsum()[has_path] - 1]
        emitted = np.empty(int(ends[-1]), np.int64)
        emitted[np.repeat(ends - path_len - 1, path_len) + step - 1] = tokens[on_path]
        emitted[ends - 1] = target[last]
        plain = self._plain_chunks(roster, out_len, path_len + 1, emitted, ends)
        self._commit_requests(
            decode, path_len.tolist(), lens.tolist(), cached_l, run_l, plan.drafted,
            emitted.tolist(), ends.tolist(), plain, now,
        )  # fmt: skip
        return int(on_path.size)

    def _plain_chunks(
        self,
        roster: Roster,
        out_len: np.ndarray,
        chunk_len: np.ndarray,
        emitted: np.ndarray,
        ends: np.ndarray,
    ) -> list[bool]:
        """Per request: True when no finish rule can fire in its chunk of `emitted` (no EOS,
        the output stays below max_tokens, no stop strings to look for), so the chunk is
        appended whole; False sends it through `_emit_chunks`' rules."""
        plain = out_len + chunk_len < roster.max_tokens
        if self.eos_id is not None:
            hits = np.flatnonzero(emitted == self.eos_id)
            if hits.size:
                plain[np.searchsorted(ends, hits, side="right")] = False
        if self.decode_text is not None:
            plain &= ~roster.has_stop
        return plain.tolist()

    def _commit_requests(
        self,
        decode: list[RequestState],
        path_len: list[int],
        counts: list[int],
        cached: list[int],
        draft_run: list[int],
        drafted: int,
        emitted: list[int],
        ends: list[int],
        plain: list[bool],
        now: float,
    ) -> None:
        """One pass over the verified requests (in order): KV rows committed (the root and
        the accepted path), the draft's rows, the counters, and the emitted tokens (a plain
        chunk appended whole and streamed; the others through `_emit_chunks`)."""
        on_tokens = self.on_tokens
        a = 0
        for r, k, m, c, run, b, easy in zip(
            decode, path_len, counts, cached, draft_run, ends, plain, strict=True
        ):
            r.cached += 1 + k
            r.draft_cached = c + run
            st = r.stats
            st.steps += 1
            st.accepted += k
            st.drafted += drafted
            st.selected += m - 1
            chunk = emitted[a:b]
            a = b
            if not easy:
                self._emit_chunks([r], chunk, (len(chunk),), now)
                continue
            r.output += chunk
            if r.first_token_time is None:
                r.first_token_time = now
            r.last_token_time = now
            if on_tokens is not None:
                on_tokens(r, chunk)

    def _observe_trees(
        self,
        acc: np.ndarray,
        up: np.ndarray,
        parents: np.ndarray,
        log_f: np.ndarray,
        depth: np.ndarray,
        rank: np.ndarray,
    ) -> None:
        """AdaServe: every verified edge out of an accepted node, with the raw log f, depth and
        sibling rank the selection saw, to the acceptance calibrator (one batch). All arrays
        are flat over this step's trees in (tree, node) order: acc (the walk's result), up
        (each node's parent, flat), parents (its local parent, -1 for a root)."""
        live = (np.asarray(parents) >= 0) & acc[up]  # every non-root child of an accepted node
        log_f = np.asarray(log_f, np.float64)
        self.calibrator.observe_edges(
            (log_f - log_f[up])[live], depth[live], rank[live], acc[live], trusted=True
        )


def _roots_only(choice, n: int) -> bool:
    """Whether a budget choice for `n` requests amounts to plain decoding: the roots alone, or
    too few expected drafted tokens (a quarter of a token a request) to be worth drafting."""
    return choice.budget <= n or choice.expected_accepted <= n * 1.25


def _mean_gain(log_f: np.ndarray) -> np.ndarray:
    """f32[M]: log of the requests' path probabilities sorted best first, averaged over the
    requests (each row of `log_f` [n, M] one request's tree; padding -inf counts as 0)."""
    f = np.sort(np.exp(np.asarray(log_f, np.float64)), axis=1)[:, ::-1].mean(axis=0)
    return np.log(np.maximum(f, 1e-30)).astype(np.float32)

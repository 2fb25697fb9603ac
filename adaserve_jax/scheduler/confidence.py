"""Online calibration of the draft's path probabilities against observed acceptance (numpy).

AdaServe reads `f(v)`, the draft's path probability of node `v`, as the chance that the target
accepts `v`: the budget rule sums `f` to predict accepted tokens, and the selector's SLO phase
takes nodes until their `f` reaches the tokens a request needs. That reading is only as good as
the draft's calibration. A small distilled draft is strongly *under*-confident (the shipped pair:
median top-1 probability 0.1-0.25 where the target agrees ~90% of the time), so raw `f` makes
every deeper node look worthless and the scheduler verifies roots only.

`AcceptanceCalibrator` learns the map `f -> P(node accepted | node verified)` from the verify
steps the scheduler runs anyway:

- every verified non-root node is one observation `(log f, accepted?)`, binned on log f;
- per bin, rate = (accepted + w * f_bin) / (verified + w): `w` pseudo-counts pull an empty bin
  to the raw `f` (so before any evidence the calibrated `f` is the raw `f`);
- old evidence decays by `decay` per observed step (the draft's calibration drifts with the
  text being generated);
- the rates are made non-decreasing in `f` by weighted pool-adjacent-violators, and applied by
  linear interpolation on log f, so `f(child) <= f(parent)` still holds after the map and every
  greedy pick of highest calibrated `f` is still a connected tree containing the root.

Selection bias does not distort the estimate: a node is verified only with its whole path, and
the selector's choice depends on `f` alone, so among verified nodes of one `f` bin the accepted
share estimates `P(accepted | f)`.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def isotonic_rows(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit of every row of y [R, n] (weights w > 0,
    same shape), all rows at once: pool adjacent violators, merging every adjacent pair of
    blocks whose means decrease in one pass (a run of decreasing blocks pools into one, as
    the one-pair-at-a-time algorithm would pool it), until no pair decreases."""
    y = np.asarray(y, np.float64)
    rows, n = y.shape
    wf = np.asarray(w, np.float64).ravel()
    wy = wf * y.ravel()
    start = np.ones(rows * n, bool)  # element begins a block
    row_start = np.arange(rows * n) % n == 0  # blocks never span two rows
    while True:
        block = np.cumsum(start) - 1  # block of every element
        first = np.flatnonzero(start)  # each block's first element
        mean = np.bincount(block, wy, first.size) / np.bincount(block, wf, first.size)
        merge = (mean[:-1] > mean[1:]) & ~row_start[first[1:]]
        if not merge.any():
            return mean[block].reshape(rows, n)
        start[first[1:][merge]] = False


def sibling_rank(parents: np.ndarray) -> np.ndarray:
    """i32[R, M]: each node's rank among its siblings (0 = the draft's top child), assuming a
    parent's children are laid out in the draft's descending order (as `steps/expand.py` and
    `lax.top_k` produce them). The root gets 0."""
    parents = np.asarray(parents)
    rows, cols = parents.shape
    if rows * cols == 0:
        return np.zeros((rows, cols), np.int32)
    # one key per (tree, parent): a stable sort groups each parent's children in node order,
    # and a child's rank is its distance from the start of its group
    key = (parents.astype(np.int64) + 1 + (np.arange(rows) * (cols + 1))[:, None]).ravel()
    order = key.argsort(kind="stable")
    grouped = key[order]
    at = np.arange(key.size)
    start = np.where(np.concatenate([[True], grouped[1:] != grouped[:-1]]), at, 0)
    np.maximum.accumulate(start, out=start)
    rank = np.empty(key.size, np.int32)
    rank[order] = at - start
    rank = rank.reshape(rows, cols)
    rank[:, 0] = 0
    return rank


@functools.lru_cache(maxsize=32)
def _row_offsets(rows: int, cols: int) -> np.ndarray:
    """Read-only i64[rows, 1]: r * cols, the flat offset of each padded row."""
    out = (np.arange(rows, dtype=np.int64) * cols)[:, None]
    out.flags.writeable = False
    return out


class AcceptanceCalibrator:
    """Learns `P(child accepted | parent accepted, q, rank, depth)` online; `apply` rebuilds f.

    bins: bins on log q over [log_q_min, 0]; ranks / depths: separate tables for sibling ranks
    0..ranks-1 and child depths 1..depths (larger values share the last table); prior_weight:
    pseudo-counts per bin, pulling each rank's pooled table to the raw `q` and each
    (rank, depth) table to its rank's pooled one; decay: multiplier on all counts per
    observation step (1.0 = never forget); refit_every: observation steps between refits of
    the tables `apply` uses (`rates()` always fits the current counts).

    Why rank: a top child and a runner-up with the same `q` are accepted at very different
    rates (on the shipped pair: ~0.65 vs ~0.25 at q = 0.05), so one table per `q` would
    undervalue every long top-1 chain.
    """

    def __init__(
        self,
        bins: int = 20,
        log_q_min: float = -6.0,
        depths: int = 8,
        ranks: int = 3,
        prior_weight: float = 4.0,
        decay: float = 0.995,
        refit_every: int = 16,
    ) -> None:
        if not (isinstance(bins, int) and bins >= 2):
            raise ValueError(f"{bins=} must be an int >= 2")
        if not (isinstance(depths, int) and depths >= 1):
            raise ValueError(f"{depths=} must be an int >= 1")
        if not (isinstance(ranks, int) and ranks >= 1):
            raise ValueError(f"{ranks=} must be an int >= 1")
        if not (math.isfinite(log_q_min) and log_q_min < 0):
            raise ValueError(f"{log_q_min=} must be finite and < 0")
        if not (math.isfinite(prior_weight) and prior_weight > 0):
            raise ValueError(f"{prior_weight=} must be finite and > 0")
        if not (0 < decay <= 1):
            raise ValueError(f"{decay=} must lie in (0, 1]")
        if not (isinstance(refit_every, int) and refit_every >= 1):
            raise ValueError(f"{refit_every=} must be an int >= 1")
        self.refit_every = refit_every
        self._since_fit = 0
        self.bins = bins
        self.depths = depths
        self.ranks = ranks
        self.log_q_min = float(log_q_min)
        self.prior_weight = float(prior_weight)
        self.decay = float(decay)
        width = -self.log_q_min / bins
        self.centers = self.log_q_min + width * (np.arange(bins) + 0.5)
        self._scale = bins / -self.log_q_min
        self.verified = np.zeros((ranks, depths, bins))  # [rank, depth - 1, bin]
        self.accepted = np.zeros((ranks, depths, bins))
        self._table: np.ndarray | None = None  # [ranks * depths * bins] log rates (lazy)
        self._slope = np.zeros(0)  # [ranks * depths * bins] table[i + 1] - table[i] in a row
        self._layout_key: tuple | None = None  # `_layout_runs`'s last layout
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._pending_trusted = True  # everything queued is trusted: flush skips the checks

    def _bin(self, log_q: np.ndarray) -> np.ndarray:
        idx = ((np.asarray(log_q, np.float64) - self.log_q_min) * self._scale).astype(np.int64)
        return np.minimum(np.maximum(idx, 0), self.bins - 1)

    def _cell(self, log_q: np.ndarray, depth: np.ndarray, rank: np.ndarray) -> np.ndarray:
        return self._cell_base(depth, rank) + self._bin(log_q)

    def observe(
        self, log_q: np.ndarray, depth: np.ndarray, rank: np.ndarray, accepted: np.ndarray
    ) -> None:
        """Verified edges whose parent was accepted: the child's conditional log q, depth
        (>= 1), sibling rank (>= 0) and whether it was accepted. One call is one observation
        step (one decay)."""
        log_q = np.asarray(log_q, np.float64).ravel()
        depth = np.asarray(depth, np.int64).ravel()
        rank = np.asarray(rank, np.int64).ravel()
        accepted = np.asarray(accepted, bool).ravel()
        if not (log_q.shape == depth.shape == rank.shape == accepted.shape):
            raise ValueError(
                f"log_q, depth, rank and accepted differ in shape: {log_q.shape}, "
                f"{depth.shape}, {rank.shape}, {accepted.shape}"
            )
        if log_q.size == 0:
            return
        if not (log_q.max() <= 1e-6 and log_q.min() > -np.inf):  # NaN fails too
            raise ValueError("log_q must be finite and <= 0")
        if depth.min() < 1:
            raise ValueError("depth must be >= 1 (the root has no conditional)")
        if rank.min() < 0:
            raise ValueError("rank must be >= 0")
        self._count(log_q, depth, rank, accepted)

    def _count(
        self, log_q: np.ndarray, depth: np.ndarray, rank: np.ndarray, accepted: np.ndarray
    ) -> None:
        """`observe` for flat arrays known to be valid (log q f64 <= 0, depth >= 1, rank >= 0,
        accepted bool, equal shapes)."""
        size = self.verified.size
        # one count over (cell, accepted) pairs: the first half not accepted, the second accepted
        counts = np.bincount(self._cell(log_q, depth, rank) + size * accepted, minlength=2 * size)
        hits = counts[size:]
        self.verified *= self.decay
        self.accepted *= self.decay
        self.verified += (counts[:size] + hits).reshape(self.verified.shape)
        self.accepted += hits.reshape(self.accepted.shape)
        self._since_fit += 1
        if self._since_fit >= self.refit_every:  # the fit (27 small isotonic fits) is the cost
            self.refit()

    def observe_tree(
        self,
        parents: np.ndarray,
        log_f: np.ndarray,
        path: np.ndarray,
        depth: np.ndarray,
        rank: np.ndarray,
    ) -> None:
        """Queues one verified tree (node 0 the root): parents i32[N], raw log f f32[N], the
        accepted path (node indices, root excluded), node depths and sibling ranks i32[N] (in
        the drafted tree); only edges out of accepted nodes count. `flush` adds everything
        queued as one observation step."""
        parents = np.asarray(parents)
        if parents.size < 2:
            return
        on_path = np.zeros(parents.size, bool)
        on_path[0] = True
        on_path[np.asarray(path, np.int64)] = True
        par = parents[1:]
        live = on_path[par]
        log_f = np.asarray(log_f, np.float64)
        log_q = (log_f[1:] - log_f[par])[live]
        self._pending.append(
            (log_q, np.asarray(depth)[1:][live], np.asarray(rank)[1:][live], on_path[1:][live])
        )
        self._pending_trusted = False

    def observe_edges(
        self,
        log_q: np.ndarray,
        depth: np.ndarray,
        rank: np.ndarray,
        accepted: np.ndarray,
        trusted: bool = False,
    ) -> None:
        """Queues verified edges out of accepted nodes directly (many trees at once): the child's
        raw log q, depth, sibling rank and whether it was accepted. `flush` adds them.
        trusted: the caller built them valid (flat, equal shapes, log q f64 <= 0, depth >= 1,
        rank >= 0, accepted bool: the scheduler's own walk), so `flush` skips the checks
        when everything queued is trusted."""
        if len(log_q):
            self._pending.append(
                (np.asarray(log_q, np.float64), np.asarray(depth), np.asarray(rank),
                 np.asarray(accepted, bool))
            )  # fmt: skip
            self._pending_trusted &= trusted

    def flush(self) -> None:
        """Adds the trees queued since the last flush as one `observe` call."""
        if len(self._pending) == 1:
            q, d, k, hit = self._pending[0]
        elif self._pending:
            q, d, k, hit = (np.concatenate(x) for x in zip(*self._pending, strict=True))
        else:
            return
        self._pending = []
        if self._pending_trusted:
            self._count(q, d, k, hit)
        else:
            self.observe(q, d, k, hit)
        self._pending_trusted = True

    def refit(self) -> None:
        """Fit the tables `apply` uses to the counts so far at its next call, without waiting
        for `refit_every` observation steps (the scheduler calls it after an exploration)."""
        self._table, self._since_fit = None, 0

    @property
    def observations(self) -> float:
        return float(self.verified.sum())

    def rates(self) -> np.ndarray:
        """[ranks, depths, bins] calibrated P(child accepted | parent accepted) per sibling
        rank, child depth and q bin: non-decreasing in q, values in (0, 1]."""
        w = self.prior_weight
        # per rank, pooled over depths, pulled to the raw q; then per (rank, depth), pulled to
        # its rank's pooled table
        ver, acc = self.verified.sum(axis=1), self.accepted.sum(axis=1)  # [ranks, bins]
        pooled = isotonic_rows((acc + w * np.exp(self.centers)) / (ver + w), ver + w)
        weight = (self.verified + w).reshape(-1, self.bins)
        prior = np.repeat(pooled, self.depths, axis=0)  # [ranks * depths, bins]
        out = isotonic_rows((self.accepted.reshape(-1, self.bins) + w * prior) / weight, weight)
        return np.clip(out.reshape(self.verified.shape), 1e-6, 1.0)

    def log_rate(self, log_q: np.ndarray, depth: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """Calibrated log P(accepted | parent accepted) for raw conditional log q at child
        `depth` and sibling `rank` (shapes broadcast against log q)."""
        return self._rate_at(np.asarray(log_q, np.float64), self._cell_base(depth, rank))

    def _cell_base(self, depth: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """Flat index of the first bin of each (depth, rank)'s table row."""
        d = np.minimum(np.asarray(depth, np.int64), self.depths) - 1
        row = np.minimum(np.asarray(rank, np.int64), self.ranks - 1) * self.depths + d
        return row * self.bins

    def _rate_at(self, x: np.ndarray, base: np.ndarray) -> np.ndarray:
        """`log_rate` for log q `x` and table rows starting at `base` (`_cell_base`)."""
        if self._table is None:
            table = np.log(self.rates()).reshape(-1, self.bins)
            slope = np.zeros_like(table)
            slope[:, :-1] = np.diff(table, axis=1)
            self._table, self._slope = table.ravel(), slope.ravel()
        # piecewise linear on log q between bin centers, per table row (vectorized np.interp)
        below = x - self.centers[0]
        pos = np.minimum(np.maximum(below * self._scale, 0.0), self.bins - 1.0)
        lo = np.minimum(pos.astype(np.int64), self.bins - 2)
        pos -= lo  # the fraction of the way to the next center
        lo = lo + base  # flat index of (row, lo) in the table
        out = self._slope[lo]
        out *= pos
        out += self._table[lo]
        # below the lowest center: continue with slope 1 (stays monotone, tends to 0); rates
        # are at most 1, so the result is <= 0 without a clip
        np.add(out, below, out=out, where=below < 0)
        return out

    def apply(
        self, parents: np.ndarray, log_f: np.ndarray, depth: np.ndarray, rank: np.ndarray
    ) -> np.ndarray:
        """Calibrated path log f for padded trees parents i32[R, M], log_f f32[R, M], depth and
        sibling rank i32[R, M] (root at column 0, parents before children, every column a
        real node). depth and rank may also be i32[M], the same in every tree (a drafted
        layout, engine/tree.py `layout_ranks` / `layout_depths`): then each depth's columns are
        computed at once when the depths are non-decreasing along the columns."""
        parents = np.asarray(parents)
        log_f = np.asarray(log_f, np.float32)
        rows, cols = log_f.shape
        if cols < 2 or rows == 0:
            return log_f.copy()
        depth, rank = np.asarray(depth), np.asarray(rank)
        runs = None
        if depth.ndim == 1 and rank.ndim == 1:
            runs, base = self._layout_runs(depth, rank)
        else:
            base = self._cell_base(np.maximum(depth[:, 1:], 1), rank[:, 1:])
        # [R, M - 1]: the flat index of each node's parent, its raw conditional log q and the
        # calibrated one
        up = parents[:, 1:] + _row_offsets(rows, cols)
        out = log_f.copy()
        flat = out.ravel()
        x = log_f[:, 1:] - flat[up]
        step = self._rate_at(x.astype(np.float64), base).astype(np.float32)
        if runs is None:  # a run of columns whose parents (in every tree) precede it
            pmax = parents.max(axis=0).tolist()
            runs, a = [], 1
            for b in range(2, cols + 1):
                if b == cols or pmax[b] >= a:
                    runs.append((a, b))
                    a = b
        # parents precede children, so one pass over the runs accumulates every path
        for a, b in runs:
            np.add(flat[up[:, a - 1 : b - 1]], step[:, a - 1 : b - 1], out=out[:, a:b])
        return out

    def _layout_runs(self, depth: np.ndarray, rank: np.ndarray) -> tuple:
        """(column runs or None, table row bases i64[M - 1]) of a layout given per column;
        cached for the last layout when its arrays are read-only (the engines' layouts are the
        same read-only arrays every iteration)."""
        key = self._layout_key
        if key is not None and key[0] is depth and key[1] is rank:
            return key[2], key[3]
        base = self._cell_base(np.maximum(depth[1:], 1), rank[1:])
        d = depth.tolist()
        runs = None
        if all(a <= b for a, b in zip(d[1:], d[2:], strict=False)):  # one run per depth
            starts = [j for j in range(1, len(d)) if j == 1 or d[j] != d[j - 1]]
            runs = list(zip(starts, [*starts[1:], len(d)], strict=True))
        if not (depth.flags.writeable or rank.flags.writeable):
            self._layout_key = (depth, rank, runs, base)
        return runs, base

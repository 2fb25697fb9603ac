"""AdaServe token-tree selection: which drafted nodes each request sends to verification.

Every iteration the draft model has grown a candidate tree per running request; each node `v`
carries `log f(v)`, the log of its path probability (root = 0, i.e. f = 1, and non-increasing
along every root-to-leaf path). `sum f(v)` over a selected subtree is the expected number of
tokens that request accepts this iteration (the root counts 1: it stands for the bonus token).
Under a token budget `B` (total verified tokens, roots included) the selector runs two phases:

1. **SLO phase.** Request `r` has decoded `o_r` tokens in `l_r` seconds and targets TPOT `t_r`.
   After an iteration of predicted latency `t_iter` it needs
   `A(r) = (l_r + t_iter) / t_r - o_r` accepted tokens to be on track, capped at
   `A_cap = min(A, d_r + 1)` (a tree of depth `d_r` cannot yield more). Every request first gets
   its root (mandatory). Then, most-behind first (largest `A`, ties by request order), a request
   takes its highest-`f` nodes until their `f` sum reaches `A_cap`, within the per-request node
   cap and what is left of the budget (the request that runs the budget dry gets a partial set).
2. **Throughput phase.** The rest of `B` goes to the globally highest-`f` remaining nodes, one
   global order over all requests, within the per-request cap.

Both phases follow the order `(-f, request, node index)`. Because `f(child) <= f(parent)` and
`parent < child`, that order lists every parent before its children, so each request's selection
is a prefix of its own sorted node list and therefore a connected tree containing the root.

Implementation (vectorized numpy, no Python loop over requests or nodes): trees are padded to
`[R, M]`; each node gets one unique int64 key `bits(-log f) << 31 | (r * M + j)` (the IEEE bits of a
non-negative float32 sort like the float), so one `np.sort(axis=1)` yields every request's order,
prefix counts come from a row-wise `cumsum`, and the throughput phase is one `np.partition` over
the eligible keys (keys are unique, so the k-th smallest is an exact, tie-free threshold).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

_LOW31 = np.int64((1 << 31) - 1)
_INF_BITS = np.int64(0x7F800000)  # IEEE-754 bits of float32 +inf: padding sorts after any node


def _layout(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read-only index arrays of a padded [rows, cols] layout: flat ids i64[rows, cols]
    (r * cols + j), row offsets i64[rows, 1] (r * cols), and the column indices
    u32[1, cols - 1] of the non-root columns (1..cols-1). Cached for small layouts (the
    scheduler's shape repeats every iteration)."""
    if rows * cols <= 1 << 16:
        return _small_layout(rows, cols)
    flat = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
    return flat, flat[:, :1], np.arange(1, cols, dtype=np.uint32)[None, :]


@functools.lru_cache(maxsize=32)
def _small_layout(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    flat = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
    out = (flat, flat[:, :1].copy(), np.arange(1, cols, dtype=np.uint32)[None, :])
    for a in out:
        a.flags.writeable = False
    return out


def _max_depth(parents: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Max node depth per tree by pointer doubling. parents i32[R, M] -> i32[R]."""
    rows, cols = parents.shape
    offset = (np.arange(rows, dtype=np.int64) * cols)[:, None]
    p = np.where(valid, parents, -1).astype(np.int64)  # current ancestor, -1 = past the root
    dist = (p >= 0).astype(np.int32)  # distance from each node to p
    while True:
        live = p >= 0
        if not live.any():
            return dist.max(axis=1)
        at = np.where(live, p, 0) + offset  # flat index of the ancestor
        dist = np.where(live, dist + dist.ravel()[at], dist)
        p = np.where(live, p.ravel()[at], -1)


def slo_need(
    elapsed_s: np.ndarray,
    decoded: np.ndarray,
    tpot_slo_s: np.ndarray,
    t_iter_s: float | np.ndarray,
    remaining: np.ndarray | None = None,
) -> np.ndarray:
    """A(r): tokens request r should accept in an iteration of latency `t_iter_s`.

    remaining None — the paper's horizon, back on track right after this iteration:
        A = (l + t_iter) / t - o.
    remaining R (tokens the request may still produce) — the request's horizon: the constant
    rate that ends the request exactly on its SLO, A = t_iter * R / (t (o + R) - l). An
    on-track request (l = o t) needs t_iter / t under both; a request that is behind spreads
    its catch-up over the rest of its output instead of demanding all of it now (which, under
    load, hands whole trees to a few far-behind requests and starves the rest, see
    BENCHMARKS.md); a request that can no longer attain its SLO (l >= t (o + R)) gets -1:
    served last, best effort.
    Broadcasts: t_iter_s may be [K, 1] against [n] vectors to price K candidate steps.
    """
    if remaining is None:
        return (elapsed_s + t_iter_s) / tpot_slo_s - decoded
    left = tpot_slo_s * (decoded + remaining) - elapsed_s
    need = t_iter_s * remaining / np.maximum(left, 1e-12)
    return np.where(left > 0, need, -1.0)


def _validate_forest(parents: np.ndarray, log_f: np.ndarray, valid: np.ndarray | None) -> None:
    """Checks padded trees parents i32[R, M], log_f f32[R, M]; only `valid` entries count
    (None: all of them).

    One combined vectorized test on the fast path; the per-field diagnosis runs only on failure.
    """
    rows, cols = parents.shape
    if rows == 0:
        return
    if cols == 0:
        raise ValueError("parents has no columns: every tree needs at least its root")
    _, offset, col = _layout(rows, cols)
    child_p = parents[:, 1:]
    in_range = child_p.view(np.uint32) < col  # negative parents wrap to huge values
    live = None if valid is None else valid[:, 1:]
    at = np.where(in_range if live is None else live & in_range, child_p, 0) + offset
    parent_f = log_f.ravel()[at]
    child_f = log_f[:, 1:]
    ok = in_range & (child_f <= parent_f) & (child_f > -np.inf)
    if (
        (parents[:, 0] == -1).all()
        and (log_f[:, 0] == 0.0).all()
        and (ok.all() if live is None else not (live & ~ok).any())
    ):
        return
    if valid is None:
        valid = np.ones(parents.shape, bool)
        live = valid[:, 1:]
    bad = np.flatnonzero(parents[:, 0] != -1)
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"parents[{r}, 0]={int(parents[r, 0])} must be -1 (node 0 is the root)")
    bad_parent = live & ~in_range
    if bad_parent.any():
        r, j = (int(x) for x in np.argwhere(bad_parent)[0])
        raise ValueError(
            f"parents[{r}, {j + 1}]={int(child_p[r, j])} is out of range: need "
            f"0 <= parent < {j + 1} (parents precede children, so the nodes form a tree "
            "without cycles)"
        )
    bad_f = valid & ~np.isfinite(log_f)
    if bad_f.any():
        r, j = (int(x) for x in np.argwhere(bad_f)[0])
        raise ValueError(f"log_f[{r}, {j}]={float(log_f[r, j])} must be finite")
    bad_root = np.flatnonzero(log_f[:, 0] != 0.0)
    if bad_root.size:
        r = int(bad_root[0])
        raise ValueError(f"log_f[{r}, 0]={float(log_f[r, 0])} must be 0.0 (root f = 1)")
    r, j = (int(x) for x in np.argwhere(live & ~ok)[0])
    raise ValueError(
        f"log_f[{r}, {j + 1}]={float(child_f[r, j])} exceeds its parent's "
        f"log_f[{r}, {int(child_p[r, j])}]={float(parent_f[r, j])}: path probabilities "
        "must be non-increasing from the root"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class CandidateTree:
    """One request's drafted candidate tree.

    parents: i32[N], parents[0] = -1 (root), 0 <= parents[i] < i otherwise.
    log_f: f32[N], log path probability; log_f[0] = 0, log_f[i] <= log_f[parents[i]].
    depth: optional i32[N] (root 0); when given its max is the tree depth used by `A_cap`.
    Tokens and other per-node data stay with the caller: selection returns node indices.
    """

    parents: np.ndarray
    log_f: np.ndarray
    depth: np.ndarray | None = None

    def __post_init__(self) -> None:
        parents = np.asarray(self.parents, dtype=np.int32)
        log_f = np.asarray(self.log_f, dtype=np.float32)
        if parents.ndim != 1 or parents.size == 0:
            raise ValueError(f"parents.shape={parents.shape} must be [N] with N >= 1")
        if log_f.shape != parents.shape:
            raise ValueError(f"log_f.shape={log_f.shape} must equal parents.shape={parents.shape}")
        _validate_forest(parents[None], log_f[None], np.ones((1, parents.size), dtype=bool))
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "log_f", log_f)
        if self.depth is not None:
            depth = np.asarray(self.depth, dtype=np.int32)
            if depth.shape != parents.shape:
                raise ValueError(f"depth.shape={depth.shape} must equal parents.shape")
            expect = np.concatenate([[0], depth[parents[1:]] + 1])
            if not np.array_equal(depth, expect):
                raise ValueError("depth must be 0 at the root and depth[parent] + 1 elsewhere")
            object.__setattr__(self, "depth", depth)

    @property
    def num_nodes(self) -> int:
        return int(self.parents.size)

    @property
    def max_depth(self) -> int:
        if self.depth is not None:
            return int(self.depth.max())
        return int(_max_depth(self.parents[None], np.ones((1, self.num_nodes), bool))[0])


def _as_vector(name: str, value: object, rows: int, dtype: type) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.shape != (rows,):
        raise ValueError(f"{name}.shape={arr.shape} must be ({rows},), one entry per request")
    return arr


@dataclasses.dataclass(frozen=True, slots=True)
class SelectionInput:
    """Everything one selection needs, as padded arrays over the R running requests.

    parents: i32[R, M], log_f: f32[R, M] — tree r occupies columns [0, num_nodes[r]); the rest
        is padding and ignored.
    num_nodes: i32[R] (1 <= num_nodes[r] <= M).
    decoded: i64[R] tokens decoded so far (o_r); elapsed_s: f64[R] decoding time so far (l_r);
    tpot_slo_s: f64[R] TPOT target (t_r).
    budget: total tokens to select, roots included (B >= R).
    t_iter_s: predicted latency of this iteration.
    node_cap: max nodes per request (roots included), or None for no cap.
    max_depth: optional int or i32[R], the depth `d` in `A_cap = min(A, d + 1)`; computed from
        `parents` when None (pass it when the tree shape is known to skip that work).
    remaining: optional i64[R] tokens each request may still produce; switches `A(r)` to the
        request horizon (see `slo_need`).
    """

    parents: np.ndarray
    log_f: np.ndarray
    num_nodes: np.ndarray
    decoded: np.ndarray
    elapsed_s: np.ndarray
    tpot_slo_s: np.ndarray
    budget: int
    t_iter_s: float
    node_cap: int | None = None
    max_depth: np.ndarray | int | None = None
    remaining: np.ndarray | None = None

    def __post_init__(self) -> None:
        parents = np.asarray(self.parents, dtype=np.int32)
        log_f = np.asarray(self.log_f, dtype=np.float32)
        if parents.ndim != 2:
            raise ValueError(f"parents.shape={parents.shape} must be [R, M]")
        if log_f.shape != parents.shape:
            raise ValueError(f"log_f.shape={log_f.shape} must equal parents.shape={parents.shape}")
        rows, cols = parents.shape
        if rows * cols >= 1 << 31:
            raise ValueError(f"parents.shape={parents.shape}: R * M must stay below 2**31")
        num_nodes = _as_vector("num_nodes", self.num_nodes, rows, np.int32)
        full = True  # every tree fills all M columns (no padding)
        if rows:
            fewest = num_nodes.min()
            if fewest < 1 or num_nodes.max() > cols:
                raise ValueError(f"num_nodes={num_nodes} must lie in [1, {cols}]")
            full = fewest == cols
        decoded = _as_vector("decoded", self.decoded, rows, np.int64)
        if rows and decoded.min() < 0:
            raise ValueError(f"decoded={decoded} must be >= 0")
        elapsed = _as_vector("elapsed_s", self.elapsed_s, rows, np.float64)
        if rows and not (elapsed.min() >= 0 and elapsed.max() < np.inf):  # NaN fails too
            raise ValueError(f"elapsed_s={elapsed} must be finite and >= 0")
        slo = _as_vector("tpot_slo_s", self.tpot_slo_s, rows, np.float64)
        if rows and not (slo.min() > 0 and slo.max() < np.inf):
            raise ValueError(f"tpot_slo_s={slo} must be finite and > 0")
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget <= 0:
            raise ValueError(f"budget={budget!r} must be a positive int")
        if budget < rows:
            raise ValueError(f"budget={budget} < {rows} requests: every request needs its root")
        if not (math.isfinite(self.t_iter_s) and self.t_iter_s >= 0):
            raise ValueError(f"t_iter_s={self.t_iter_s} must be finite and >= 0")
        cap = self.node_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"node_cap={cap!r} must be None or an int >= 1")
        valid = None if full else np.arange(cols) < num_nodes[:, None]
        _validate_forest(parents, log_f, valid)
        if self.max_depth is None:
            if valid is None:
                valid = np.ones(parents.shape, bool)
            depth = _max_depth(parents, valid) if rows else np.zeros(0, np.int32)
        else:
            depth = np.asarray(self.max_depth, dtype=np.int32)
            if depth.ndim == 0:
                depth = np.full(rows, depth, np.int32)
            else:
                depth = np.broadcast_to(depth, (rows,))
            if rows and depth.min() < 0:
                raise ValueError(f"max_depth={self.max_depth} must be >= 0")
        if self.remaining is not None:
            remaining = _as_vector("remaining", self.remaining, rows, np.int64)
            if rows and remaining.min() < 0:
                raise ValueError(f"remaining={remaining} must be >= 0")
            object.__setattr__(self, "remaining", remaining)
        for name, value in (
            ("parents", parents),
            ("log_f", log_f),
            ("num_nodes", num_nodes),
            ("decoded", decoded),
            ("elapsed_s", elapsed),
            ("tpot_slo_s", slo),
            ("budget", int(budget)),
            ("max_depth", depth),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def trusted(
        cls,
        *,
        parents: np.ndarray,
        log_f: np.ndarray,
        decoded: np.ndarray,
        elapsed_s: np.ndarray,
        tpot_slo_s: np.ndarray,
        budget: int,
        t_iter_s: float,
        node_cap: int | None,
        max_depth: int,
        remaining: np.ndarray | None = None,
    ) -> SelectionInput:
        """An input built without the checks of the constructor, for a caller whose arrays are
        valid by construction: the scheduler's hot path (every tree fills all M columns, log f
        from the calibrator is non-increasing along paths, budget >= R, the clocks are finite).
        The fields get the constructor's dtypes; every check is skipped (they cost about as
        much as the selection itself at paper scale). tests/scheduler/test_selector.py checks
        that both constructions select the same nodes."""
        self = object.__new__(cls)
        rows, cols = parents.shape
        fields = {
            "parents": np.asarray(parents, np.int32),
            "log_f": np.asarray(log_f, np.float32),
            "num_nodes": np.full(rows, cols, np.int32),
            "decoded": np.asarray(decoded, np.int64),
            "elapsed_s": np.asarray(elapsed_s, np.float64),
            "tpot_slo_s": np.asarray(tpot_slo_s, np.float64),
            "budget": int(budget),
            "t_iter_s": float(t_iter_s),
            "node_cap": node_cap,
            "max_depth": np.full(rows, max_depth, np.int32),
            "remaining": None if remaining is None else np.asarray(remaining, np.int64),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        return self

    @property
    def num_requests(self) -> int:
        return int(self.parents.shape[0])

    @classmethod
    def from_trees(
        cls,
        trees: Sequence[CandidateTree],
        decoded: Sequence[int] | np.ndarray,
        elapsed_s: Sequence[float] | np.ndarray,
        tpot_slo_s: Sequence[float] | np.ndarray,
        *,
        budget: int,
        t_iter_s: float,
        node_cap: int | None = None,
    ) -> SelectionInput:
        """Pads per-request trees into the batched layout (convenience; the hot path passes
        padded draft arrays directly)."""
        rows = len(trees)
        cols = max((t.num_nodes for t in trees), default=1)
        parents = np.full((rows, cols), -1, dtype=np.int32)
        log_f = np.full((rows, cols), -np.inf, dtype=np.float32)
        for r, tree in enumerate(trees):
            parents[r, : tree.num_nodes] = tree.parents
            log_f[r, : tree.num_nodes] = tree.log_f
        depth = None
        if rows and all(t.depth is not None for t in trees):
            depth = np.array([t.max_depth for t in trees], dtype=np.int32)
        return cls(
            parents=parents,
            log_f=log_f,
            num_nodes=np.array([t.num_nodes for t in trees], dtype=np.int32),
            decoded=decoded,
            elapsed_s=elapsed_s,
            tpot_slo_s=tpot_slo_s,
            budget=budget,
            t_iter_s=t_iter_s,
            node_cap=node_cap,
            max_depth=depth,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Selection:
    """Result of one selection over R requests (K = total selected nodes <= budget).

    request_index, node_index: i32[K], the selected nodes sorted by (request, node) — the
        order in which the engine lays out its verify batch; `nodes` splits them per request.
    slo_nodes: i32[R] nodes taken in the SLO phase (roots included);
    throughput_nodes: i32[R] nodes added by the throughput phase.
    expected_accepted: f64[R] sum of f over the selected nodes (root counts 1).
    slo_need: f64[R] A(r); slo_target: f64[R] A_cap(r).
    slo_met: bool[R] the SLO phase reached A_cap(r).
    """

    request_index: np.ndarray
    node_index: np.ndarray
    slo_nodes: np.ndarray
    throughput_nodes: np.ndarray
    expected_accepted: np.ndarray
    slo_need: np.ndarray
    slo_target: np.ndarray
    slo_met: np.ndarray

    @property
    def nodes(self) -> tuple[np.ndarray, ...]:
        """Per request, its sorted node indices i32[k_r]; nodes[r][0] == 0 (the root)."""
        ends = np.cumsum(self.num_selected).tolist()
        return tuple(self.node_index[a:b] for a, b in zip([0, *ends], ends, strict=False))

    @property
    def num_selected(self) -> np.ndarray:
        """i32[R] nodes per request."""
        return self.slo_nodes + self.throughput_nodes

    @property
    def total(self) -> int:
        return int(self.node_index.size)


def select(inp: SelectionInput) -> Selection:
    """Runs the SLO phase then the throughput phase; see the module docstring."""
    rows, cols = inp.parents.shape
    if rows == 0:
        ei, ef = np.zeros(0, np.int32), np.zeros(0, np.float64)
        return Selection(ei, ei, ei, ei, ef, ef, ef, np.zeros(0, bool))
    flat, k1, k, csum, need, target = _phases(inp)
    request_index, node_index = np.divmod(flat, cols)
    row = np.arange(rows)
    return Selection(
        request_index=request_index.astype(np.int32),
        node_index=node_index.astype(np.int32),
        slo_nodes=k1.astype(np.int32),
        throughput_nodes=(k - k1).astype(np.int32),
        expected_accepted=csum[row, k - 1],
        slo_need=need,
        slo_target=target,
        slo_met=csum[row, k1 - 1] >= target,
    )


def select_nodes(inp: SelectionInput) -> tuple[np.ndarray, np.ndarray]:
    """`select` for the scheduler's hot path: only (node_index i64[K], nodes per request
    i64[R]), i.e. `Selection.node_index` and `Selection.num_selected`."""
    rows, cols = inp.parents.shape
    if rows == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat, _, k, _, _, _ = _phases(inp)
    return flat % cols, k


def _phases(inp: SelectionInput) -> tuple[np.ndarray, ...]:
    """Both phases for R >= 1 requests. Returns the selected nodes' flat ids (r * M + j) sorted
    by (request, node), the nodes per request after the SLO phase (k1) and after both (k), each
    request's f prefix sums over its nodes best first (csum), A(r) and A_cap(r)."""
    rows, cols = inp.parents.shape
    width = cols if inp.node_cap is None else min(cols, inp.node_cap)
    flat_ids = _layout(rows, cols)[0]

    # One unique key per node: bits(-log f) high, flat id r * M + j low. Validation made every
    # log f <= 0, so clearing the sign bit gives the bits of -log f (and -0.0 -> +0.0: the root's
    # key is the smallest); padding gets +inf bits.
    keys = (inp.log_f.view(np.int32) & np.int32(0x7FFFFFFF)).astype(np.int64)
    if inp.num_nodes.min() < cols:
        keys = np.where(flat_ids[0] < inp.num_nodes[:, None], keys, _INF_BITS)
    keys <<= 31
    keys |= flat_ids
    keys.sort(axis=1)
    skeys = keys[:, :width]  # [R, C]: each request's nodes, best first
    f = (skeys >> 31).astype(np.int32).view(np.float32)  # -log f, sorted ascending
    np.negative(f, out=f)
    np.exp(f, out=f)  # f32[R, C] path probabilities, padding -> 0
    csum = f.cumsum(axis=1, dtype=np.float64)  # [R, C] f-sum of the first j + 1 nodes
    avail = np.minimum(inp.num_nodes, width).astype(np.int64)  # selectable nodes per request

    # SLO phase: nodes needed to reach A_cap, then granted most-behind first.
    need = slo_need(inp.elapsed_s, inp.decoded, inp.tpot_slo_s, inp.t_iter_s, inp.remaining)
    target = np.minimum(need, inp.max_depth + 1.0)
    # Node j + 1 is still wanted while the first j + 1 nodes sum to less than A_cap.
    wanted = np.minimum((csum[:, :-1] < target[:, None]).sum(axis=1) + 1, avail)
    priority = (-need).argsort(kind="stable")
    extra = wanted[priority] - 1
    spare = inp.budget - rows - (extra.cumsum() - extra)
    k1 = np.ones(rows, dtype=np.int64)
    k1[priority] += np.minimum(np.maximum(spare, 0), extra)

    # Throughput phase: the `left` smallest keys among nodes not yet taken and within the cap.
    left = inp.budget - int(k1.sum())
    rank = flat_ids[0, :width]
    eligible = (rank >= k1[:, None]) & (rank < avail[:, None])
    pool = skeys[eligible]
    if left <= 0 or pool.size == 0:
        k = k1
    elif left >= pool.size:
        k = avail
    else:
        pool.partition(left - 1)
        threshold = pool[left - 1]
        # Rows are sorted, so `skeys <= threshold` is a prefix of each row; the phase adds the
        # part of that prefix past k1 (and within the cap).
        k = np.maximum(k1, np.minimum((skeys <= threshold).sum(axis=1), avail))

    flat = skeys[rank < k[:, None]]
    flat &= _LOW31
    flat.sort()  # the selected nodes' flat ids, i.e. sorted by (request, node)
    return flat, k1, k, csum, need, target

"""A simulated `StepEngine` on a virtual clock (numpy only, no model, no sleeping).

The real `Scheduler` (scheduler/loop.py) drives this engine exactly as it drives the JAX
`Engine`: same policies, budget rule, selector, acceptance walk and KV bookkeeping. Only the
device work is replaced:

- **Time.** Every call advances a `VirtualClock` (the scheduler's `clock`) by the profile's
  latency: `forward` by the verify latency of its total token count (prefill chunks and trees
  share one step, as in the real engine), `draft_step` by one draft step over its tokens, and
  `expand` by the profile's measured expansion call of that tree shape over the smallest
  row bucket holding the decoding requests (the real engine expands only those), or,
  without one, by `depth - 1` draft steps over `rows * width` tokens (the real expansion
  runs depth-1 from the draft step's top-k and one draft step per further depth, in one call).
  With a `SpeedTrace` (validation against a real replay) every call's latency is scaled by
  how fast the real machine ran that kind of call in that second of the replay.
- **Draft trees.** `expand` lays trees out exactly as steps/expand.py does (node 0 the root,
  nodes 1..k the depth-1 candidates, then `w * k` per depth, children of the previous depth's
  top-`w` frontier by `log f`, ties to the lower index). The draft's conditional
  probabilities of every frontier node's top-k children are resampled from the calibration
  (calibration.py), so `log_f` has the real draft's distribution.
- **Target tokens.** For every frontier node the engine draws which child (if any) is the
  target's token, with the calibrated match probabilities. A simulated node's token is its own
  index in the tree (distinct among siblings), and the hidden "target token" at a node is the
  index of its correct child, or 0 (matches no child). `forward` returns these for a verified
  tree, so the scheduler's own `accept_path` accepts exactly the simulated path, whatever
  subset of nodes the selector sent; the bonus token is the target's token at the path's end.
  Prefill chunks and plain decode tokens return token 0 (token values carry no meaning here).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from adaserve_jax.engine.batch import Move, Segment, SegmentBatch
from adaserve_jax.engine.tree import DraftTrees, TreeShape, layout_ranks
from adaserve_jax.sim.calibration import Calibration
from adaserve_jax.sim.profiles import SimProfile


class VirtualClock:
    """A clock the simulation moves forward; `clock()` reads it (seconds)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"{seconds=} must be >= 0")
        self.now += seconds

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, float(t))


class SpeedTrace:
    """How fast a real replay's device ran, per second since its start and per kind of call
    ("verify", "draft", "expand"): each call's wall time over its profile price (bench
    `speed_trace`). `factor(kind, t)` scales a simulated call that begins at virtual time `t`:
    a second without such calls takes the nearest earlier second's factor (the first
    measured one before any), past the trace the last one, and a kind never measured `fallback`'s
    (or 1.0)."""

    def __init__(self, per_kind: dict[str, list[float | None]], fallback: str = "verify") -> None:
        self._rows: dict[str, np.ndarray] = {}
        for kind, values in per_kind.items():
            row = np.array([np.nan if v is None else float(v) for v in values], np.float64)
            measured = row[~np.isnan(row)]
            if measured.size and not (np.isfinite(measured).all() and measured.min() > 0):
                raise ValueError(f"speed trace {kind!r}: factors must be finite and > 0")
            if not measured.size:
                continue
            first = measured[0]
            for i in range(row.size):  # carry the last measured second forward
                if np.isnan(row[i]):
                    row[i] = row[i - 1] if i else first
            self._rows[kind] = row
        self.fallback = fallback

    def factor(self, kind: str, t: float) -> float:
        row = self._rows.get(kind, self._rows.get(self.fallback))
        if row is None:
            return 1.0
        return float(row[min(max(int(t), 0), row.size - 1)])


class SpeedJitter:
    """How a real machine's device calls scatter around their second's speed: per kind of call
    ("verify", "draft", "expand"), a sample of calls' wall time over price divided by their
    second's time-weighted ratio (what `SpeedTrace` holds), normalized to mean 1. A
    `SpeedTrace` gives each simulated call its second's mean; `draw` multiplies in one such
    call's scatter, so a simulated second holds the real mix of fast steps and slow outliers
    (which moves SLO pacing: an outlier step costs a tight request its slack at once). A kind
    without a sample uses `fallback`'s.

    `corr_ms` > 0 gives the scatter memory (bench/speed_memory.py): a simulated engine then
    draws through a latent standard normal that decays towards a fresh one with time constant
    `corr_ms` (an Ornstein-Uhlenbeck process on the virtual clock, shared by the kinds of call),
    mapped to a sample value by its quantile (`at`), so slow calls come in spells as on the
    real machine while each draw keeps the sample's distribution. 0 draws independently."""

    def __init__(
        self, per_kind: dict[str, Sequence[float]], fallback: str = "verify", corr_ms: float = 0.0
    ) -> None:
        if not (math.isfinite(corr_ms) and corr_ms >= 0):
            raise ValueError(f"speed jitter: corr_ms={corr_ms} must be finite and >= 0")
        self.corr_s = corr_ms / 1e3
        self._samples: dict[str, np.ndarray] = {}
        for kind, values in per_kind.items():
            x = np.asarray(values, np.float64).ravel()
            if not x.size or not (np.isfinite(x).all() and x.min() > 0):
                raise ValueError(f"speed jitter {kind!r}: needs finite ratios > 0")
            self._samples[kind] = x / x.mean()
        self._sorted = {kind: np.sort(x) for kind, x in self._samples.items()}
        if fallback not in self._samples:
            raise ValueError(f"speed jitter has no {fallback!r} sample")
        self.fallback = fallback

    def draw(self, kind: str, rng: np.random.Generator) -> float:
        x = self._samples.get(kind, self._samples[self.fallback])
        return float(x[rng.integers(x.size)])

    def at(self, kind: str, u: float) -> float:
        """The sample's value at quantile u in [0, 1) (what a uniform u draws)."""
        x = self._sorted.get(kind, self._sorted[self.fallback])
        return float(x[min(int(u * x.size), x.size - 1)])


class SimEngine:
    """StepEngine protocol (scheduler/loop.py) on a virtual clock; see the module docstring."""

    def __init__(
        self,
        profile: SimProfile,
        calibration: Calibration,
        *,
        num_slots: int,
        max_len: int,
        clock: VirtualClock | None = None,
        seed: int = 0,
        draft_topk: int = 8,
        speed: SpeedTrace | None = None,
        jitter: SpeedJitter | None = None,
    ) -> None:
        if num_slots < 1 or max_len < 2:
            raise ValueError(f"{num_slots=} must be >= 1 and {max_len=} >= 2")
        self.profile = profile
        self.calibration = calibration
        self.num_slots = num_slots
        self.max_len = max_len
        self.has_draft = True
        self.pads_to_buckets = profile.pad_to_buckets  # how a step is priced (pacing reads it)
        self.clock = clock or VirtualClock()
        self.rng = np.random.default_rng(seed)
        self.draft_topk = max(draft_topk, calibration.topk)
        self._truth = np.zeros((num_slots, 1), np.int32)  # [S, N] target token per tree node
        self._tree_ctx = np.full(num_slots, -1, np.int64)  # root position of this step's tree
        self.verify_seconds = 0.0
        self.draft_seconds = 0.0
        self.cpu_seconds = 0.0  # host CPU time inside this engine (not the scheduler's)
        self.speed = speed  # a real replay's device speed over time (validation), else 1.0
        self.jitter = jitter  # each call's scatter around that speed (its own random stream)
        self._jitter_rng = np.random.default_rng([seed, 1])
        self._jitter_z, self._jitter_t = 0.0, None  # correlated scatter's latent (SpeedJitter)
        # streaks (calibration.py): every slot's latent draft ease, a quantile in [0, 1), and
        # the position up to which the draft has read it; its own random stream
        self._ease = np.zeros(num_slots)
        self._ease_pos = np.full(num_slots, -1, np.int64)
        self._ease_rng = np.random.default_rng([seed, 2])

    # ---- StepEngine --------------------------------------------------------------------
    def forward(
        self, segments: list[Segment], moves: list[Move]
    ) -> tuple[np.ndarray, tuple[int, ...]]:
        t0 = time.thread_time()
        b = SegmentBatch.of(segments)
        lens, offsets, total = b.lens, b.starts, b.num_tokens
        verify_ms = self.profile.verify_ms(total) * self._factor("verify")
        step_s = (verify_ms + self.profile.host_ms) / 1e3
        self.clock.advance(step_s)
        self.verify_seconds += step_s
        sampled = np.zeros(total, np.int32)
        if len(b):
            # the segments verifying this step's trees: at their slot's tree position
            ctx = self._tree_ctx[b.slots]
            is_tree = (ctx >= 0) & (ctx == b.ctx_lens)
            owner = np.repeat(is_tree, lens)  # token of a tree segment
            nodes = b.tokens.astype(np.int64)
            nodes[offsets[is_tree]] = 0  # the root's token is the real pending token: node 0
            rows = np.repeat(b.slots, lens)[owner]
            sampled[owner] = self._truth[rows, nodes[owner]]
        self._tree_ctx[:] = -1
        self.cpu_seconds += time.thread_time() - t0
        return sampled, tuple(offsets.tolist())

    def draft_step(self, segments: list[Segment]) -> tuple[np.ndarray, np.ndarray, tuple]:
        """Top-k draft log-probs for every batch token; only segment ends are drawn (roots)."""
        t0 = time.thread_time()
        b = SegmentBatch.of(segments)
        lens, offsets, total = b.lens, b.starts, b.num_tokens
        step_s = self.profile.draft_ms(total) * self._factor("draft") / 1e3
        self.clock.advance(step_s)
        self.draft_seconds += step_s
        k = self.draft_topk
        vals = np.full((total, k), -np.inf, np.float32)
        vals[:, 0] = 0.0
        toks = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32), (total, k)).copy()
        if total:
            ends = offsets + lens - 1
            if self.calibration.streak_rho > 0.0:
                q = self.calibration.confidence_at(self._step_ease(b.slots, b.ctx_lens + lens), k)
            else:
                q = self.calibration.sample_confidence(self.rng, 1, len(segments), k)
            with np.errstate(divide="ignore"):
                vals[ends] = np.log(np.maximum(q, 1e-30))
        self.cpu_seconds += time.thread_time() - t0
        return vals, toks, tuple(offsets.tolist())

    def expand(self, root_vals, root_toks, root_pos, shape: TreeShape) -> DraftTrees:
        """Simulated trees for the rows with a root (root_pos > 0); see the module docstring."""
        t0 = time.thread_time()
        s, n = self.num_slots, shape.num_nodes
        k, w, depth = shape.topk, shape.width, shape.depth
        root_pos = np.asarray(root_pos)
        active = np.flatnonzero(root_pos > 0)
        a = active.size
        rows_paid = a if self.profile.expand_rows == "active" else s
        if depth > 1:
            step_s = self.profile.expand_call_ms(shape, a, rows_paid * w) / 1e3
            step_s *= self._factor("expand")
            self.clock.advance(step_s)
            self.draft_seconds += step_s

        tokens = np.broadcast_to(np.arange(n, dtype=np.int32), (s, n)).copy()
        parents = np.zeros((s, n), np.int32)
        parents[:, 0] = -1
        log_f = np.zeros((s, n), np.float32)
        depths = np.zeros((s, n), np.int32)
        truth = np.zeros((s, n), np.int32)
        rv = np.asarray(root_vals, np.float32)[active, :k]  # [A, k]
        log_f[active, 1 : 1 + k] = rv
        depths[:, 1 : 1 + k] = 1
        # the target's token at the root: one of its k children or none
        root = np.zeros((a, 1), np.int64)
        self._draw_truth(truth, active, root, np.exp(rv)[:, None, :], 1, depth=1)

        cand = np.broadcast_to(np.arange(1, 1 + k), (a, k))  # [A, C] node ids of candidates
        nxt = 1 + k
        ar = np.arange(a)[:, None]
        for j in range(2, depth + 1):
            cand_logf = log_f[active[:, None], cand]
            pick = np.argsort(-cand_logf, axis=1, kind="stable")[:, :w]
            frontier = cand[ar, pick]  # [A, w] sorted by log_f, ties lower index
            q = self.calibration.sample_confidence(self.rng, j, a * w, k).reshape(a, w, k)
            child = nxt + np.arange(w * k)  # [w*k]
            parents[:, child] = 0
            parents[active[:, None], child[None, :]] = np.repeat(frontier, k, axis=1)
            with np.errstate(divide="ignore"):
                lq = np.log(np.maximum(q, 1e-30)).reshape(a, w * k)
            log_f[active[:, None], child[None, :]] = (
                np.repeat(log_f[active[:, None], frontier], k, axis=1) + lq
            )
            depths[:, child] = j
            self._draw_truth(truth, active, frontier, q, nxt, depth=j)
            cand = np.broadcast_to(child, (a, w * k))
            nxt += w * k
        self._truth = truth
        self._tree_ctx[:] = -1
        self._tree_ctx[active] = root_pos[active]
        self.cpu_seconds += time.thread_time() - t0
        return DraftTrees(tokens, parents, log_f, depths, rank=layout_ranks(n, k))

    # ---- internals ---------------------------------------------------------------------
    def _step_ease(self, slots: np.ndarray, end_pos: np.ndarray) -> np.ndarray:
        """The slots' draft ease after reading up to `end_pos`: kept with probability rho per
        token advanced, else redrawn; a slot whose position went back holds a new request."""
        last = self._ease_pos[slots]
        gap = end_pos - last
        keep_p = np.where((last < 0) | (gap <= 0), 0.0, self.calibration.streak_rho**gap)
        fresh = self._ease_rng.random(slots.size)
        keep = self._ease_rng.random(slots.size) < keep_p
        ease = np.where(keep, self._ease[slots], fresh)
        self._ease[slots] = ease
        self._ease_pos[slots] = end_pos
        return ease

    def _factor(self, kind: str) -> float:
        f = 1.0 if self.speed is None else self.speed.factor(kind, self.clock())
        if self.jitter is not None:
            if self.jitter.corr_s > 0:
                f *= self.jitter.at(kind, self._latent_quantile())
            else:
                f *= self.jitter.draw(kind, self._jitter_rng)
        return f

    def _latent_quantile(self) -> float:
        """The correlated scatter's latent normal (SpeedJitter) moved to now, as a quantile."""
        now, fresh = self.clock(), float(self._jitter_rng.standard_normal())
        if self._jitter_t is None:
            z = fresh
        else:
            keep = math.exp(-(now - self._jitter_t) / self.jitter.corr_s)
            z = keep * self._jitter_z + math.sqrt(1.0 - keep * keep) * fresh
        self._jitter_z, self._jitter_t = z, now
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    def _draw_truth(self, truth: np.ndarray, active: np.ndarray, nodes: np.ndarray,
                    q: np.ndarray, first: int, depth: int) -> None:  # fmt: skip
        """For parent nodes i64[A, P] whose k children at `depth` (probabilities q f32[A, P, k],
        node ids `first + (p * k + rank)`) were drafted: which child is the target's token
        (0: none)."""
        a, p, k = q.shape
        rank = np.broadcast_to(np.arange(k), q.shape)
        m = self.calibration.match_prob(q, rank, depth)  # [A, P, k]
        cum = np.cumsum(m, axis=-1)
        cum /= np.maximum(cum[..., -1:], 1.0)  # a sum above 1 is renormalized
        u = self.rng.random((a, p, 1))
        hit = (u >= cum).sum(-1)  # [A, P]: index of the correct child, k = none
        ids = first + np.arange(p)[None, :] * k + hit
        truth[active[:, None], nodes] = np.where(hit < k, ids, 0)

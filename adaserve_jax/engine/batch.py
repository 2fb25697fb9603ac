"""Host-side flat token batches (numpy only).

A `Segment` is one request's contribution to a device step: a prefill chunk (a
chain), a speculation tree, or a single decode token (a tree of one). Node `i`
of a segment is written to cache row `ctx_len + i` of its slot, has RoPE
position `ctx_len + depth(i)`, and attends to the slot's committed rows
`[0, ctx_len)` plus its own ancestors in the segment (itself included).

`FlatBatch.build` concatenates segments (grouped by request, in order), pads to
the smallest token bucket that fits, and picks the smallest context bucket that
covers every segment's committed rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature} must be finite and >= 0")
        if not (np.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not isinstance(self.top_k, int | np.integer) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be an int >= 0 (0 = off)")
        if not isinstance(self.seed, int | np.integer) or not (0 <= self.seed < 2**32):
            raise ValueError(f"seed={self.seed} must be an int in [0, 2**32)")


GREEDY = SamplingParams()


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    """One request's tokens in a step.

    tokens/parents i32[n]; parents[i] < i, -1 = attaches to the committed context.
    """

    slot: int
    ctx_len: int
    tokens: np.ndarray
    parents: np.ndarray
    sampling: SamplingParams = GREEDY

    @classmethod
    def chain(cls, slot: int, ctx_len: int, tokens: Sequence[int], sampling=GREEDY) -> Segment:
        n = len(tokens)
        return cls(
            slot,
            ctx_len,
            np.asarray(tokens, np.int32),
            np.arange(-1, n - 1, dtype=np.int32),
            sampling,
        )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def is_chain(self) -> bool:
        """Node i's parent is i - 1 (a prefill chunk, a decode token, a drafted chain)."""
        n = len(self)
        return (
            n == 1
            and int(self.parents[0]) == -1
            or np.array_equal(self.parents, np.arange(-1, n - 1))
        )

    def depths(self) -> np.ndarray:
        """i32[n] depth of every node (roots 0)."""
        if self.is_chain():
            return np.arange(len(self), dtype=np.int32)
        depth = np.zeros(len(self), np.int32)
        for i, p in enumerate(self.parents):
            depth[i] = 0 if p < 0 else depth[p] + 1
        return depth

    def ancestor_mask(self) -> np.ndarray:
        """bool[n, n]: mask[i, j] = j is i or an ancestor of i."""
        n = len(self)
        if n and self.is_chain():
            return np.tril(np.ones((n, n), bool))
        mask = np.eye(n, dtype=bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i] |= mask[p]
        return mask

    def validate(self, vocab_size: int, num_slots: int, max_len: int) -> None:
        n = len(self)
        if n == 0:
            raise ValueError("segment has no tokens")
        if not 0 <= self.slot < num_slots:
            raise ValueError(f"slot={self.slot} outside [0, {num_slots})")
        if self.ctx_len < 0 or self.ctx_len + n > max_len:
            raise ValueError(
                f"segment needs cache rows [{self.ctx_len}, {self.ctx_len + n}) "
                f"but a slot has {max_len}"
            )
        if self.parents.shape != (n,):
            raise ValueError(f"parents shape {self.parents.shape} != tokens shape ({n},)")
        if np.any(self.parents >= np.arange(n)) or np.any(self.parents < -1):
            raise ValueError(
                "parents must satisfy -1 <= parents[i] < i (no cycles, no forward refs)"
            )
        if np.any(self.tokens < 0) or np.any(self.tokens >= vocab_size):
            raise ValueError(f"token ids must be in [0, {vocab_size})")


def ragged_index(lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For consecutive runs of `lens` items: (run of each item, its index within the run,
    start of each run), all int64. The flat <-> padded [runs, max(lens)] mapping used for
    segments and trees throughout the engine and the scheduler."""
    lens = np.asarray(lens, np.int64)
    starts = np.cumsum(lens) - lens
    owner = np.repeat(np.arange(lens.size), lens)
    return owner, np.arange(int(lens.sum())) - starts[owner], starts


class SegmentBatch(Sequence[Segment]):
    """Many segments stored flat: what the engines read, without a `Segment` object per
    request (at 64-96 running requests, building and reading those was a large part of an
    iteration's host time). A `Sequence[Segment]`: indexing or iterating materializes
    `Segment`s (views of the flat arrays), so code written for a list of segments works on it.

    slots, ctx_lens, lens: i64[n]; tokens, parents: i32[sum(lens)] (segment i holds
    `tokens[starts[i] : starts[i] + lens[i]]`, parents local to it); sampling: n entries.
    `of` converts any sequence of segments; `+` concatenates (with a batch or a list).
    """

    __slots__ = ("slots", "ctx_lens", "lens", "tokens", "parents", "sampling", "_starts")

    def __init__(self, slots, ctx_lens, lens, tokens, parents, sampling=None) -> None:
        self.slots = np.asarray(slots, np.int64)
        self.ctx_lens = np.asarray(ctx_lens, np.int64)
        self.lens = np.asarray(lens, np.int64)
        self.tokens = np.asarray(tokens, np.int32)
        self.parents = np.asarray(parents, np.int32)
        n = self.slots.shape[0]
        self.sampling = (GREEDY,) * n if sampling is None else tuple(sampling)
        if not (self.ctx_lens.shape == self.lens.shape == (n,) and len(self.sampling) == n):
            raise ValueError(
                f"slots, ctx_lens, lens and sampling must have one entry per segment: "
                f"{n}, {self.ctx_lens.shape}, {self.lens.shape}, {len(self.sampling)}"
            )
        if self.tokens.shape != self.parents.shape or self.tokens.shape != (int(self.lens.sum()),):
            raise ValueError(
                f"tokens {self.tokens.shape} and parents {self.parents.shape} must both hold "
                f"sum(lens) = {int(self.lens.sum())} entries"
            )
        self._starts: np.ndarray | None = None

    @classmethod
    def trusted(cls, slots, ctx_lens, lens, tokens, parents, sampling=None) -> SegmentBatch:
        """A batch built without the constructor's checks, for a caller whose arrays are
        consistent by construction (the scheduler, every iteration): i64 slots and lens, i32
        tokens and parents of `sum(lens)` entries, one ctx_len and sampling per segment.
        tests/scheduler/test_host_path.py checks it equals the checked construction."""
        self = object.__new__(cls)
        self.slots = np.asarray(slots, np.int64)
        self.ctx_lens = np.asarray(ctx_lens, np.int64)
        self.lens = lens
        self.tokens = tokens
        self.parents = parents
        self.sampling = (GREEDY,) * len(lens) if sampling is None else tuple(sampling)
        self._starts = None
        return self

    @classmethod
    def of(cls, segments: Sequence[Segment]) -> SegmentBatch:
        """`segments` itself if it is a batch, else its segments copied into one."""
        if isinstance(segments, SegmentBatch):
            return segments
        n = len(segments)
        if n == 0:
            return cls(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), ())
        for i, s in enumerate(segments):
            if np.shape(s.parents) != np.shape(s.tokens):
                raise ValueError(
                    f"segment {i}: parents shape {np.shape(s.parents)} != tokens shape "
                    f"{np.shape(s.tokens)}"
                )
        return cls(
            [s.slot for s in segments],
            [s.ctx_len for s in segments],
            [len(s) for s in segments],
            np.concatenate([np.asarray(s.tokens, np.int32).reshape(-1) for s in segments]),
            np.concatenate([np.asarray(s.parents, np.int32).reshape(-1) for s in segments]),
            [s.sampling for s in segments],
        )

    @property
    def starts(self) -> np.ndarray:
        """i64[n]: where each segment's tokens start in `tokens`."""
        if self._starts is None:
            self._starts = np.cumsum(self.lens) - self.lens
        return self._starts

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return int(self.slots.shape[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"segment {i} of {n}")
        i %= n
        a = int(self.starts[i])
        b = a + int(self.lens[i])
        return Segment(int(self.slots[i]), int(self.ctx_lens[i]), self.tokens[a:b],
                       self.parents[a:b], self.sampling[i])  # fmt: skip

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __add__(self, other: Sequence[Segment]) -> SegmentBatch:
        if not len(other):
            return self
        other = SegmentBatch.of(other)
        if not len(self):
            return other
        return SegmentBatch(
            np.concatenate([self.slots, other.slots]),
            np.concatenate([self.ctx_lens, other.ctx_lens]),
            np.concatenate([self.lens, other.lens]),
            np.concatenate([self.tokens, other.tokens]),
            np.concatenate([self.parents, other.parents]),
            self.sampling + other.sampling,
        )

    def __radd__(self, other: Sequence[Segment]) -> SegmentBatch:
        return SegmentBatch.of(other) + self

    def chains(self) -> np.ndarray:
        """bool[n]: segment i is a chain (node j's parent is j - 1)."""
        seg_of, local, _ = ragged_index(self.lens)
        off_chain = seg_of[self.parents != local - 1]
        return np.bincount(off_chain, minlength=len(self)) == 0


def validate_segments(
    segments: Sequence[Segment], vocab_size: int, num_slots: int, max_len: int
) -> None:
    """`Segment.validate` for a whole batch at once (vectorized); on any violation the
    per-segment check runs to raise its message naming the segment's problem."""
    if not len(segments):
        return
    try:
        b = SegmentBatch.of(segments)
        lens, slots, ctx, tokens = b.lens, b.slots, b.ctx_lens, b.tokens
        ok = (
            lens.min() > 0
            and slots.min() >= 0
            and slots.max() < num_slots
            and ctx.min() >= 0
            and (ctx + lens).max() <= max_len
            and tokens.min() >= 0
            and tokens.max() < vocab_size
        )
        if ok:
            _, local, _ = ragged_index(lens)
            ok = bool(np.all((b.parents >= -1) & (b.parents < local)))
    except (ValueError, TypeError, AttributeError):
        ok = False
    if not ok:
        for seg in segments:
            seg.validate(vocab_size, num_slots, max_len)


@dataclasses.dataclass(frozen=True, slots=True)
class Move:
    """Copy KV row `src` to `dst` within `slot` (compaction of an accepted path)."""

    slot: int
    src: int
    dst: int


@dataclasses.dataclass(frozen=True, slots=True)
class FlatBatch:
    """Padded device inputs (numpy) plus where each segment's tokens sit."""

    arrays: dict
    num_tokens: int
    attended_len: int
    offsets: tuple[int, ...]  # segment i occupies rows offsets[i] : offsets[i] + len(segment i)

    @property
    def bucket(self) -> int:
        return int(self.arrays["tokens"].shape[0])

    @classmethod
    def build(
        cls,
        segments: Sequence[Segment],
        token_buckets: Sequence[int],
        ctx_buckets: Sequence[int],
        moves: Sequence[Move] = (),
        max_moves: int = 0,
    ) -> FlatBatch:
        b = SegmentBatch.of(segments)
        total = b.num_tokens
        t = next((x for x in token_buckets if x >= total), None)
        if t is None:
            raise ValueError(f"{total} tokens exceed the largest token bucket {max(token_buckets)}")
        max_ctx = int(b.ctx_lens.max()) if len(b) else 0
        ctx = next((c for c in ctx_buckets if c >= max_ctx), None)
        if ctx is None:
            raise ValueError(
                f"context {max_ctx} exceeds the largest context bucket {max(ctx_buckets)}"
            )
        if len(moves) > max_moves:
            raise ValueError(f"{len(moves)} KV moves exceed the move buffer of {max_moves}")
        a = {
            "tokens": np.zeros(t, np.int32),
            "slot": np.full(t, -1, np.int32),
            "position": np.zeros(t, np.int32),
            "cache_index": np.zeros(t, np.int32),
            "ctx_len": np.zeros(t, np.int32),
            "tree_mask": np.eye(t, dtype=bool),
            "temperature": np.zeros(t, np.float32),
            "top_k": np.zeros(t, np.int32),
            "top_p": np.ones(t, np.float32),
            "seed": np.zeros(t, np.uint32),
            "move_slot": np.full(max_moves, -1, np.int32),
            "move_src": np.zeros(max_moves, np.int32),
            "move_dst": np.zeros(max_moves, np.int32),
        }
        offsets: tuple[int, ...] = ()
        if len(b):
            seg_of, local, starts = ragged_index(b.lens)  # each token's segment and node index
            offsets = tuple(starts.tolist())
            ctx_len = b.ctx_lens[seg_of]
            depth = local.copy()  # chains; trees below
            mask = (seg_of[:, None] == seg_of[None, :]) & (local[None, :] <= local[:, None])
            for i in np.flatnonzero(~b.chains()).tolist():
                seg = b[i]
                sl = slice(offsets[i], offsets[i] + len(seg))
                depth[sl] = seg.depths()
                mask[sl, sl] = seg.ancestor_mask()
            a["tokens"][:total] = b.tokens
            a["slot"][:total] = b.slots[seg_of]
            a["position"][:total] = ctx_len + depth
            a["cache_index"][:total] = ctx_len + local
            a["ctx_len"][:total] = ctx_len
            a["tree_mask"][:total, :total] = mask
            for key in ("temperature", "top_k", "top_p", "seed"):  # SamplingParams fields
                values = [getattr(sp, key) for sp in b.sampling]
                a[key][:total] = np.asarray(values, a[key].dtype)[seg_of]
        for i, m in enumerate(moves):
            a["move_slot"][i], a["move_src"][i], a["move_dst"][i] = m.slot, m.src, m.dst
        return cls(a, total, ctx, tuple(offsets))

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


def validate_segments(
    segments: Sequence[Segment], vocab_size: int, num_slots: int, max_len: int
) -> None:
    """`Segment.validate` for a whole batch at once (vectorized); on any violation the
    per-segment check runs to raise its message naming the segment's problem."""
    if not segments:
        return
    try:
        lens = np.fromiter((len(s) for s in segments), np.int64, len(segments))
        slots = np.fromiter((s.slot for s in segments), np.int64, len(segments))
        ctx = np.fromiter((s.ctx_len for s in segments), np.int64, len(segments))
        tokens = np.concatenate([s.tokens for s in segments])
        parents = np.concatenate([s.parents for s in segments])
        ok = (
            lens.min() > 0
            and all(s.parents.shape == s.tokens.shape for s in segments)
            and slots.min() >= 0
            and slots.max() < num_slots
            and ctx.min() >= 0
            and (ctx + lens).max() <= max_len
            and tokens.min() >= 0
            and tokens.max() < vocab_size
        )
        if ok:
            _, local, _ = ragged_index(lens)
            ok = bool(np.all((parents >= -1) & (parents < local)))
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
        total = sum(len(s) for s in segments)
        t = next((b for b in token_buckets if b >= total), None)
        if t is None:
            raise ValueError(f"{total} tokens exceed the largest token bucket {max(token_buckets)}")
        max_ctx = max((s.ctx_len for s in segments), default=0)
        ctx = next((b for b in ctx_buckets if b >= max_ctx), None)
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
        if segments:
            lens = np.fromiter((len(s) for s in segments), np.int64, len(segments))
            seg_of, local, starts = ragged_index(lens)  # each token's segment and node index
            offsets = tuple(starts.tolist())
            ctx_len = np.fromiter((s.ctx_len for s in segments), np.int64, len(segments))[seg_of]
            depth = local.copy()  # chains; trees below
            mask = (seg_of[:, None] == seg_of[None, :]) & (local[None, :] <= local[:, None])
            for s, o in zip(segments, offsets, strict=True):
                if not s.is_chain():
                    sl = slice(o, o + len(s))
                    depth[sl] = s.depths()
                    mask[sl, sl] = s.ancestor_mask()
            a["tokens"][:total] = np.concatenate([s.tokens for s in segments])
            a["slot"][:total] = np.fromiter((s.slot for s in segments), np.int32)[seg_of]
            a["position"][:total] = ctx_len + depth
            a["cache_index"][:total] = ctx_len + local
            a["ctx_len"][:total] = ctx_len
            a["tree_mask"][:total, :total] = mask
            for key in ("temperature", "top_k", "top_p", "seed"):  # SamplingParams fields
                values = [getattr(s.sampling, key) for s in segments]
                a[key][:total] = np.asarray(values, a[key].dtype)[seg_of]
        for i, m in enumerate(moves):
            a["move_slot"][i], a["move_src"][i], a["move_dst"][i] = m.slot, m.src, m.dst
        return cls(a, total, ctx, tuple(offsets))

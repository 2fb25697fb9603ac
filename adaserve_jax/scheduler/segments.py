"""Engine segments and KV moves for many requests at once, cut from flat arrays (numpy only).

The engine protocol takes a sequence of segments (one per request) and one `Move` per
compacted KV row. The scheduler builds every request's tokens and parents of an iteration as
one flat array and hands the engine a `SegmentBatch` of them (engine/batch.py), instead of a
`Segment` object per request (building those was a large part of the host time per request at
64-96 running requests, SIMULATION.md).

`Move` is a frozen, slotted dataclass, whose generated `__init__` pays one
`object.__setattr__` call per field. `_setters` writes the slots directly instead; it is used
only while the class has exactly the expected fields and no `__post_init__` (otherwise the
ordinary constructor runs), and the objects are the same either way
(tests/scheduler/test_host_path.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from adaserve_jax.engine.batch import Move, SamplingParams, Segment, SegmentBatch


def _setters(cls: type, names: tuple[str, ...]) -> tuple | None:
    """The slot setters of `cls` when it is a slotted dataclass with exactly the fields `names`
    and no `__post_init__`; None otherwise."""
    if (
        not dataclasses.is_dataclass(cls)
        or tuple(f.name for f in dataclasses.fields(cls)) != names
        or hasattr(cls, "__post_init__")
        or "__slots__" not in vars(cls)
    ):
        return None
    return tuple(getattr(cls, name).__set__ for name in names)


_MOVE = _setters(Move, ("slot", "src", "dst"))


def segments(
    slots: Sequence[int] | np.ndarray,
    ctx_lens: Sequence[int] | np.ndarray,
    tokens: np.ndarray,
    parents: np.ndarray | None,
    ends: Sequence[int] | np.ndarray,
    sampling: Sequence[SamplingParams] | None = None,
) -> SegmentBatch:
    """The batch of `Segment(slots[i], ctx_lens[i], tokens[a:b], parents[a:b], sampling[i])`
    for every i, with a, b = ends[i - 1], ends[i] (ends[-1] = 0). parents None: every segment
    is a chain (`Segment.chain`); sampling None: greedy."""
    ends = np.asarray(ends, np.int64)
    lens = ends.copy()
    lens[1:] -= ends[:-1]
    total = int(ends[-1]) if ends.size else 0
    tokens = np.asarray(tokens, np.int32)
    if parents is None and total == ends.size:  # one token each (plain decoding): all roots
        lens, parents = roots(total)
    elif parents is None:
        parents = np.arange(total, dtype=np.int32) - 1
        parents -= np.repeat(ends - lens, lens).astype(np.int32)  # node j's parent: j - 1
    else:
        parents = np.asarray(parents, np.int32)
    if tokens.shape != (total,) or parents.shape != (total,) or len(ctx_lens) != ends.size:
        raise ValueError(
            f"{ends.size} segments ending at {total} need as many tokens and parents "
            f"({tokens.shape}, {parents.shape}) and ctx_lens ({len(ctx_lens)})"
        )
    return SegmentBatch.trusted(slots, ctx_lens, lens, tokens, parents, sampling)


@functools.lru_cache(maxsize=64)
def roots(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (lens i64[n] of ones, parents i32[n] of -1): n one-token segments, as plain
    decoding sends them every iteration (cached: the same few sizes repeat)."""
    lens, parents = np.ones(n, np.int64), np.full(n, -1, np.int32)
    lens.flags.writeable = parents.flags.writeable = False
    return lens, parents


def moves(slots: Sequence[int], src: Sequence[int], dst: Sequence[int]) -> list[Move]:
    """`Move(slots[i], src[i], dst[i])` for every i."""
    if _MOVE is None:  # pragma: no cover - Move changed shape: the plain constructor
        return list(map(Move, slots, src, dst))
    new = object.__new__
    set_slot, set_src, set_dst = _MOVE
    out = []
    append = out.append
    for slot, a, b in zip(slots, src, dst, strict=True):
        m = new(Move)
        set_slot(m, slot)
        set_src(m, a)
        set_dst(m, b)
        append(m)
    return out


def chain_segments(plan: Sequence[tuple]) -> list[Segment]:
    """The chain of each planned request's tokens in [start, stop): `plan` holds
    (RequestState, start, stop); the segment writes cache rows start.. of its slot."""
    return [
        Segment.chain(r.slot, a, r.tokens_between(a, b), r.request.sampling) for r, a, b in plan
    ]

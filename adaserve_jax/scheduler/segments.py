"""Engine segments and KV moves for many requests at once, cut from flat arrays (numpy only).

The engine protocol takes one `Segment` per request and one `Move` per compacted KV row. The
scheduler builds every request's tokens and parents of an iteration as one flat array and hands
each segment a view of its slice, instead of building small arrays request by request (that was
most of the host time per request at 64-96 running requests, SIMULATION.md).

Both classes are frozen, slotted dataclasses, whose generated `__init__` pays one
`object.__setattr__` call per field (~1 us a segment, 2 x 96 segments an iteration at paper
scale). `_setters` writes the slots directly instead; it is used only while a class has exactly
the expected fields and no `__post_init__` (otherwise the ordinary constructor runs), and the
objects are the same either way (tests/scheduler/test_host_path.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from adaserve_jax.engine.batch import GREEDY, Move, SamplingParams, Segment

_chain = np.arange(-1, 63, dtype=np.int32)
_chain.flags.writeable = False


def chain_parents(n: int) -> np.ndarray:
    """Read-only i32[n] `[-1, 0, 1, ..., n - 2]`: the parents of an n-token chain (a view of
    one shared array, as `Segment.chain` would build it)."""
    global _chain
    if n > _chain.size:
        _chain = np.arange(-1, 2 * n - 1, dtype=np.int32)
        _chain.flags.writeable = False
    return _chain[:n]


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


_SEGMENT = _setters(Segment, ("slot", "ctx_len", "tokens", "parents", "sampling"))
_MOVE = _setters(Move, ("slot", "src", "dst"))


def segments(
    slots: Sequence[int],
    ctx_lens: Sequence[int],
    tokens: np.ndarray,
    parents: np.ndarray | None,
    ends: Sequence[int],
    sampling: Sequence[SamplingParams] | None = None,
) -> list[Segment]:
    """`Segment(slots[i], ctx_lens[i], tokens[a:b], parents[a:b], sampling[i])` for every i,
    with a, b = ends[i - 1], ends[i] (ints; ends[-1] = 0). parents None: every segment is a
    chain (`Segment.chain`); sampling None: greedy."""
    if sampling is None:
        sampling = [GREEDY] * len(slots)
    if parents is None:
        chain = chain_parents(ends[-1] if len(ends) else 1)  # long enough for any segment
    out: list[Segment] = []
    append = out.append
    a = 0
    if _SEGMENT is None:  # pragma: no cover - Segment changed shape: the plain constructor
        for slot, ctx, b, sp in zip(slots, ctx_lens, ends, sampling, strict=True):
            par = chain[: b - a] if parents is None else parents[a:b]
            append(Segment(slot, ctx, tokens[a:b], par, sp))
            a = b
        return out
    new = object.__new__
    set_slot, set_ctx, set_tokens, set_parents, set_sampling = _SEGMENT
    for slot, ctx, b, sp in zip(slots, ctx_lens, ends, sampling, strict=True):
        seg = new(Segment)
        set_slot(seg, slot)
        set_ctx(seg, ctx)
        set_tokens(seg, tokens[a:b])
        set_parents(seg, chain[: b - a] if parents is None else parents[a:b])
        set_sampling(seg, sp)
        append(seg)
        a = b
    return out


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

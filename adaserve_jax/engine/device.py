"""One model on device: params, donated KV caches and its compiled flat-token steps.

`DeviceModel.run` is the public host method: it builds the padded `FlatBatch`
in numpy, calls the private jitted step, and returns numpy. Every (head, token
bucket, context bucket) variant is compiled by `warmup()` at start-up, so the
serving loop never traces (`compile_count()` lets a test check that).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial

import jax
import numpy as np

from adaserve_jax.engine.batch import FlatBatch, Move, Segment, validate_segments
from adaserve_jax.engine.mesh import place_batch, place_caches, place_params, shard_attention
from adaserve_jax.engine.mesh import validate_model as validate_mesh
from adaserve_jax.model.loader import Model
from adaserve_jax.steps.compile_cache import enable_compile_cache
from adaserve_jax.steps.flat_step import HEADS, build_step, init_caches

log = logging.getLogger(__name__)

ATTENTION_IMPLS = ("xla", "pallas", "pallas_interpret")
DEFAULT_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_CTX_BUCKETS = (256, 1024, 4096)


def attention_function(impl: str):
    """The tree-attention implementation behind `attention_impl`."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} must be one of {ATTENTION_IMPLS}")
    if impl == "xla":
        try:
            from pallas_kernels.tree_attention import tree_attention_reference
        except ImportError:  # until the kernel module lands
            from adaserve_jax.steps.xla_attention import (
                tree_attention_xla as tree_attention_reference,
            )
        return tree_attention_reference
    from pallas_kernels import tree_attention as ta

    return partial(ta.tree_attention, interpret=impl == "pallas_interpret")


class DeviceModel:
    def __init__(
        self,
        model: Model,
        *,
        num_slots: int,
        max_len: int,
        attention_impl: str = "xla",
        token_buckets: Sequence[int] = DEFAULT_TOKEN_BUCKETS,
        ctx_buckets: Sequence[int] | None = None,
        max_moves: int | None = None,
        heads: Sequence[str] = ("sample",),
        topk: int = 8,
        mesh: jax.sharding.Mesh | None = None,
    ) -> None:
        """`mesh`: a tensor-parallel mesh (`engine/mesh.py`); None = one device."""
        validate_mesh(model.config, mesh)
        if max_len > model.config.max_seq_len:
            raise ValueError(
                f"{max_len=} exceeds the model's max_seq_len={model.config.max_seq_len}"
            )
        for h in heads:
            if h not in HEADS:
                raise ValueError(f"head {h!r} must be one of {HEADS}")
        self.model = model
        self.config = model.config
        self.num_slots = num_slots
        self.max_len = max_len
        self.attention_impl = attention_impl
        self.token_buckets = tuple(sorted(token_buckets))
        buckets = ctx_buckets or DEFAULT_CTX_BUCKETS
        self.ctx_buckets = tuple(sorted({min(b, max_len) for b in buckets} | {max_len}))
        self.max_moves = max_moves if max_moves is not None else 16 * num_slots
        self.heads = tuple(heads)
        enable_compile_cache()
        self.mesh = mesh
        attention = shard_attention(attention_function(attention_impl), mesh)
        self._step = build_step(model.config, attention, topk=topk)
        self._params = place_params(model.params, model.config, mesh)
        self._caches = place_caches(init_caches, model.config, num_slots, max_len, mesh)
        self.mirror = None  # multi-host: publishes each call to the other processes (mesh.py)

    def compile_count(self) -> int:
        """Number of compiled variants of the step (grows only when something retraces)."""
        return self._step._cache_size()

    def variants(self) -> list[tuple[str, int, int]]:
        return [(h, t, c) for h in self.heads for t in self.token_buckets for c in self.ctx_buckets]

    def warmup(self, progress: bool = True) -> float:
        """Compile every (head, token bucket, context bucket); returns seconds spent."""
        from tqdm import tqdm

        start = time.perf_counter()
        variants = self.variants()
        bar = tqdm(
            variants, desc=f"compile {self.config.num_layers}-layer model", disable=not progress
        )
        for head, t, ctx in bar:
            batch = FlatBatch.build([], (t,), (ctx,), max_moves=self.max_moves)
            self._call(batch, head)
        jax.block_until_ready(self._caches)
        seconds = time.perf_counter() - start
        log.info("compiled %d step variants in %.1f s", len(variants), seconds)
        return seconds

    def build(self, segments: Sequence[Segment], moves: Sequence[Move] = ()) -> FlatBatch:
        validate_segments(segments, self.config.vocab_size, self.num_slots, self.max_len)
        for m in moves:
            if not (0 <= m.slot < self.num_slots and 0 <= m.dst <= m.src < self.max_len):
                raise ValueError(f"invalid KV move {m}")
        return FlatBatch.build(
            segments, self.token_buckets, self.ctx_buckets, moves, self.max_moves
        )

    def run(self, segments: Sequence[Segment], *, head: str = "sample", moves: Sequence[Move] = ()):
        """Run one step; returns numpy outputs for the real (unpadded) tokens."""
        if head not in self.heads:
            raise ValueError(f"head {head!r} was not compiled (have {self.heads})")
        batch = self.build(segments, moves)
        out = self._call(batch, head)
        n = batch.num_tokens
        if isinstance(out, tuple):
            return tuple(np.asarray(x)[:n] for x in out), batch
        return np.asarray(out)[:n], batch

    def _call(self, batch: FlatBatch, head: str):
        if self.mirror is not None:
            self.mirror(head, batch)
        arrays = place_batch(batch.arrays, self.mesh)
        out, self._caches = self._step(
            self._params, self._caches, arrays, head=head, attended_len=batch.attended_len
        )
        return out

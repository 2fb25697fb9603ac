"""Host side of speculation: draft steps, tree expansion, and the acceptance walk.

`DraftDevice` owns the draft model on device: a flat step with the "topk_last" head
(catch-up tokens + roots + prefill chunks; the LM head runs only at each slot's last
token, the root) and the compiled tree expansion. The expansion runs over the decoding
slots only, padded to a row bucket (`expand_row_buckets`: 1, 4, 16, ... and the slot count),
so a lone request does not pay for growing trees in every idle slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adaserve_jax.engine.batch import Segment, SegmentBatch
from adaserve_jax.engine.device import DeviceModel, attention_function
from adaserve_jax.engine.mesh import shard_attention
from adaserve_jax.engine.tree import DraftTrees, TreeShape, layout_ranks, tree_depths
from adaserve_jax.model.loader import Model
from adaserve_jax.steps.expand import build_expand


def expand_row_buckets(num_slots: int) -> tuple[int, ...]:
    """Rows an expansion call is compiled for: powers of 4 below `num_slots`, and it."""
    rows, r = [], 1
    while r < num_slots:
        rows.append(r)
        r *= 4
    return (*rows, num_slots)


class DraftDevice:
    def __init__(
        self,
        draft: Model,
        *,
        num_slots: int,
        max_len: int,
        shapes: Sequence[TreeShape],
        **device_kwargs,
    ) -> None:
        self.topk = max([8, *(s.topk for s in shapes)])
        self.device = DeviceModel(
            draft,
            num_slots=num_slots,
            max_len=max_len,
            heads=("topk_last",),
            topk=self.topk,
            **device_kwargs,
        )
        self.shapes = tuple(shapes)
        self.row_buckets = expand_row_buckets(num_slots)
        impl = device_kwargs.get("attention_impl", "xla")
        # the XLA path keeps the fused einsum attention; the Pallas paths use the kernel (per
        # device shard under a mesh, as the flat step does)
        kernel = None
        if impl != "xla":
            kernel = shard_attention(attention_function(impl), device_kwargs.get("mesh"))
        self._expand = build_expand(draft.config, kernel)
        self.mirror = None  # multi-host: publishes each expansion to the other processes

    @property
    def ctx_buckets(self) -> tuple[int, ...]:
        return self.device.ctx_buckets

    def warmup(self, progress: bool = True) -> None:
        from tqdm import tqdm

        self.device.warmup(progress)
        combos = [
            (sh, c, r)
            for sh in self.shapes
            if sh.depth > 1
            for c in self.ctx_buckets
            for r in self.row_buckets
        ]
        for shape, ctx, r in tqdm(combos, desc="compile draft expansion", disable=not progress):
            self._call_expand(
                np.zeros((r, shape.topk), np.float32),
                np.zeros((r, shape.topk), np.int32),
                np.zeros(r, np.int32),
                np.full(r, -1, np.int32),  # no row decoding: nothing written
                shape,
                ctx,
            )

    def compile_count(self) -> int:
        return self.device.compile_count() + self._expand._cache_size()

    def step(self, segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        """Draft flat step: returns top-k (log-probs f32[n,k], tokens i32[n,k]) and offsets.

        Only each segment's last token gets its top-k (the root of the next tree); the other
        rows are zeros (their K/V is all the draft needs of them)."""
        segments = SegmentBatch.of(segments)
        batch = self.device.build(segments)
        vals_s, idx_s = (np.asarray(x) for x in self.device._call(batch, "topk_last"))
        n = batch.num_tokens
        vals = np.zeros((n, vals_s.shape[1]), np.float32)
        idx = np.zeros((n, idx_s.shape[1]), np.int32)
        last = segments.starts + segments.lens - 1  # each segment's last token
        vals[last] = vals_s[segments.slots]
        idx[last] = idx_s[segments.slots]
        return vals, idx, batch.offsets

    def expand(
        self, root_vals: np.ndarray, root_toks: np.ndarray, root_pos: np.ndarray, shape: TreeShape
    ) -> DraftTrees:
        """Grow trees for the decoding slots (row s = slot s). root_* [S, topk], root_pos
        i32[S] (-1 for slots not decoding, whose rows hold a placeholder tree). The returned
        trees' `in_cache` marks the nodes whose K/V the draft cache already holds at their
        row (`steps/expand.py`)."""
        k = shape.topk
        vals = np.asarray(root_vals[:, :k], np.float32)
        toks = np.asarray(root_toks[:, :k], np.int32)
        if shape.depth == 1:
            s = vals.shape[0]
            tokens = np.concatenate([np.zeros((s, 1), np.int32), toks], 1)
            parents = np.concatenate([np.full((s, 1), -1, np.int32), np.zeros((s, k), np.int32)], 1)
            log_f = np.concatenate([np.zeros((s, 1), np.float32), vals], 1)
            rank = layout_ranks(1 + k, k)
            return DraftTrees(tokens, parents, log_f, tree_depths(parents), None, rank)
        root_pos = np.asarray(root_pos, np.int32)
        need = int(root_pos.max()) + 1
        ctx = next((c for c in self.ctx_buckets if c >= need), None)
        if ctx is None:
            raise ValueError(f"context {need} exceeds the draft's context buckets")
        active = np.flatnonzero(root_pos >= 0)
        n = active.size
        r = next(b for b in self.row_buckets if b >= max(n, 1))
        slots = np.zeros(r, np.int32)  # padding rows: slot 0, root_pos -1 (write nothing)
        slots[:n] = active
        pos = np.full(r, -1, np.int32)
        pos[:n] = root_pos[active]
        rows_vals = np.zeros((r, k), np.float32)
        rows_vals[:n] = vals[active]
        rows_toks = np.zeros((r, k), np.int32)
        rows_toks[:n] = toks[active]
        trees = self._call_expand(rows_vals, rows_toks, slots, pos, shape, ctx)
        out = [np.asarray(x) for x in trees]
        # back to one row per slot; idle slots get the first row's (placeholder) tree
        full = [np.repeat(x[:1], vals.shape[0], axis=0) for x in out]
        for f, x in zip(full, out, strict=True):
            f[active] = x[:n]
        tokens, parents, log_f, in_cache = full
        in_cache[root_pos < 0] = False
        rank = layout_ranks(parents.shape[1], k)
        return DraftTrees(tokens, parents, log_f, tree_depths(parents), in_cache, rank)

    def _call_expand(self, vals, toks, slots, root_pos, shape: TreeShape, ctx: int):
        if self.mirror is not None:
            self.mirror(vals, toks, slots, root_pos, shape, ctx)
        trees, self.device._caches = self._expand(
            self.device._params,
            self.device._caches,
            vals,
            toks,
            np.asarray(slots, np.int32),
            np.asarray(root_pos, np.int32),
            depth=shape.depth,
            width=shape.width,
            attended_len=ctx,
        )
        return trees

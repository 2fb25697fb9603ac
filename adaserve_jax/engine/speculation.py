"""Host side of speculation: draft steps, tree expansion, and the acceptance walk.

`DraftDevice` owns the draft model on device: a flat step with the "topk_last" head
(catch-up tokens + roots + prefill chunks; the LM head runs only at each slot's last
token, the root) and the compiled tree expansion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adaserve_jax.engine.batch import Segment
from adaserve_jax.engine.device import DeviceModel, attention_function
from adaserve_jax.engine.mesh import shard_attention
from adaserve_jax.engine.tree import DraftTrees, TreeShape, tree_depths
from adaserve_jax.model.loader import Model
from adaserve_jax.steps.expand import build_expand


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
        s = self.device.num_slots
        combos = [(sh, c) for sh in self.shapes if sh.depth > 1 for c in self.ctx_buckets]
        for shape, ctx in tqdm(combos, desc="compile draft expansion", disable=not progress):
            self._call_expand(
                np.zeros((s, shape.topk), np.float32),
                np.zeros((s, shape.topk), np.int32),
                np.full(s, -1, np.int32),  # no slot decoding: nothing written
                shape,
                ctx,
            )

    def compile_count(self) -> int:
        return self.device.compile_count() + self._expand._cache_size()

    def step(self, segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        """Draft flat step: returns top-k (log-probs f32[n,k], tokens i32[n,k]) and offsets.

        Only each segment's last token gets its top-k (the root of the next tree); the other
        rows are zeros (their K/V is all the draft needs of them)."""
        batch = self.device.build(segments)
        vals_s, idx_s = (np.asarray(x) for x in self.device._call(batch, "topk_last"))
        n = batch.num_tokens
        vals = np.zeros((n, vals_s.shape[1]), np.float32)
        idx = np.zeros((n, idx_s.shape[1]), np.int32)
        for seg, off in zip(segments, batch.offsets, strict=True):
            vals[off + len(seg) - 1] = vals_s[seg.slot]
            idx[off + len(seg) - 1] = idx_s[seg.slot]
        return vals, idx, batch.offsets

    def expand(
        self, root_vals: np.ndarray, root_toks: np.ndarray, root_pos: np.ndarray, shape: TreeShape
    ) -> DraftTrees:
        """Grow trees for every slot (row s = slot s). root_* [S, topk], root_pos i32[S]
        (-1 for slots not decoding). The returned trees' `in_cache` marks the nodes whose
        K/V the draft cache already holds at their row (`steps/expand.py`)."""
        k = shape.topk
        vals = np.asarray(root_vals[:, :k], np.float32)
        toks = np.asarray(root_toks[:, :k], np.int32)
        if shape.depth == 1:
            s = vals.shape[0]
            tokens = np.concatenate([np.zeros((s, 1), np.int32), toks], 1)
            parents = np.concatenate([np.full((s, 1), -1, np.int32), np.zeros((s, k), np.int32)], 1)
            log_f = np.concatenate([np.zeros((s, 1), np.float32), vals], 1)
            in_cache = None
        else:
            need = int(root_pos.max()) + 1
            ctx = next((c for c in self.ctx_buckets if c >= need), None)
            if ctx is None:
                raise ValueError(f"context {need} exceeds the draft's context buckets")
            tokens, parents, log_f, in_cache = (
                np.asarray(x) for x in self._call_expand(vals, toks, root_pos, shape, ctx)
            )
        return DraftTrees(tokens, parents, log_f, tree_depths(parents), in_cache)

    def _call_expand(self, vals, toks, root_pos, shape: TreeShape, ctx: int):
        if self.mirror is not None:
            self.mirror(vals, toks, root_pos, shape, ctx)
        s = vals.shape[0]
        trees, self.device._caches = self._expand(
            self.device._params,
            self.device._caches,
            vals,
            toks,
            np.arange(s, dtype=np.int32),
            np.asarray(root_pos, np.int32),
            depth=shape.depth,
            width=shape.width,
            attended_len=ctx,
        )
        return trees

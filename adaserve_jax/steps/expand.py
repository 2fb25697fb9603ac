"""Draft tree expansion: `d - 1` beam-style draft steps inside one compiled call.

The roots' top-k children come from a normal flat step on the draft (head
"topk"), which also writes the roots (and any catch-up tokens) to the draft KV
cache. This call then grows every request's tree breadth-first: at each depth
it keeps the top-`w` candidates by path log-probability `log f` as the frontier,
runs the draft on them, and adds each frontier node's top-`k` children as the
next depth's candidates. Tree nodes' K/V live in a per-call buffer; in addition
the best frontier node of each depth j (the top-1 by log f) is written to the
draft cache at row `root_pos + j`, the row it takes if the target accepts the
path through it. The call reports those nodes (`in_cache`), so after
verification the host can skip the draft's catch-up for an accepted prefix of
them. Rows past the committed context are never attended to, so a rejected
node's row is simply overwritten later. Rows with `root_pos < 0` (slots not
decoding) write nothing.

Tree layout per request (N = 1 + k + (d - 1) * w * k nodes):
    node 0            the root (its token is filled in by the host)
    nodes 1 .. k      depth-1 candidates (children of the root)
    then per depth j = 2..d: w * k candidates, children of depth j-1's frontier
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from adaserve_jax.model.config import ModelConfig
from adaserve_jax.model.llama import Transformer


def _expansion_attention(q, k, v, kc, vc, kbuf, vbuf, slot, ctx_len, anc, attended_len):
    """q [R,W,H,D], k/v [R,W,K,D] (already in kbuf/vbuf), cache [S,L,K,D], buf [R,Bn,K,D]."""
    r, w, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qg = q.reshape(r, w, kvh, g, d) / jnp.sqrt(jnp.float32(d))  # [R, W, K, G, D]
    kctx = jnp.take(kc[:, :attended_len], slot, axis=0)  # [R, L, K, D]
    vctx = jnp.take(vc[:, :attended_len], slot, axis=0)
    s_ctx = jnp.einsum("RWKGD,RLKD->RWKGL", qg, kctx)
    ctx_ok = jnp.arange(attended_len)[None, :] < ctx_len[:, None]  # [R, L]
    s_ctx = jnp.where(ctx_ok[:, None, None, None, :], s_ctx, -jnp.inf)
    s_buf = jnp.einsum("RWKGD,RBKD->RWKGB", qg, kbuf)
    s_buf = jnp.where(anc[:, :, None, None, :], s_buf, -jnp.inf)  # anc bool[R, W, Bn]
    probs = jax.nn.softmax(jnp.concatenate([s_ctx, s_buf], axis=-1), axis=-1)
    out = jnp.einsum("RWKGL,RLKD->RWKGD", probs[..., :attended_len], vctx) + jnp.einsum(
        "RWKGB,RBKD->RWKGD", probs[..., attended_len:], vbuf
    )
    return out.reshape(r, w, h, d)


def _kernel_expansion_attention(
    attention, q, kc, vc, kbuf, vbuf, slot, ctx_len, anc, base, attended_len
):
    """The same attention through a tree-attention kernel with the flat contract of
    `pallas_kernels.tree_attention` (q, new K/V and the tree mask over one flat token axis).

    The flat batch is every request's whole buffer (R * Bn tokens, new K/V = the buffer): the
    frontier's queries sit at their buffer columns `base .. base + W` and see their ancestors
    (`anc`); every other row is a placeholder query (zeros) that sees only itself and is dropped.
    """
    r, w, h, d = q.shape
    nbuf, kvh = kbuf.shape[1], kbuf.shape[2]
    t = r * nbuf
    q_full = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((r, nbuf, h, d), q.dtype), q, base, 1)
    eye = jnp.eye(nbuf, dtype=bool)
    own = jnp.broadcast_to(eye, (r, nbuf, nbuf))
    mask = jax.lax.dynamic_update_slice_in_dim(own, anc, base, axis=1)  # [R, Bn, Bn]
    same = jnp.eye(r, dtype=bool)[:, None, :, None]  # block diagonal over requests
    tree_mask = (same & mask[:, :, None, :]).reshape(t, t)
    out = attention(
        q_full.reshape(t, h, d),
        kc,
        vc,
        kbuf.reshape(t, kvh, d),
        vbuf.reshape(t, kvh, d),
        jnp.repeat(slot, nbuf),
        jnp.repeat(ctx_len, nbuf),
        tree_mask,
        attended_len=attended_len,
    )
    return jax.lax.dynamic_slice_in_dim(out.reshape(r, nbuf, h, d), base, w, axis=1)


def build_expand(cfg: ModelConfig, attention=None):
    """expand(params, caches, root_vals f32[R,k], root_toks i32[R,k], slot i32[R],
    root_pos i32[R], *, depth, width, attended_len)
    -> ((tokens, parents, log_f, in_cache) [R, N], caches); caches are donated.

    attention: None for the fused einsum attention (the XLA path), or a tree-attention
    function with the flat kernel contract (`pallas_kernels.tree_attention`), e.g. the Pallas
    kernel, which then computes every expansion step's attention too."""
    model = Transformer(cfg)

    @functools.partial(
        jax.jit, static_argnames=("depth", "width", "attended_len"), donate_argnums=(1,)
    )
    def expand(params, caches, root_vals, root_toks, slot, root_pos, *, depth, width, attended_len):
        r, k = root_vals.shape
        s_count = caches[0][0].shape[0]
        slot = jnp.clip(slot, 0, s_count - 1)
        write_slot = jnp.where(root_pos >= 0, slot, s_count)  # out of range: dropped
        root_pos = jnp.maximum(root_pos, 0)
        nbuf = max((depth - 1) * width, 1)
        buf_shape = (r, nbuf, cfg.num_kv_heads, cfg.head_dim)
        bufs = [(jnp.zeros(buf_shape), jnp.zeros(buf_shape)) for _ in range(cfg.num_layers)]
        rows = jnp.arange(r)[:, None]
        ctx_len = root_pos + 1  # the root's own row is committed by the preceding flat step

        tokens = [jnp.zeros((r, 1), jnp.int32), root_toks]
        parents = [jnp.full((r, 1), -1, jnp.int32), jnp.zeros((r, k), jnp.int32)]
        log_f = [jnp.zeros((r, 1), jnp.float32), root_vals]
        in_cache = jnp.zeros((r, 1 + k + (depth - 1) * width * k), bool)
        cand_tok, cand_logf = root_toks, root_vals  # [R, C]
        cand_node = 1 + jnp.broadcast_to(jnp.arange(k), (r, k))  # tree index of each candidate
        cand_parent_slot = jnp.full((r, k), -1)  # frontier slot (in the buffer) of the parent
        anc = jnp.zeros((r, width, nbuf), bool)
        next_index = 1 + k
        for j in range(1, depth):
            f_logf, pick = jax.lax.top_k(cand_logf, width)  # [R, W]
            f_tok = jnp.take_along_axis(cand_tok, pick, axis=1)
            f_node = jnp.take_along_axis(cand_node, pick, axis=1)
            f_pslot = jnp.take_along_axis(cand_parent_slot, pick, axis=1)  # [R, W]
            base = (j - 1) * width
            own = jax.nn.one_hot(base + jnp.arange(width), nbuf, dtype=bool)  # [W, Bn]
            parent_anc = jnp.where(
                (f_pslot >= 0)[..., None],
                anc[rows, jnp.clip(f_pslot - (base - width), 0, width - 1)],
                False,
            )
            anc = parent_anc | own[None]

            def attention_fn(layer, q, kk, vv, cache, base=base, anc=anc, j=j):
                kc, vc, kb, vb = cache
                kb = jax.lax.dynamic_update_slice_in_dim(kb, kk, base, axis=1)
                vb = jax.lax.dynamic_update_slice_in_dim(vb, vv, base, axis=1)
                if attention is None:
                    out = _expansion_attention(
                        q, kk, vv, kc, vc, kb, vb, slot, ctx_len, anc, attended_len
                    )
                else:
                    out = _kernel_expansion_attention(
                        attention, q, kc, vc, kb, vb, slot, ctx_len, anc, base, attended_len
                    )
                return out, (kc, vc, kb, vb)

            positions = jnp.broadcast_to((root_pos + j)[:, None], (r, width))
            layer_caches = [
                (kc, vc, kb, vb) for (kc, vc), (kb, vb) in zip(caches, bufs, strict=True)
            ]
            logits, new = model.apply(
                {"params": params}, f_tok, positions, attention_fn, layer_caches
            )
            bufs = [(c[2], c[3]) for c in new]
            in_cache = in_cache.at[jnp.arange(r), f_node[:, 0]].set(True)
            logp = jax.nn.log_softmax(logits, axis=-1)  # [R, W, V]
            vals, idx = jax.lax.top_k(logp, k)  # [R, W, k]
            child_logf = (f_logf[..., None] + vals).reshape(r, width * k)
            child_tok = idx.reshape(r, width * k).astype(jnp.int32)
            tokens.append(child_tok)
            parents.append(jnp.repeat(f_node, k, axis=1).astype(jnp.int32))
            log_f.append(child_logf)
            cand_tok, cand_logf = child_tok, child_logf
            cand_node = next_index + jnp.broadcast_to(jnp.arange(width * k), (r, width * k))
            cand_parent_slot = jnp.repeat(base + jnp.arange(width), k)[None].repeat(r, 0)
            next_index += width * k
        # each depth's best frontier node (buffer column (j - 1) * width) to the draft cache
        # at row root_pos + j, the row it takes if accepted; one scatter per layer, after every
        # read of the cache (the attention above reads rows < ctx_len only)
        cols = jnp.arange(depth - 1) * width
        rows_at = root_pos[:, None] + 1 + jnp.arange(depth - 1)[None, :]  # [R, d - 1]
        slot_at = jnp.broadcast_to(write_slot[:, None], rows_at.shape)
        caches = [
            (
                kc.at[slot_at, rows_at].set(kb[:, cols], mode="drop"),
                vc.at[slot_at, rows_at].set(vb[:, cols], mode="drop"),
            )
            for (kc, vc), (kb, vb) in zip(caches, bufs, strict=True)
        ]
        trees = (
            jnp.concatenate(tokens, axis=1),
            jnp.concatenate(parents, axis=1),
            jnp.concatenate(log_f, axis=1),
            in_cache,
        )
        return trees, caches

    return expand

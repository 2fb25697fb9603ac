"""A mock StepEngine with arithmetic you can check by hand (the JetStream mock_engine idea).

The "target" always continues a token t with (t + 1) % V. The "draft" proposes
(t + 1) % V as its best child with probability `p_right` and wrong tokens after it,
so greedy verification accepts exactly the chain of best children.

The draft's KV cache is checked like a real one would need it: per slot, the rows written so
far (a contiguous prefix); a draft segment may not start past it (rows left unwritten), and
an expansion needs every row up to its root written.
"""

from __future__ import annotations

import numpy as np

from adaserve_jax.engine.tree import DraftTrees, TreeShape, tree_depths


class MockEngine:
    has_draft = True

    def __init__(
        self, num_slots=4, max_len=512, vocab=1000, p_right=0.8, max_step_tokens=64
    ) -> None:
        self.num_slots, self.max_len, self.vocab, self.p_right = num_slots, max_len, vocab, p_right
        self.max_step_tokens = max_step_tokens  # like the largest token bucket
        self.forward_calls: list[list] = []
        self.moves_seen: list = []
        self.draft_rows: dict[int, list[int]] = {}  # slot -> draft cache rows written (tokens)

    def _check(self, segments):
        """What the real engine rejects: too many tokens for a step, rows past the slot."""
        total = sum(len(s) for s in segments)
        if total > self.max_step_tokens:
            raise ValueError(f"{total} tokens exceed the largest token bucket")
        for s in segments:
            if s.ctx_len + len(s) > self.max_len:
                raise ValueError(f"segment needs cache rows past {self.max_len}")

    def forward(self, segments, moves=()):
        self._check(segments)
        self.forward_calls.append(list(segments))
        self.moves_seen.extend(moves)
        tokens = np.concatenate([s.tokens for s in segments]) if segments else np.zeros(0, int)
        offsets, o = [], 0
        for s in segments:
            offsets.append(o)
            o += len(s)
        return (tokens + 1) % self.vocab, tuple(offsets)

    def draft_step(self, segments):
        self._check(segments)
        for s in segments:
            rows = self.draft_rows.setdefault(s.slot, [])
            if s.ctx_len > len(rows):
                raise ValueError(
                    f"draft segment at row {s.ctx_len} of slot {s.slot}: rows {len(rows)}.. "
                    "were never written"
                )
            del rows[s.ctx_len :]
            rows.extend(np.asarray(s.tokens).tolist())
        tokens = np.concatenate([s.tokens for s in segments])
        k = 8
        idx = (tokens[:, None] + 1 + np.arange(k)[None] * 7) % self.vocab
        vals = np.log(np.r_[self.p_right, np.full(k - 1, (1 - self.p_right) / k)])[None].repeat(
            len(tokens), 0
        )
        offsets, o = [], 0
        for s in segments:
            offsets.append(o)
            o += len(s)
        return vals.astype(np.float32), idx.astype(np.int32), tuple(offsets)

    def expand(self, root_vals, root_toks, root_pos, shape: TreeShape) -> DraftTrees:
        for slot, pos in enumerate(np.asarray(root_pos).tolist()):
            written = len(self.draft_rows.get(slot, ()))
            if pos >= 0 and written < pos + 1:
                raise ValueError(f"expansion from row {pos} of slot {slot}: {written} rows written")
        s, k, w = root_vals.shape[0], shape.topk, shape.width
        tokens = [np.zeros((s, 1), np.int64), root_toks[:, :k]]
        parents = [np.full((s, 1), -1), np.zeros((s, k), np.int64)]
        log_f = [np.zeros((s, 1)), root_vals[:, :k]]
        cand_tok, cand_f = root_toks[:, :k], root_vals[:, :k]
        cand_node = 1 + np.arange(k)[None].repeat(s, 0)
        nxt = 1 + k
        for _ in range(1, shape.depth):
            pick = np.argsort(-cand_f, axis=1, kind="stable")[:, :w]
            f_tok = np.take_along_axis(cand_tok, pick, 1)
            f_f = np.take_along_axis(cand_f, pick, 1)
            f_node = np.take_along_axis(cand_node, pick, 1)
            child_tok = (f_tok[..., None] + 1 + np.arange(k) * 7) % self.vocab  # [S, W, k]
            lp = np.log(np.r_[self.p_right, np.full(k - 1, (1 - self.p_right) / k)])
            child_f = f_f[..., None] + lp
            tokens.append(child_tok.reshape(s, -1))
            parents.append(np.repeat(f_node, k, axis=1))
            log_f.append(child_f.reshape(s, -1))
            cand_tok, cand_f = child_tok.reshape(s, -1), child_f.reshape(s, -1)
            cand_node = nxt + np.arange(w * k)[None].repeat(s, 0)
            nxt += w * k
        par = np.concatenate(parents, 1).astype(np.int32)
        return DraftTrees(
            np.concatenate(tokens, 1).astype(np.int32),
            par,
            np.concatenate(log_f, 1).astype(np.float32),
            tree_depths(par),
        )

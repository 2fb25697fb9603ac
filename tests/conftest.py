"""Shared fixtures: a tiny random model and one warmed engine per session."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaserve_jax import Engine, ModelConfig
from adaserve_jax.model import Model, forward_causal, init_params

TINY_BUCKETS = dict(token_buckets=(1, 4, 16, 64), ctx_buckets=(64, 256))


@pytest.fixture(scope="session")
def tiny_model() -> Model:
    cfg = ModelConfig.tiny(vocab_size=256, eos_token_id=None)
    # Scale the 0.02-std init up so attention is peaked and logits are far apart:
    # with near-uniform attention, a wrong mask or position would go unnoticed.
    params = jax.tree.map(
        lambda x: np.asarray(x) * (6.0 if x.ndim == 2 else 1.0), init_params(cfg, 1)
    )
    return Model(cfg, params)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model) -> Engine:
    return Engine(tiny_model, max_batch=3, token_budget=64, progress=False, **TINY_BUCKETS)


def greedy_reference(model: Model, prompt: list[int], n: int, pad_to: int = 256) -> list[int]:
    """Greedy decoding by full causal forwards over a fixed padded length (one compile)."""
    fwd = jax.jit(lambda p, t: forward_causal(p, model.config, t))
    ids = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, pad_to), np.int32)
        buf[0, : len(ids)] = ids
        logits = fwd(model.params, jnp.asarray(buf))
        ids.append(int(np.argmax(np.asarray(logits[0, len(ids) - 1]))))
    return ids[len(prompt) :]


def check_catch_up_chains(sched) -> dict:
    """Make every `_catch_up_chains` call of scheduler `sched` also read the chains from the
    requests (`_read_chains`) and compare them with what it returned; returns counters of
    the calls that used chains carried from the acceptance walk and of those that read them
    (plus `reused`: carried chains that skipped draft-cached tokens)."""
    seen = {"carried": 0, "read": 0, "reused": 0}
    inner = sched._catch_up_chains
    last = {}  # the previous call's roster and output lengths

    def both(decode, roster):
        nxt = sched._next_chains
        carried = nxt is not None and nxt.iteration == sched.iterations and nxt.roster is roster
        out = inner(decode, roster)
        want = sched._read_chains(decode, roster)
        seen["carried" if carried else "read"] += 1
        if carried and last.get("roster") is roster:  # chunk = tokens appended since then
            chunk = np.asarray(nxt.out_len) - np.asarray(last["out_len"])
            seen["reused"] += bool((np.asarray(nxt.lens) < chunk).any())
        last.update(roster=roster, out_len=want[5])
        assert [(s.slot, s.ctx_len, s.tokens.tolist()) for s in out[0]] == [
            (s.slot, s.ctx_len, s.tokens.tolist()) for s in want[0]
        ]
        assert out[1].dtype == want[1].dtype == np.int32
        for a, b in zip(out[1:], want[1:], strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert out[4] == want[4] and out[5] == want[5]  # plain lists
        return out

    sched._catch_up_chains = both
    return seen

"""The per-call timer of `bench.iteration_breakdown`: counts, labels, results pass through."""

from __future__ import annotations

import collections
import types

import jax.numpy as jnp

from adaserve_jax.bench.iteration_breakdown import _call_label, _timed


class _Device:
    def __init__(self) -> None:
        self._caches = [jnp.zeros(3)]
        self.config = types.SimpleNamespace(num_layers=6)

    def _call(self, batch, head):
        return jnp.full(2, batch.bucket)


def test_timed_calls_are_counted_per_label_and_return_unchanged():
    store = {"s": collections.defaultdict(float), "n": collections.Counter()}

    class Device(_Device):  # a fresh class: the wrapper patches it, not _Device
        pass

    _timed(store, Device, "_call", _call_label)
    dev = Device()
    out = [dev._call(types.SimpleNamespace(bucket=b), "sample") for b in (8, 8, 32)]
    assert [int(o[0]) for o in out] == [8, 8, 32]
    assert dict(store["n"]) == {"6L sample T=8": 2, "6L sample T=32": 1}
    assert all(v > 0 for v in store["s"].values())

"""RequestHandle streaming: merged token lists, the message interval, nothing lost."""

from __future__ import annotations

import threading
import time

from adaserve_jax.scheduler.request import Request
from adaserve_jax.scheduler.service import RequestHandle


def _produce(handle: RequestHandle, n: int, gap_s: float) -> threading.Thread:
    def run():
        for i in range(n):
            handle._events.put([i])
            time.sleep(gap_s)
        handle._events.close()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_stream_interval_merges_tokens_and_loses_none():
    chunks = {}
    for interval in (0.0, 0.05):
        handle = RequestHandle(None, Request("r", (1, 2), 40))
        t = _produce(handle, 40, 0.004)
        chunks[interval] = list(handle.stream(interval))
        t.join()
        assert [tok for c in chunks[interval] for tok in c] == list(range(40))
    # ~160 ms of tokens: at most one message per 50 ms (+ the first one) with the interval
    assert len(chunks[0.05]) <= 6 < len(chunks[0.0])


def test_iterating_a_handle_merges_what_queued_meanwhile():
    handle = RequestHandle(None, Request("r", (1,), 3))
    for i in range(3):
        handle._events.put([i])
    handle._events.close()
    assert list(handle) == [[0, 1, 2]]


def test_stream_interval_can_change_while_streaming():
    """A callable interval is asked before every message (the server's rate budget)."""
    asked = []

    def interval():
        asked.append(1)
        return 0.0 if len(asked) < 3 else 0.05

    handle = RequestHandle(None, Request("r", (1, 2), 40))
    t = _produce(handle, 40, 0.004)
    chunks = list(handle.stream(interval))
    t.join()
    assert [tok for c in chunks for tok in c] == list(range(40))
    assert len(asked) >= len(chunks) and len(chunks) <= 8  # first two fast, then 50 ms apart

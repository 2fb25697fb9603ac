"""A background thread that drives a `Scheduler` for concurrent callers (numpy only).

Callers on any thread `submit` requests and get a `RequestHandle`: iterate it to
receive token lists as they are accepted, `cancel()` it, or wait for `result()`.
Submissions and cancellations are queued and applied by the loop thread at the
start of the next iteration, so the scheduler itself is only touched by one thread.
An exception inside one iteration fails the requests of that iteration with
`FinishReason.ERROR` and the loop keeps serving.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator

from adaserve_jax.scheduler.loop import Scheduler
from adaserve_jax.scheduler.request import FinishReason, Phase, Request, RequestState

log = logging.getLogger(__name__)


class TokenMailbox:
    """Tokens from the loop thread to one consumer thread, merged into one list.

    `put` wakes the consumer only while it waits for *any* token; a consumer that merges
    tokens over an interval (`take(until=...)`) sleeps until its deadline or the end and
    is not woken per token: on a 2-core machine every wake-up is CPU time taken from the
    device step running on the other threads.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._tokens: list[int] = []
        self._closed = False
        self._waiting_any = False

    def put(self, tokens: list[int]) -> None:
        with self._cv:
            self._tokens.extend(tokens)
            if self._waiting_any:
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def take(self, until: float | None = None) -> tuple[list[int], bool]:
        """(tokens since the last take, closed). until=None: wait for a token or the end;
        else wait until `time.monotonic() >= until` or the end, merging what arrives."""
        with self._cv:
            if until is None:
                self._waiting_any = True
                while not self._tokens and not self._closed:
                    self._cv.wait()
                self._waiting_any = False
            else:
                while not self._closed and (left := until - time.monotonic()) > 0:
                    self._cv.wait(left)
            tokens, self._tokens = self._tokens, []
            return tokens, self._closed


class QueueFullError(RuntimeError):
    """More requests are waiting than the service admits."""


class RequestHandle:
    def __init__(self, service: ServingLoop, request: Request) -> None:
        self.request = request
        self.state: RequestState | None = None
        self._service = service
        self._events = TokenMailbox()
        self._done = threading.Event()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def __iter__(self) -> Iterator[list[int]]:
        """Yields the tokens produced since the last yield; ends when the request finishes.

        A consumer that falls behind gets everything queued meanwhile in one list, so a
        slow reader costs one message per read, not one per loop iteration.
        """
        return self.stream()

    def stream(self, min_interval_s: float | Callable[[], float] = 0.0) -> Iterator[list[int]]:
        """Like iterating the handle, but yields at most once per `min_interval_s` (except
        the first tokens and the end): tokens arriving meanwhile are merged into one list.
        A streaming server uses it to send fewer, larger messages (each message costs the
        serving process CPU time that the scheduler thread then waits for). A callable is
        asked for the interval before every message."""
        interval = min_interval_s if callable(min_interval_s) else lambda: min_interval_s
        last = -math.inf
        while True:
            tokens, done = [], False
            deadline = last + interval()
            if time.monotonic() < deadline:  # sleep to the deadline, then send
                tokens, done = self._events.take(until=deadline)
            if not tokens and not done:  # nothing came meanwhile: send the next token at once
                tokens, done = self._events.take()
            if tokens:
                last = time.monotonic()
                yield tokens
            if done:
                return

    def cancel(self) -> None:
        self._service._cancel(self)

    def wait(self, timeout: float | None = None) -> RequestState:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id!r} not finished after {timeout} s")
        assert self.state is not None
        return self.state

    @property
    def done(self) -> bool:
        return self._done.is_set()


class ServingLoop:
    def __init__(self, scheduler: Scheduler, *, max_queue: int = 1024) -> None:
        self.scheduler = scheduler
        self.max_queue = max_queue
        self._inbox: queue.Queue = queue.Queue()
        self._handles: dict[int, RequestHandle] = {}  # id(state) -> handle
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending = 0
        self._lock = threading.Lock()
        scheduler.on_tokens = self._on_tokens
        scheduler.on_finish = self._on_finish
        self._thread = threading.Thread(target=self._run, name="adaserve-loop", daemon=True)
        self._thread.start()

    # ---- callers' side -------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        with self._lock:
            waiting = self._pending + len(self.scheduler.waiting)
            if waiting >= self.max_queue:
                raise QueueFullError(f"{waiting} requests already waiting (max {self.max_queue})")
            self._pending += 1
        self.scheduler.check(request)  # raises ValueError on bad input, before queueing
        handle = RequestHandle(self, request)
        self._inbox.put(("submit", handle))
        self._wake.set()
        return handle

    def _cancel(self, handle: RequestHandle) -> None:
        self._inbox.put(("cancel", handle))
        self._wake.set()

    def stats(self) -> dict:
        s = self.scheduler
        return {
            "waiting": len(s.waiting) + self._pending,
            "running": len(s.running),
            "slots_in_use": s.alloc.used_slots,
            "slots_total": s.alloc.num_slots,
        }

    def shutdown(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def drain(self, timeout: float) -> bool:
        """Wait until no request is queued or running; True if drained in time."""
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._inbox.empty() and not self.scheduler.has_work() and self._pending == 0:
                return True
            time.sleep(0.01)
        return False

    # ---- loop thread -----------------------------------------------------------------
    def _apply_inbox(self) -> None:
        while True:
            try:
                kind, handle = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                with self._lock:
                    self._pending -= 1
                try:
                    state = self.scheduler.submit(handle.request)
                except ValueError as exc:
                    state = RequestState(handle.request, arrival=self.scheduler.clock())
                    state.error = str(exc)
                    handle.state = state
                    self._finish_handle(handle, state, FinishReason.ERROR)
                    continue
                handle.state = state
                self._handles[id(state)] = handle
            elif handle.state is not None and handle.state.phase is not Phase.DONE:
                self.scheduler.cancel(handle.state)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._apply_inbox()
            if not self.scheduler.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.scheduler.step()
            except Exception as exc:  # one bad iteration must not take the server down
                log.exception("iteration failed; failing its requests")
                for state in list(self.scheduler.running):
                    state.error = f"{type(exc).__name__}: {exc}"
                    self.scheduler.fail(state)

    def _on_tokens(self, state: RequestState, tokens: list[int]) -> None:
        handle = self._handles.get(id(state))
        if handle is not None:
            handle._events.put(tokens)

    def _on_finish(self, state: RequestState) -> None:
        handle = self._handles.pop(id(state), None)
        if handle is not None:
            self._finish_handle(handle, state, None)

    @staticmethod
    def _finish_handle(handle: RequestHandle, state: RequestState, reason) -> None:
        if reason is not None:
            state.finish_reason = reason
            state.phase = Phase.DONE
        handle.state = state
        handle._events.close()
        handle._done.set()

"""The `adaserve.v1.Generation` servicer: gRPC requests onto `Engine.submit` (never imports jax).

Lifecycle of one RPC:
  1. Before the engine has finished warming up every call answers UNAVAILABLE.
  2. The `GenerateRequest` becomes a validated `Request` (`engine.make_request`); a
     ValueError (it names the field) answers INVALID_ARGUMENT. A full queue answers
     RESOURCE_EXHAUSTED.
  3. `engine.submit` returns a handle. The RPC registers `handle.cancel` as a termination
     callback (client cancel, disconnect, deadline, server stop) and arms a timer at the
     deadline, so an abandoned request leaves its KV slot at the next loop iteration.
  4. `Generate` streams every token list the loop accepts (several tokens per message under
     speculation) with its text delta (`TextStream`: decode everything, send the new suffix);
     the last message carries `Finish`. `GenerateOnce` waits and answers once.
  5. A request the loop failed (FinishReason.ERROR), or an unexpected exception in this
     servicer, answers INTERNAL for that request alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from adaserve_jax.scheduler.request import FinishReason, Request, RequestState
from adaserve_jax.scheduler.service import QueueFullError
from adaserve_jax.server import adaserve_pb2 as pb
from adaserve_jax.server import adaserve_pb2_grpc as pb_grpc
from adaserve_jax.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_REQUEST_ID_CHARS = 256
_REPLACEMENT = "\ufffd"  # what a byte-level decoder shows for an incomplete UTF-8 sequence


class TextStream:
    """Text deltas of a growing token list, consistent with the final text.

    Every push decodes the whole output and sends what is new, holding back (a) a trailing
    replacement character (a multi-byte character split across tokens), and (b) a suffix that
    could still grow into a stop string; text from a stop string on is never sent (the engine
    cuts it from the final text too). So the concatenated deltas are a prefix of the final text.
    """

    def __init__(self, decode: Callable[[list[int]], str] | None, stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self.sent = ""

    def _visible(self, text: str) -> str:
        cut = min((text.find(s) for s in self._stop if s in text), default=-1)
        if cut >= 0:
            return text[:cut]
        hold = 0
        for s in self._stop:  # longest suffix of `text` that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        text = text[: len(text) - hold]
        return text.rstrip(_REPLACEMENT)

    def push(self, output: list[int]) -> str:
        if self._decode is None:
            return ""
        text = self._visible(self._decode(output))
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return ""  # nothing new, or the decoder revised earlier text: wait for the end
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, final_text: str | None) -> str:
        if not final_text or not final_text.startswith(self.sent):
            if final_text and self.sent:
                log.warning("final text does not extend the streamed text; sending no rest")
            return "" if self.sent else (final_text or "")
        delta, self.sent = final_text[len(self.sent) :], final_text
        return delta


class RequestAborted(Exception):
    """Internal: end the RPC with `code` and `details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def model_info(model: Any) -> pb.ModelInfo:
    cfg = model.config
    path = getattr(model, "path", None)
    return pb.ModelInfo(
        name=path.name if path is not None else "",
        vocab_size=cfg.vocab_size,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_params=int(cfg.num_params()),
        max_seq_len=cfg.max_seq_len,
    )


class GenerationServicer(pb_grpc.GenerationServicer):
    """Serves one engine. `engine` is set once warm-up is done (`set_engine`)."""

    def __init__(
        self,
        engine: Any = None,
        *,
        policy: str = "",
        categories: Sequence[str] = ("coding", "chat", "summarization"),
        metrics: ServerMetrics | None = None,
        version: str = "",
        stream_interval_s: float = 0.0,
        stream_rate: float = 0.0,
    ) -> None:
        if not (stream_interval_s >= 0):
            raise ValueError(f"{stream_interval_s=} must be >= 0")
        if not (stream_rate >= 0):
            raise ValueError(f"{stream_rate=} must be >= 0")
        self.engine = None
        self.policy = policy
        # Generate sends at most one message per stream per interval (tokens merged); with a
        # rate budget (messages per second over all streams, 0 = none) the interval grows
        # with the number of streams in flight: every message costs the server CPU wake-ups
        # that the device step waits for (BENCHMARKS.md), a lone stream still gets every step
        self.stream_interval_s = float(stream_interval_s)
        self.stream_rate = float(stream_rate)
        self.categories = tuple(categories)
        self.metrics = metrics
        self.version = version
        # Engine.submit creates its serving loop lazily and not thread-safely: serialize it.
        self._submit_lock = threading.Lock()
        self._active = 0  # Generate / GenerateOnce calls in flight
        self._active_lock = threading.Lock()
        if engine is not None:
            self.set_engine(engine)

    def set_engine(self, engine: Any) -> None:
        self.engine = engine
        if self.metrics is not None:
            self.metrics.bind_stats(self.load)

    # ---- helpers ---------------------------------------------------------------------
    def load(self) -> dict:
        """waiting / running / slots_in_use / slots_total of the serving loop."""
        engine = self.engine
        if engine is None:
            return {"waiting": 0, "running": 0, "slots_in_use": 0, "slots_total": 0}
        if engine.service is None:
            return {"waiting": 0, "running": 0, "slots_in_use": 0, "slots_total": engine.num_slots}
        return engine.service.stats()

    @property
    def active(self) -> int:
        return self._active

    def message_interval_s(self) -> float:
        """Seconds between two messages of one stream now (see `stream_rate`)."""
        if self.stream_rate <= 0:
            return self.stream_interval_s
        return max(self.stream_interval_s, self._active / self.stream_rate)

    def _track(self, delta: int) -> None:
        with self._active_lock:
            self._active += delta

    def _engine(self) -> Any:
        if self.engine is None:
            raise RequestAborted(grpc.StatusCode.UNAVAILABLE, "the server is warming up")
        return self.engine

    def _request(self, engine: Any, msg: pb.GenerateRequest) -> Request:
        """Validate `msg` into a Request; INVALID_ARGUMENT naming the field otherwise."""
        try:
            which = msg.WhichOneof("prompt")
            if which is None:
                raise ValueError("prompt: set text or token_ids")
            prompt = msg.text if which == "text" else list(msg.token_ids.ids)
            stop = list(msg.stop)
            if len(stop) > MAX_STOP_STRINGS:
                raise ValueError(f"stop: {len(stop)} strings, at most {MAX_STOP_STRINGS}")
            if any(not s or len(s) > MAX_STOP_CHARS for s in stop):
                raise ValueError(f"stop: strings must be non-empty and <= {MAX_STOP_CHARS} chars")
            if len(msg.request_id) > MAX_REQUEST_ID_CHARS:
                raise ValueError(f"request_id: longer than {MAX_REQUEST_ID_CHARS} chars")
            slo = msg.WhichOneof("slo")
            return engine.make_request(
                prompt,
                max_tokens=msg.max_tokens,
                request_id=msg.request_id or None,
                temperature=msg.temperature if msg.HasField("temperature") else 0.0,
                top_p=msg.top_p if msg.HasField("top_p") else 1.0,
                top_k=msg.top_k if msg.HasField("top_k") else 0,
                seed=msg.seed if msg.HasField("seed") else None,
                stop=stop,
                tpot_slo_ms=msg.tpot_slo_ms if slo == "tpot_slo_ms" else None,
                ttft_slo_ms=msg.ttft_slo_ms if msg.HasField("ttft_slo_ms") else None,
                category=msg.category if slo == "category" else None,
            )
        except ValueError as exc:
            raise RequestAborted(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    def _submit(self, engine: Any, request: Request, context: grpc.ServicerContext):
        try:
            with self._submit_lock:
                handle = engine.submit(request)
        except QueueFullError as exc:
            raise RequestAborted(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except ValueError as exc:
            raise RequestAborted(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        # Client cancel / disconnect / deadline / server stop: free the slot.
        if not context.add_callback(handle.cancel):
            handle.cancel()  # the RPC already terminated
        remaining = context.time_remaining()
        if remaining is not None and remaining < 1e6:
            timer = threading.Timer(max(remaining, 0.0), handle.cancel)
            timer.daemon = True
            timer.start()
            context.add_callback(timer.cancel)
        return handle

    def _finish(self, engine: Any, state: RequestState, started: float) -> pb.Finish:
        req = state.request
        reason = state.finish_reason or FinishReason.ERROR
        ttft, tpot = state.ttft_s(), state.mean_tpot_s()
        finish = pb.Finish(
            reason=pb.FinishReason.Value(f"FINISH_REASON_{reason.name}"),
            usage=pb.Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=len(state.output)),
            timing=pb.Timing(e2e_ms=(time.perf_counter() - started) * 1000),
            speculation=pb.SpeculationStats(
                verify_steps=state.stats.steps,
                drafted_tokens=state.stats.drafted,
                selected_tokens=state.stats.selected,
                accepted_tokens=state.stats.accepted,
            ),
        )
        if ttft is not None:
            finish.timing.ttft_ms = ttft * 1000
        if tpot is not None:
            finish.timing.mean_tpot_ms = tpot * 1000
        attained = state.attained()
        if attained is not None:
            finish.slo_attained = attained
        if req.tpot_slo_ms is not None:
            finish.tpot_slo_ms = req.tpot_slo_ms
        return finish

    def _record(self, outcome: str, state: RequestState | None = None) -> None:
        if self.metrics is not None:
            self.metrics.record(outcome, state)

    def _fail(self, context: grpc.ServicerContext, exc: RequestAborted) -> None:
        self._record(exc.code.name.lower())
        context.abort(exc.code, exc.details)

    # ---- RPCs ------------------------------------------------------------------------
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator:
        started = time.perf_counter()
        handle = None
        self._track(+1)
        try:
            engine = self._engine()
            req = self._request(engine, request)
            handle = self._submit(engine, req, context)
            stream = TextStream(
                engine.tokenizer.decode if engine.tokenizer is not None else None, req.stop
            )
            output: list[int] = []
            for tokens in handle.stream(self.message_interval_s):
                output.extend(tokens)
                yield pb.GenerateResponse(
                    request_id=req.request_id, token_ids=tokens, text=stream.push(output)
                )
            state = handle.wait()
            self._check_failed(state)
            final = engine.output(state)
            yield pb.GenerateResponse(
                request_id=req.request_id,
                text=stream.finish(final.text),
                finish=self._finish(engine, state, started),
            )
            self._record(str(state.finish_reason), state)
            handle = None
        except RequestAborted as exc:
            handle = None
            self._fail(context, exc)
        except Exception as exc:  # this request alone fails; the server keeps serving
            h, handle = handle, None
            self._internal(context, h, exc)
        finally:
            self._track(-1)
            if handle is not None:  # the client went away mid-stream (generator closed)
                handle.cancel()
                self._record("cancelled")

    def GenerateOnce(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> pb.GenerateResponse:
        started = time.perf_counter()
        handle = None
        self._track(+1)
        try:
            engine = self._engine()
            req = self._request(engine, request)
            handle = self._submit(engine, req, context)
            state = handle.wait()
            self._check_failed(state)
            final = engine.output(state)
            self._record(str(state.finish_reason), state)
            return pb.GenerateResponse(
                request_id=req.request_id,
                token_ids=final.token_ids,
                text=final.text or "",
                finish=self._finish(engine, state, started),
            )
        except RequestAborted as exc:
            self._fail(context, exc)
        except Exception as exc:
            self._internal(context, handle, exc)
        finally:
            self._track(-1)

    def ServerInfo(
        self, request: pb.ServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.ServerInfoResponse:
        try:
            engine = self._engine()
        except RequestAborted as exc:
            context.abort(exc.code, exc.details)
        load = self.load()
        info = pb.ServerInfoResponse(
            target=model_info(engine.target_model),
            policy=self.policy,
            slots_in_use=load["slots_in_use"],
            slots_total=load["slots_total"],
            queue_depth=load["waiting"],
            running=load["running"],
            baseline_tpot_ms=engine.baseline_tpot_ms,
            categories=[
                pb.SloCategory(name=c, tpot_slo_ms=engine.category_slo_ms(c))
                for c in self.categories
            ],
            has_tokenizer=engine.tokenizer is not None,
            max_context=engine.max_len,
            version=self.version,
        )
        if engine.draft_model is not None:
            info.draft.CopyFrom(model_info(engine.draft_model))
        return info

    @staticmethod
    def _check_failed(state: RequestState) -> None:
        if state.finish_reason is FinishReason.ERROR:
            raise RequestAborted(
                grpc.StatusCode.INTERNAL, f"request failed: {state.error or 'internal error'}"
            )

    def _internal(self, context: grpc.ServicerContext, handle: Any, exc: Exception) -> None:
        log.exception("request failed in the servicer")
        if handle is not None:
            handle.cancel()
        self._record("internal")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

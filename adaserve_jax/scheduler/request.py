"""Requests and their host-side state (numpy only)."""

from __future__ import annotations

import dataclasses
import enum
import math

from adaserve_jax.engine.batch import SamplingParams


class FinishReason(enum.StrEnum):
    LENGTH = "length"  # max_tokens reached
    EOS = "eos"  # the model emitted its end-of-sequence token
    STOP = "stop"  # a stop string appeared
    CONTEXT = "context"  # the KV slot is full
    CANCELLED = "cancelled"
    ERROR = "error"


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """What a caller asks for. `prompt_ids` are already tokenized."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    tpot_slo_ms: float | None = None
    ttft_slo_ms: float | None = None
    category: str | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id!r}: prompt is empty")
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(
                f"request {self.request_id!r}: max_tokens={self.max_tokens} must be > 0"
            )
        for name in ("tpot_slo_ms", "ttft_slo_ms"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"request {self.request_id!r}: {name}={v} must be finite and > 0")


@dataclasses.dataclass(slots=True)
class RequestStats:
    """Speculation counters of one request."""

    steps: int = 0  # verify steps this request took part in
    drafted: int = 0  # draft tokens proposed for it
    selected: int = 0  # draft tokens sent to verification
    accepted: int = 0  # draft tokens accepted (bonus tokens not counted)


@dataclasses.dataclass(slots=True)
class RequestState:
    request: Request
    arrival: float
    phase: Phase = Phase.WAITING
    slot: int = -1
    cached: int = 0  # target KV rows committed for this request
    draft_cached: int = 0  # draft KV rows committed
    output: list[int] = dataclasses.field(default_factory=list)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    stats: RequestStats = dataclasses.field(default_factory=RequestStats)
    skipped: int = 0  # decoding steps sat out in a row (SLO pacing, scheduler/pacing.py)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def pending_token(self) -> int:
        """The last produced token: not yet in the KV cache (the next step's root)."""
        return self.output[-1]

    def all_tokens(self) -> list[int]:
        return list(self.request.prompt_ids) + self.output

    def tokens_between(self, start: int, stop: int) -> list[int]:
        """`all_tokens()[start:stop]` without building the whole list."""
        n = len(self.request.prompt_ids)
        if start >= n:
            return self.output[start - n : stop - n]
        return list(self.request.prompt_ids[start:stop]) + self.output[: max(stop - n, 0)]

    @property
    def decode_elapsed(self) -> float:
        if self.first_token_time is None or self.last_token_time is None:
            return 0.0
        return self.last_token_time - self.first_token_time

    def mean_tpot_s(self) -> float | None:
        """Mean time per output token after the first (the paper's TPOT)."""
        if len(self.output) < 2:
            return None
        return self.decode_elapsed / (len(self.output) - 1)

    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    def attained(self) -> bool | None:
        if self.request.tpot_slo_ms is None:
            return None
        tpot = self.mean_tpot_s()
        ok = tpot is None or tpot * 1000 <= self.request.tpot_slo_ms
        if self.request.ttft_slo_ms is not None:
            ttft = self.ttft_s()
            ok = ok and ttft is not None and ttft * 1000 <= self.request.ttft_slo_ms
        return ok

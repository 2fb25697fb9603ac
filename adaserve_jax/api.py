"""The public entry point: `Engine(target, draft=None, ...)` with `generate`.

`Engine` owns the device models (target, optional draft) and a `Scheduler`; it
validates every input on the host before any device work.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from adaserve_jax.engine.batch import Move, SamplingParams, Segment
from adaserve_jax.engine.device import DEFAULT_TOKEN_BUCKETS, DeviceModel
from adaserve_jax.engine.mesh import attach_mirror, make_mesh, validate_model
from adaserve_jax.engine.profiler import CallPrices, Profile, load_or_measure
from adaserve_jax.engine.speculation import DraftDevice
from adaserve_jax.engine.tree import DraftTrees, TreeShape
from adaserve_jax.model.loader import Model
from adaserve_jax.scheduler.budget import LatencyProfile
from adaserve_jax.scheduler.loop import Scheduler
from adaserve_jax.scheduler.policy import Policy, PolicyKind, fit_adaserve_shape, parse_policy
from adaserve_jax.scheduler.request import Request, RequestStats
from adaserve_jax.scheduler.service import RequestHandle, ServingLoop

# TPOT SLO of each category as a multiple of the engine's baseline TPOT (DESIGN.md §5:
# the paper's 1.2x, 50 ms and 150 ms over a 30 ms baseline).
SLO_CATEGORIES = {"coding": 1.2, "chat": 50.0 / 30.0, "summarization": 5.0}


@dataclasses.dataclass(frozen=True, slots=True)
class GenerationOutput:
    token_ids: list[int]
    text: str | None
    finish_reason: str
    prompt_ids: list[int]
    stats: RequestStats
    ttft_s: float | None = None
    tpot_s: float | None = None


class Engine:
    """Serve a target model (optionally with a draft for speculative decoding)."""

    def __init__(
        self,
        target: Model,
        draft: Model | None = None,
        *,
        attention_impl: str = "xla",
        max_batch: int = 8,
        max_len: int | None = None,
        token_budget: int | None = None,
        token_buckets: Sequence[int] = DEFAULT_TOKEN_BUCKETS,
        ctx_buckets: Sequence[int] | None = None,
        policy: str = "autoregressive",
        policies: Sequence[str] = (),
        max_queue: int = 1024,
        profile: bool | None = None,
        reprofile: bool = False,
        warmup: bool = True,
        progress: bool = True,
        devices: int | None = None,
    ) -> None:
        """`devices=N`: tensor-parallel over the first N devices (docs/MESH.md); None = one."""
        if max_batch <= 0:
            raise ValueError(f"{max_batch=} must be > 0")
        max_len = max_len or target.config.max_seq_len
        token_budget = token_budget or max(token_buckets)
        if token_budget > max(token_buckets):
            raise ValueError(
                f"{token_budget=} exceeds the largest token bucket {max(token_buckets)}"
            )
        if draft is not None and draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(
                f"draft vocab_size={draft.config.vocab_size} != target vocab_size="
                f"{target.config.vocab_size}"
            )
        self.mesh = make_mesh(devices)
        validate_model(target.config, self.mesh, "target")
        if draft is not None:
            validate_model(draft.config, self.mesh, "draft")
        self.target_model = target
        self.draft_model = draft
        self.tokenizer = target.tokenizer
        self.token_budget = token_budget
        self.target = DeviceModel(
            target,
            num_slots=max_batch,
            max_len=max_len,
            attention_impl=attention_impl,
            token_buckets=token_buckets,
            ctx_buckets=ctx_buckets,
            mesh=self.mesh,
        )
        self.num_slots = max_batch
        self.max_len = max_len
        self.has_draft = draft is not None
        self._ids = itertools.count()
        self._service_lock = threading.Lock()
        # Single-request autoregressive TPOT at near-zero load; the profiler measures it.
        self.baseline_tpot_ms: float = 30.0
        self.policy = parse_policy(policy)
        # adaserve: SLO pacing of plain-decoding steps (scheduler/pacing.py)
        self.slo_pacing = True
        self.max_queue = max_queue
        self._service: ServingLoop | None = None
        policies = [policy, *policies]
        shapes = [
            fit_adaserve_shape(p.shape, token_budget, max_batch)
            if p.kind is PolicyKind.ADASERVE
            else p.shape
            for p in map(parse_policy, policies)
            if p.shape is not None
        ]
        if shapes and draft is None:
            raise ValueError(f"speculative policies {list(policies)} need a draft model")
        self.draft = None
        if draft is not None:
            self.draft = DraftDevice(
                draft,
                num_slots=max_batch,
                max_len=max_len,
                shapes=shapes,
                attention_impl=attention_impl,
                token_buckets=token_buckets,
                ctx_buckets=ctx_buckets,
                mesh=self.mesh,
            )
        if max_batch > token_budget:
            raise ValueError(f"{max_batch=} exceeds {token_budget=}: every request needs its root")
        self.latency_profile: LatencyProfile | None = None
        # wall seconds inside device calls (forward, draft_step, expand: host batch building,
        # the jitted call and reading its outputs back); the rest of an iteration is scheduler
        # Python, which the benchmarks report as host time per iteration
        self.device_seconds = 0.0
        # optional observer of every device call the start-up profile prices: (kind "verify",
        # "draft" or "expand", the profile's price in seconds, wall seconds); the benchmarks
        # use it to measure how fast the machine ran each kind of call against its profile
        self.on_device_call: Callable[[str, float, float], None] | None = None
        self._prices: CallPrices | None = None
        # Multi-host: process 0 drives every device call, the others replay it (engine/mesh.py).
        self.mirror = attach_mirror(self.target, self.draft)
        if self.mirror is not None and not self.mirror.primary:
            return  # a follower warms up and profiles by replaying process 0: call follow()
        if warmup:
            self.target.warmup(progress=progress)
            if self.draft is not None:
                self.draft.warmup(progress=progress)
        wants_profile = any(parse_policy(p).kind is PolicyKind.ADASERVE for p in policies)
        if profile or (profile is None and warmup and wants_profile):
            self.run_profile(reprofile=reprofile, progress=progress)

    def run_profile(self, reprofile: bool = False, progress: bool = True) -> Profile:
        """Load or measure the latency profile; sets `latency_profile` and `baseline_tpot_ms`."""
        draft = self.draft.device if self.draft is not None else None
        prof, path = load_or_measure(
            self.target, draft, expander=self.draft, reprofile=reprofile, progress=progress
        )
        self.latency_profile = LatencyProfile.from_tables(
            prof.verify_ms, prof.draft_ms, expand_ms=prof.expand_ms
        )
        self._prices = CallPrices(prof)
        self.baseline_tpot_ms = prof.baseline_tpot_ms
        self.profile_path = path
        return prof

    def follow(self) -> int:
        """Processes other than 0 of a multi-host job: replay process 0's device calls until
        it calls `stop_followers()`; returns the number of calls replayed."""
        if self.mirror is None:
            raise RuntimeError("follow() is for processes > 0 of a jax.distributed job")
        return self.mirror.follow()

    def stop_followers(self) -> None:
        """Process 0 of a multi-host job, at shutdown: release the others from `follow()`."""
        if self.mirror is not None:
            self.mirror.stop()

    def compile_count(self) -> int:
        """Compiled step variants of target and draft (grows only if something retraces)."""
        return self.target.compile_count() + (self.draft.compile_count() if self.draft else 0)

    # ---- StepEngine (used by the scheduler) ------------------------------------------
    def forward(
        self, segments: list[Segment], moves: Sequence[Move] = ()
    ) -> tuple[np.ndarray, tuple[int, ...]]:
        t0 = time.perf_counter()
        sampled, batch = self.target.run(segments, head="sample", moves=moves)
        dt = time.perf_counter() - t0
        self.device_seconds += dt
        if self.on_device_call is not None and self._prices is not None:
            self._observe("verify", self._prices.verify_s(batch.bucket), dt)
        return sampled, batch.offsets

    def draft_step(self, segments: list[Segment]):
        t0 = time.perf_counter()
        out = self.draft.step(segments)
        dt = time.perf_counter() - t0
        self.device_seconds += dt
        if self.on_device_call is not None and self._prices is not None:
            self._observe("draft", self._prices.draft_s(len(out[1])), dt)
        return out

    def expand(self, root_vals, root_toks, root_pos, shape: TreeShape) -> DraftTrees:
        t0 = time.perf_counter()
        trees = self.draft.expand(root_vals, root_toks, root_pos, shape)
        dt = time.perf_counter() - t0
        self.device_seconds += dt
        if self.on_device_call is not None and self._prices is not None:
            active = int((np.asarray(root_pos) >= 0).sum())
            self._observe("expand", self._prices.expand_s(shape, active), dt)
        return trees

    def _observe(self, kind: str, price_s: float | None, seconds: float) -> None:
        if price_s is not None:
            self.on_device_call(kind, price_s, seconds)

    # ---- public ----------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "a str prompt needs a tokenizer; this model has none (pass token ids)"
                )
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.target_model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        return ids

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        max_tokens: int,
        policy: str = "autoregressive",
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> list[GenerationOutput]:
        """Generate for all prompts together (continuous batching); blocks until done."""
        if self._service is not None:
            raise RuntimeError("the serving loop owns the device: use Engine.submit")
        pol = parse_policy(policy)
        if pol.speculative and self.draft is None:
            raise ValueError(f"policy {policy!r} needs a draft model (Engine(target, draft))")
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts, not a single str")
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"max_tokens={max_tokens} must be a positive int")
        base_seed = int(np.random.randint(0, 2**31)) if seed is None else int(seed)
        requests = []
        for i, prompt in enumerate(prompts):
            ids = self.encode_prompt(prompt)
            sampling = SamplingParams(temperature, top_p, top_k, (base_seed + i) % 2**32)
            requests.append(Request(str(i), tuple(ids), max_tokens, sampling, stop=tuple(stop)))
        sched = self._scheduler(policy=pol)
        states = [sched.submit(r) for r in requests]  # validates every request first
        sched.run_until_done()
        return [self._output(s) for s in states]

    def make_request(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int,
        request_id: str | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        tpot_slo_ms: float | None = None,
        ttft_slo_ms: float | None = None,
        category: str | None = None,
    ) -> Request:
        """Validate and tokenize one request (ValueError naming the field on bad input)."""
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
            raise ValueError(f"max_tokens={max_tokens} must be a positive int")
        ids = self.encode_prompt(prompt)
        seed = int(np.random.randint(0, 2**31)) if seed is None else seed
        sampling = SamplingParams(temperature, top_p, top_k, seed)
        rid = request_id or f"req-{next(self._ids)}"
        if category is not None and tpot_slo_ms is None:
            tpot_slo_ms = self.category_slo_ms(category)
        req = Request(
            rid, tuple(ids), max_tokens, sampling, tpot_slo_ms, ttft_slo_ms, category, tuple(stop)
        )
        need = len(ids) + max_tokens
        if need > self.max_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = {need} exceeds the "
                f"context of {self.max_len} tokens"
            )
        return req

    def category_slo_ms(self, category: str) -> float:
        """TPOT SLO (ms) of a category name: its multiple of `baseline_tpot_ms`."""
        if category not in SLO_CATEGORIES:
            raise ValueError(
                f"unknown SLO category {category!r}; expected one of {list(SLO_CATEGORIES)}"
            )
        return SLO_CATEGORIES[category] * self.baseline_tpot_ms

    def submit(self, request: Request) -> RequestHandle:
        """Queue a request on the background serving loop; returns a streaming handle."""
        with self._service_lock:  # callers may submit from many threads at once
            if self._service is None:
                sched = self._scheduler(self.policy)
                self._service = ServingLoop(sched, max_queue=self.max_queue)
        return self._service.submit(request)

    @property
    def service(self) -> ServingLoop | None:
        return self._service

    def output(self, state) -> GenerationOutput:
        return self._output(state)

    def _scheduler(self, policy: Policy | str = "autoregressive", **kwargs) -> Scheduler:
        cfg = self.target_model.config
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        return Scheduler(
            self,
            policy=policy,
            token_budget=self.token_budget,
            profile=self.latency_profile,
            slo_pacing=self.slo_pacing,
            eos_id=cfg.eos_token_id,
            decode_text=decode,
            **kwargs,
        )

    def _output(self, s) -> GenerationOutput:
        text = self.tokenizer.decode(s.output) if self.tokenizer is not None else None
        if text is not None and s.request.stop:
            cut = min((text.find(x) for x in s.request.stop if x in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        return GenerationOutput(
            token_ids=list(s.output),
            text=text,
            finish_reason=str(s.finish_reason),
            prompt_ids=list(s.request.prompt_ids),
            stats=s.stats,
            ttft_s=s.ttft_s(),
            tpot_s=s.mean_tpot_s(),
        )

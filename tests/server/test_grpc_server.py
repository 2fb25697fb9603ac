"""End-to-end: a real `serve.py` process and real gRPC clients (the drain test runs last)."""

from __future__ import annotations

import math
import signal
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import MAX_BATCH, POLICY

from adaserve_jax.client import Client, build_request
from adaserve_jax.server import adaserve_pb2 as pb

PROMPT = [5, 17, 42, 99, 3]


def stream(client: Client, request: pb.GenerateRequest, **kw) -> tuple[list, str, pb.Finish]:
    tokens, text, finish = [], "", None
    for msg in client.generate(request, **kw):
        assert finish is None, "nothing may follow the finish message"
        tokens += msg.token_ids
        text += msg.text
        if msg.HasField("finish"):
            finish = msg.finish
    assert finish is not None
    return tokens, text, finish


def wait_idle(client: Client, timeout: float = 5.0) -> pb.ServerInfoResponse:
    end = time.monotonic() + timeout
    while True:
        info = client.server_info()
        if info.slots_in_use == 0 and info.queue_depth == 0 and info.running == 0:
            return info
        if time.monotonic() > end:
            raise AssertionError(f"slots not freed: {info}")
        time.sleep(0.02)


def test_health_reflection_and_info(server, client):
    with grpc.insecure_channel(server.address) as ch:  # health needs no token
        status = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="adaserve.v1.Generation"), timeout=5
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    (resp,) = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
        metadata=client.metadata,
        timeout=5,
    )
    names = {s.name for s in resp.list_services_response.service}
    assert {"adaserve.v1.Generation", "grpc.health.v1.Health"} <= names
    info = client.server_info()
    assert info.slots_total == MAX_BATCH and info.target.vocab_size == 384
    assert info.has_tokenizer and info.max_context == 256 and info.policy == POLICY
    assert {c.name for c in info.categories} == {"coding", "chat", "summarization"}
    assert info.draft.vocab_size == 384


def test_stream_equals_once_token_ids(client):
    req = build_request(PROMPT, max_tokens=24, tpot_slo_ms=10_000.0)
    sizes = [len(m.token_ids) for m in client.generate(req)]
    # the draft is the target: speculation accepts both drafted tokens, so a step yields 3
    # tokens (a reader that falls behind a step gets two steps' tokens in one message)
    assert max(sizes) >= 3 and sum(sizes) == 24
    tokens, text, finish = stream(client, req)
    once = client.generate_once(req, timeout=60)
    assert tokens == list(once.token_ids) and len(tokens) == 24
    assert finish.speculation.accepted_tokens > 0
    assert text == once.text
    assert finish.reason == pb.FINISH_REASON_LENGTH
    assert finish.usage.prompt_tokens == len(PROMPT) and finish.usage.completion_tokens == 24
    assert finish.slo_attained and finish.tpot_slo_ms == 10_000.0
    assert finish.timing.ttft_ms > 0 and finish.timing.mean_tpot_ms > 0
    assert not once.finish.HasField("slo_attained") or once.finish.slo_attained


def test_stream_equals_once_text_and_stop(client):
    req = build_request("héllo wörld ✓ def fib(n):", max_tokens=40, category="summarization")
    tokens, text, finish = stream(client, req)
    once = client.generate_once(req, timeout=60)
    assert tokens == list(once.token_ids)
    assert text == once.text
    assert finish.tpot_slo_ms == pytest.approx(5.0 * client.server_info().baseline_tpot_ms)
    # A stop string taken from the middle of that text: cut from streamed and unary text alike.
    if len(once.text) >= 6:
        stop = once.text[3:6]
        req2 = build_request("héllo wörld ✓ def fib(n):", max_tokens=40, stop=[stop])
        _, text2, finish2 = stream(client, req2)
        once2 = client.generate_once(req2, timeout=60)
        assert text2 == once2.text and stop not in text2
        assert finish2.reason == pb.FINISH_REASON_STOP


def test_stream_equals_once_seeded_sampling(client):
    req = build_request("def fib(n):", max_tokens=32, temperature=0.8, top_p=0.9, seed=7)
    tokens, text, _ = stream(client, req)
    once = client.generate_once(req, timeout=60)
    assert tokens == list(once.token_ids) and text == once.text


def test_64_concurrent_streams(client):
    n, max_tokens = 64, 8
    results: list = [None] * n
    errors: list = []

    def run(i: int) -> None:
        try:
            req = build_request([1 + i, 2, 3], max_tokens=max_tokens, category="chat")
            results[i] = stream(client, req, timeout=120)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors[:3]
    assert all(len(r[0]) == max_tokens and r[2].reason == pb.FINISH_REASON_LENGTH for r in results)
    wait_idle(client)


def test_cancel_and_deadline_free_slots(client):
    # 44 x 240 tokens through 4 slots takes many seconds; cancelled, they must leave at once.
    calls = [client.generate(build_request([7, i], max_tokens=240)) for i in range(44)]
    next(calls[0])
    info = client.server_info()
    assert info.slots_in_use >= 1 and info.queue_depth + info.running >= 8, info
    t0 = time.monotonic()
    for call in calls:
        call.cancel()
    wait_idle(client, timeout=2.0)
    cancel_s = time.monotonic() - t0
    # Deadlines: the same backlog with a 0.5 s deadline and no explicit cancel.
    futures = [
        client.stub.GenerateOnce.future(
            build_request([8, i], max_tokens=240), timeout=0.5, metadata=client.metadata
        )
        for i in range(44)
    ]
    codes = {f.exception().code() if f.exception() else grpc.StatusCode.OK for f in futures}
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes, codes
    wait_idle(client, timeout=2.0)
    assert cancel_s < 2.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(prompt=[], max_tokens=4), "prompt"),
        (dict(prompt=[1, 384], max_tokens=4), "vocab"),
        (dict(prompt=[1], max_tokens=0), "max_tokens"),
        (dict(prompt=[1], max_tokens=1000), "max_tokens"),
        (dict(prompt=[1], max_tokens=4, temperature=-1.0), "temperature"),
        (dict(prompt=[1], max_tokens=4, top_p=0.0), "top_p"),
        (dict(prompt=[1], max_tokens=4, top_k=-2), "top_k"),
        (dict(prompt=[1], max_tokens=4, seed=2**40), "seed"),
        (dict(prompt=[1], max_tokens=4, category="poetry"), "category"),
        (dict(prompt=[1], max_tokens=4, tpot_slo_ms=-5.0), "tpot_slo_ms"),
        (dict(prompt=[1], max_tokens=4, ttft_slo_ms=math.nan), "ttft_slo_ms"),
        (dict(prompt=[1], max_tokens=4, stop=[""]), "stop"),
    ],
)
def test_invalid_argument_names_field(client, kwargs, field):
    req = build_request(kwargs.pop("prompt"), **kwargs)
    for call in (client.generate_once, lambda r: list(client.generate(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()


def test_missing_prompt_is_invalid(client):
    with pytest.raises(grpc.RpcError) as err:
        client.generate_once(pb.GenerateRequest(max_tokens=4))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in err.value.details()


_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none())
bad_requests = st.builds(
    dict,
    prompt=st.one_of(
        st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6),
        st.lists(st.integers(0, 400), max_size=300),
        st.text(max_size=40),
    ),
    max_tokens=st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 6)),
    temperature=_floats,
    top_p=_floats,
    top_k=st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    tpot_slo_ms=_floats,
    ttft_slo_ms=_floats,
    stop=st.lists(st.text(max_size=4), max_size=3),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(bad_requests)
def test_fuzzed_requests_never_crash(client, kw):
    req = build_request(kw.pop("prompt"), **kw)
    try:
        once = client.generate_once(req, timeout=60)
        assert 1 <= len(once.token_ids) <= req.max_tokens
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    assert client.server_info().slots_total == MAX_BATCH  # still answering


def test_auth_required(server):
    req = build_request(PROMPT, max_tokens=2)
    for token in (None, "wrong-token"):
        c = Client(server.address, auth_token=token)
        for call in (c.server_info, c.generate_once, c.generate):
            with pytest.raises(grpc.RpcError) as err:
                out = call() if call == c.server_info else call(req)
                list(out) if call == c.generate else None
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        c.close()


def test_metrics_endpoint(server, client):
    client.generate_once(build_request(PROMPT, max_tokens=3, category="coding"))
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    for name in (
        'adaserve_requests_total{outcome="length"}',
        "adaserve_slo_requests_total{attained=",
        "adaserve_ttft_seconds_bucket",
        "adaserve_tpot_seconds_bucket",
        "adaserve_goodput_tokens_total",
        "adaserve_kv_slots_in_use 0.0",
        "adaserve_kv_slots_total 4.0",
        "adaserve_queue_depth",
        'adaserve_requests_total{outcome="invalid_argument"}',
    ):
        assert name in body, name


def test_sigterm_drains_in_flight_then_exits_0(server, client):
    """Runs last in this module: it stops the module's server (drain grace: 2 s).

    One short stream in flight completes; a backlog that cannot finish within the grace period
    is cancelled; the process exits 0 in bounded time.
    """
    call = client.generate(build_request([4, 5, 6], max_tokens=60), timeout=120)
    first = next(call)
    backlog = [
        client.stub.GenerateOnce.future(
            build_request([9, i], max_tokens=240, temperature=1.0, seed=i),  # few accepted
            timeout=120,
            metadata=client.metadata,
        )
        for i in range(120)
    ]
    deadline = time.monotonic() + 10
    # enough backlog that it cannot finish within the 2 s grace however fast the steps are
    while client.server_info().queue_depth < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(grpc.RpcError):  # no new requests while draining
        client.generate_once(build_request(PROMPT, max_tokens=2), timeout=10)
    tokens = list(first.token_ids)
    finish = None
    for msg in call:
        tokens += msg.token_ids
        if msg.HasField("finish"):
            finish = msg.finish
    assert finish is not None and finish.reason == pb.FINISH_REASON_LENGTH
    assert len(tokens) == 60
    assert server.proc.wait(30) == 0
    assert time.monotonic() - t0 < 2 + 15
    assert "grace period over" in server.log_path.read_text()
    codes = {f.exception().code() if f.exception() else grpc.StatusCode.OK for f in backlog}
    assert grpc.StatusCode.CANCELLED in codes or grpc.StatusCode.UNAVAILABLE in codes, codes

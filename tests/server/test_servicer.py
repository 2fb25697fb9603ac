"""The servicer against a fake engine (no jax): error mapping, isolation, TLS, text deltas."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from adaserve_jax.client import Client, build_request
from adaserve_jax.scheduler.request import FinishReason, Request, RequestState
from adaserve_jax.scheduler.service import QueueFullError
from adaserve_jax.server import adaserve_pb2 as pb
from adaserve_jax.server.app import GrpcServer, ServerConfig
from adaserve_jax.server.metrics import ServerMetrics
from adaserve_jax.server.servicer import GenerationServicer, TextStream

QUEUE_FULL, EXPLODE, LOOP_ERROR = 900, 901, 902  # magic first prompt tokens


class FakeHandle:
    """Emits tokens 10, 11, ... in chunks of 2 (as speculation would)."""

    def __init__(self, request: Request) -> None:
        self.state = RequestState(request, arrival=0.0)
        self.cancelled = threading.Event()

    def __iter__(self):
        first = self.state.request.prompt_ids[0]
        if first == EXPLODE:
            raise RuntimeError("boom")
        n = self.state.request.max_tokens
        for i in range(0, n, 2):
            chunk = [10 + j for j in range(i, min(i + 2, n))]
            self.state.output += chunk
            yield chunk
        self.state.first_token_time, self.state.last_token_time = 0.0, 0.001 * n
        self.state.finish_reason = FinishReason.LENGTH
        if first == LOOP_ERROR:
            self.state.finish_reason, self.state.error = FinishReason.ERROR, "step failed"

    def stream(self, min_interval_s=0.0):
        return iter(self)

    def wait(self, timeout=None):
        if self.state.finish_reason is None:
            for _ in self:
                pass
        return self.state

    def cancel(self) -> None:
        self.cancelled.set()


class FakeEngine:
    tokenizer = SimpleNamespace(decode=lambda ids: "".join(chr(97 + t % 26) for t in ids))
    num_slots, max_len, baseline_tpot_ms, service, draft_model = 2, 64, 30.0, None, None
    target_model = SimpleNamespace(
        config=SimpleNamespace(
            vocab_size=1000, num_layers=1, hidden_size=8, max_seq_len=64, num_params=lambda: 1
        ),
        path=Path("fake"),
    )

    def make_request(self, prompt, *, max_tokens, request_id=None, **kw) -> Request:
        ids = [ord(c) for c in prompt] if isinstance(prompt, str) else prompt
        if kw.get("category") not in (None, "chat"):
            raise ValueError(f"unknown SLO category {kw['category']!r}")
        return Request(request_id or "r", tuple(ids), max_tokens, stop=tuple(kw["stop"]))

    def submit(self, request: Request) -> FakeHandle:
        if request.prompt_ids[0] == QUEUE_FULL:
            raise QueueFullError("queue full")
        return FakeHandle(request)

    def output(self, state):
        text = self.tokenizer.decode(state.output)
        return SimpleNamespace(token_ids=list(state.output), text=text)

    def category_slo_ms(self, name: str) -> float:
        return 50.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return d


@pytest.fixture(scope="module", params=["plaintext", "tls"])
def fake_client(request, certs):
    tls = request.param == "tls"
    config = ServerConfig(
        port=0,
        max_workers=8,
        tls_cert=str(certs / "cert.pem") if tls else None,
        tls_key=str(certs / "key.pem") if tls else None,
    )
    server = GrpcServer(config, GenerationServicer(FakeEngine(), metrics=ServerMetrics()))
    server.start()
    client = Client(
        f"127.0.0.1:{server.port}",
        tls_ca=str(certs / "cert.pem") if tls else None,
        tls_server_name="localhost" if tls else None,
    )
    yield client
    client.close()
    server.drain(0)


def test_stream_chunks_and_finish(fake_client):
    msgs = list(fake_client.generate(build_request([1, 2], max_tokens=5)))
    assert [list(m.token_ids) for m in msgs[:-1]] == [[10, 11], [12, 13], [14]]
    assert "".join(m.text for m in msgs) == "klmno"
    assert msgs[-1].finish.reason == pb.FINISH_REASON_LENGTH
    assert msgs[-1].finish.usage.completion_tokens == 5


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (QUEUE_FULL, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EXPLODE, grpc.StatusCode.INTERNAL),
        (LOOP_ERROR, grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_fail_that_request_alone(fake_client, first, code):
    req = build_request([first, 1], max_tokens=4)
    for call in (fake_client.generate_once, lambda r: list(fake_client.generate(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == code
    once = fake_client.generate_once(build_request([1], max_tokens=3))  # still serving
    assert list(once.token_ids) == [10, 11, 12]


def test_unavailable_while_warming_up():
    server = GrpcServer(ServerConfig(port=0, max_workers=4), GenerationServicer())
    server.start()
    with Client(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate_once(build_request([1], max_tokens=3))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    server.drain(0)


def _decode_utf8(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_split_characters():
    data = list("aé✓b".encode())
    stream = TextStream(_decode_utf8)
    deltas = [stream.push(data[: i + 1]) for i in range(len(data))]
    assert "".join(deltas) == "aé✓b"
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_never_sends_stop_text():
    data = list(b"hello END world")
    stream = TextStream(_decode_utf8, stop=["END"])
    sent = "".join(stream.push(data[: i + 1]) for i in range(len(data)))
    assert sent == "hello "
    assert stream.finish("hello ") == ""


def test_server_layer_does_not_import_jax():
    code = (
        "import sys, adaserve_jax.server.app, adaserve_jax.client; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'orbax')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_message_interval_grows_with_streams_under_a_rate_budget():
    s = GenerationServicer(stream_interval_s=0.01, stream_rate=200.0)
    assert s.message_interval_s() == 0.01  # no stream in flight: the floor
    s._track(+16)
    assert s.message_interval_s() == pytest.approx(16 / 200.0)
    s._track(-16)
    assert GenerationServicer(stream_interval_s=0.02).message_interval_s() == 0.02
    with pytest.raises(ValueError, match="stream_rate"):
        GenerationServicer(stream_rate=-1.0)

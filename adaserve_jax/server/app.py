"""Build and run the gRPC server: Generation + grpc.health.v1 + reflection, auth, TLS, metrics.

`GrpcServer` starts listening at once with health NOT_SERVING; `serve.py` warms the
engine up, calls `set_engine` (health SERVING), and on SIGTERM calls `drain`: health
NOT_SERVING, no new RPCs, in-flight RPCs get `grace` seconds, then the loop stops.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adaserve_jax.server import adaserve_pb2 as pb
from adaserve_jax.server import adaserve_pb2_grpc as pb_grpc
from adaserve_jax.server.metrics import ServerMetrics
from adaserve_jax.server.servicer import GenerationServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # adaserve.v1.Generation
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)  # load balancers probe without a token


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 512  # every open stream holds a worker thread
    max_concurrent_rpcs: int | None = 480  # beyond: RESOURCE_EXHAUSTED (keeps workers free)
    max_message_bytes: int = 4 * 1024 * 1024
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None
    metrics_port: int = 0  # 0 = no metrics endpoint

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"{self.port=} must be in [0, 65536)")
        if self.max_workers <= 0:
            raise ValueError(f"{self.max_workers=} must be > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"{self.tls_cert=} and {self.tls_key=}: give both or neither")
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("auth_token must be non-empty when given")


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Every call needs `authorization: Bearer <token>` (health checks excepted)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        if details.method.startswith(OPEN_METHOD_PREFIXES):
            return continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got = got.encode() if isinstance(got, str) else got
        if hmac.compare_digest(got, self._expected):
            return continuation(details)
        handler = continuation(details)
        return _deny(handler, "missing or invalid bearer token")


def _deny(handler: Any, message: str) -> Any:
    """A handler of the same streaming kind as `handler` that answers UNAUTHENTICATED."""

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class GrpcServer:
    def __init__(self, config: ServerConfig, servicer: GenerationServicer) -> None:
        self.config = config
        self.servicer = servicer
        interceptors = [BearerAuthInterceptor(config.auth_token)] if config.auth_token else []
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=options,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        pb_grpc.add_GenerationServicer_to_server(servicer, self.server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
            )
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        self._metrics_http = None

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> None:
        self.server.start()
        metrics: ServerMetrics | None = self.servicer.metrics
        if self.config.metrics_port and metrics is not None:
            from prometheus_client import start_http_server

            self._metrics_http, _ = start_http_server(
                self.config.metrics_port, addr=self.config.host, registry=metrics.registry
            )
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.config.metrics_port)

    def set_engine(self, engine: Any) -> None:
        self.servicer.set_engine(engine)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def drain(self, grace: float) -> bool:
        """Stop taking RPCs, give in-flight ones `grace` seconds; True if they all finished."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        engine = self.servicer.engine
        end = time.monotonic() + grace
        stopped = self.server.stop(grace)  # rejects new RPCs now, aborts the rest after grace
        # drained only if the count reached 0 before the deadline: just after it, gRPC's own
        # abort of the remaining RPCs also brings it to 0, which is no drain
        finished = False
        while time.monotonic() < end:
            if self.servicer.active == 0:
                finished = True
                break
            time.sleep(0.02)
        stopped.wait(grace + 5.0)
        service = getattr(engine, "service", None)
        if service is not None:
            service.drain(1.0)
            service.shutdown(timeout=5.0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        return finished

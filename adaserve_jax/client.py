"""gRPC client of `adaserve.v1.Generation` (no jax), and a streaming command line.

python -m adaserve_jax.client "def fib(n):" --tpot-slo-ms 40 --max-tokens 64
python -m adaserve_jax.client --token-ids 1,2,3 --category chat --port 50051
python -m adaserve_jax.client --info
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from adaserve_jax.server import adaserve_pb2 as pb
from adaserve_jax.server import adaserve_pb2_grpc as pb_grpc

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}


def build_request(
    prompt: str | Sequence[int],
    *,
    max_tokens: int,
    tpot_slo_ms: float | None = None,
    category: str | None = None,
    ttft_slo_ms: float | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    request_id: str = "",
) -> pb.GenerateRequest:
    """A `GenerateRequest`; `prompt` is text (str) or token ids."""
    if tpot_slo_ms is not None and category is not None:
        raise ValueError("give tpot_slo_ms or category, not both")
    msg = pb.GenerateRequest(max_tokens=max_tokens, stop=list(stop), request_id=request_id)
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids.ids.extend(int(t) for t in prompt)
    if tpot_slo_ms is not None:
        msg.tpot_slo_ms = tpot_slo_ms
    if category is not None:
        msg.category = category
    for name, value in (
        ("ttft_slo_ms", ttft_slo_ms),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("seed", seed),
    ):
        if value is not None:
            setattr(msg, name, value)
    return msg


class Client:
    """A channel to one server; `auth_token` adds `authorization: Bearer ...` to every call."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        auth_token: str | None = None,
        tls_ca: str | None = None,
        tls_server_name: str | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()

    def generate(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> Iterator[pb.GenerateResponse]:
        """Stream responses (cancel the returned call object to stop early)."""
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def generate_once(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> pb.GenerateResponse:
        return self.stub.GenerateOnce(request, timeout=timeout, metadata=self.metadata)

    def server_info(self, *, timeout: float | None = 10.0) -> pb.ServerInfoResponse:
        return self.stub.ServerInfo(pb.ServerInfoRequest(), timeout=timeout, metadata=self.metadata)

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("prompt", nargs="?", help="prompt text")
    p.add_argument("--token-ids", type=_ints, help="comma-separated prompt token ids")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--max-tokens", type=int, default=64)
    slo = p.add_mutually_exclusive_group()
    slo.add_argument("--tpot-slo-ms", type=float)
    slo.add_argument("--category", help="SLO category (coding, chat, summarization)")
    p.add_argument("--ttft-slo-ms", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument(
        "--auth-token",
        default=os.environ.get("ADASERVE_AUTH_TOKEN"),
        help="bearer token (default: $ADASERVE_AUTH_TOKEN)",
    )
    p.add_argument("--tls-ca", help="PEM CA bundle: connect with TLS")
    p.add_argument("--tls-server-name", help="expected TLS server name (override)")
    p.add_argument("--info", action="store_true", help="print ServerInfo and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = Client(
        f"{args.host}:{args.port}",
        auth_token=args.auth_token,
        tls_ca=args.tls_ca,
        tls_server_name=args.tls_server_name,
    )
    try:
        if args.info:
            print(client.server_info())
            return 0
        if (args.prompt is None) == (args.token_ids is None):
            print("error: give a prompt or --token-ids (not both)", file=sys.stderr)
            return 2
        request = build_request(
            args.prompt if args.prompt is not None else args.token_ids,
            max_tokens=args.max_tokens,
            tpot_slo_ms=args.tpot_slo_ms,
            category=args.category,
            ttft_slo_ms=args.ttft_slo_ms,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop,
        )
        text_mode = args.prompt is not None
        if text_mode:
            sys.stdout.write(args.prompt)
        finish = None
        for msg in client.generate(request, timeout=args.timeout):
            if text_mode and msg.text:
                sys.stdout.write(msg.text)
            elif not text_mode and msg.token_ids:
                sys.stdout.write(" ".join(map(str, msg.token_ids)) + " ")
            sys.stdout.flush()
            if msg.HasField("finish"):
                finish = msg.finish
        sys.stdout.write("\n")
        if finish is not None:
            t = finish.timing
            slo = ""
            if finish.HasField("slo_attained"):
                verdict = "attained" if finish.slo_attained else "missed"
                slo = f"; SLO {finish.tpot_slo_ms:.1f} ms {verdict}"
            print(
                f"[{finish.usage.completion_tokens} tokens; finish={FINISH_NAMES[finish.reason]}; "
                f"TTFT {t.ttft_ms:.1f} ms; TPOT {t.mean_tpot_ms:.1f} ms{slo}]",
                file=sys.stderr,
            )
        return 0
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())

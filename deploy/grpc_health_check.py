"""Container health probe: exit 0 when the server's grpc.health.v1 Check answers SERVING.

Used by the image's HEALTHCHECK (Docker has no native gRPC probe; Kubernetes does, and the
manifests use it instead). It needs only grpcio and grpcio-health-checking, both installed
with the service, so no downloaded probe binary is shipped::

    python grpc_health_check.py              # 127.0.0.1:$GRPC_PORT (default 50051), service ""
    python grpc_health_check.py --address HOST:50051 \
        --service two_tower.retrieval.v1.RetrievalService
    python grpc_health_check.py --tls-ca /tls/ca.crt    # a TLS port (serve --tls-cert …)

A server with mutual TLS also wants --tls-cert and --tls-key. No token is needed:
grpc.health.v1 is open on a server with --auth-tokens-*.

Exit status: 0 SERVING; 1 anything else (NOT_SERVING while loading or draining, unknown
service, unreachable server, deadline), with one line on stderr saying which.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    request = health_pb2.HealthCheckRequest(service=args.service)
    try:
        with _channel(args) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"{args.address} service {args.service!r}: {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"{args.address} service {args.service!r}: {status}", file=sys.stderr)
        return 1
    return 0


def _channel(args) -> grpc.Channel:
    if not (args.tls or args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.address)
    ca, cert, key = (_read(path) for path in (args.tls_ca, args.tls_cert, args.tls_key))
    name = args.tls_server_name
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(ca, key, cert), options)


def _read(path: str | None) -> bytes | None:
    try:
        return open(path, "rb").read() if path else None
    except OSError as exc:
        raise SystemExit(f"cannot read {path}: {exc.strerror}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=f"127.0.0.1:{os.environ.get('GRPC_PORT', '50051')}",
                        help="HOST:PORT of the server (default: 127.0.0.1:$GRPC_PORT or 50051)")
    parser.add_argument("--service", default="",
                        help="service name to check; '' = the server as a whole")
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline in seconds")
    parser.add_argument("--tls", action="store_true",
                        help="TLS trusting the system's CAs (implied by --tls-ca/--tls-cert)")
    parser.add_argument("--tls-ca", help="PEM CA of the server's certificate")
    parser.add_argument("--tls-cert", help="PEM client certificate (server with mutual TLS)")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")
    parser.add_argument("--tls-server-name",
                        help="name the server's certificate must carry (default: the host)")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())

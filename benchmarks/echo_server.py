"""The ceiling of Python gRPC on this machine: RetrievalService/Retrieve with a canned reply.

No model, no index, no feature store: each call copies a prebuilt RetrieveResponse of
``min(k, 1000)`` candidates (ids and versions shaped like the real ones, so the reply has
the real size) and echoes the request id. What the load test measures against it is the
cost of grpc.aio, protobuf and the event loop alone, which the real server cannot beat.

    python -m benchmarks.echo_server --port 0 --port-file /tmp/port [--sync]

``--sync`` serves the same reply from gRPC's thread-pool server (``grpc.server``) instead
of grpc.aio: the other Python stack, for ``benchmarks.echo_stacks``.

Same command-line contract as `two-tower serve`: ``--port 0`` binds any free loopback
port, which is written to ``--port-file`` once serving; SIGTERM stops it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from concurrent import futures
from pathlib import Path

import grpc

from retrieval.signals import stop_signalled
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
MAX_K = 1000
# Shaped like real artifacts' versions: m-<UTC time>-<6 hex>, i-<UTC time>-<6 hex>.
MODEL_VERSION = "m-20261125T000000Z-ec40ec"
INDEX_VERSION = "i-20261125T000000Z-ec40ec"


def canned_reply(k: int) -> pb.RetrieveResponse:
    """k candidates "i{n}" with decreasing scores, as a 1000-item catalogue would give."""
    return pb.RetrieveResponse(
        candidates=[pb.Candidate(item_id=f"i{(37 * n) % MAX_K}", score=2.0 - n / MAX_K)
                    for n in range(k)],
        model_version=MODEL_VERSION, index_version=INDEX_VERSION)


class CannedReplies:
    """One prebuilt reply a k, copied for each call with the request's id."""

    def __init__(self) -> None:
        self._replies: dict[int, pb.RetrieveResponse] = {}

    def reply(self, request: pb.RetrieveRequest) -> pb.RetrieveResponse:
        k = min(max(request.k, 1), MAX_K)
        canned = self._replies.get(k)
        if canned is None:
            canned = self._replies[k] = canned_reply(k)
        reply = pb.RetrieveResponse()
        reply.CopyFrom(canned)  # one C-level copy; the canned message is never mutated
        reply.request_id = request.request_id
        return reply


class EchoServicer(pb_grpc.RetrievalServiceServicer):
    def __init__(self) -> None:
        self._canned = CannedReplies()

    async def Retrieve(self, request: pb.RetrieveRequest, context) -> pb.RetrieveResponse:
        return self._canned.reply(request)


class SyncEchoServicer(pb_grpc.RetrievalServiceServicer):
    """EchoServicer's reply from a thread of grpc.server's pool."""

    def __init__(self) -> None:
        self._canned = CannedReplies()

    def Retrieve(self, request: pb.RetrieveRequest, context) -> pb.RetrieveResponse:
        return self._canned.reply(request)


def serve_sync(host: str, port: int, port_file: Path | None, threads: int = 8) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    pb_grpc.add_RetrievalServiceServicer_to_server(SyncEchoServicer(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    log.info("echo server (grpc.server, %d threads) listening on %s:%d", threads, host, bound)
    if port_file is not None:
        port_file.write_text(str(bound))
    asyncio.run(stop_signalled())  # the main thread only waits for SIGTERM / SIGINT
    server.stop(2.0).wait()


async def serve(host: str, port: int, port_file: Path | None) -> None:
    server = grpc.aio.server()
    pb_grpc.add_RetrievalServiceServicer_to_server(EchoServicer(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    log.info("echo server listening on %s:%d", host, bound)
    if port_file is not None:
        port_file.write_text(str(bound))
    await stop_signalled()
    await server.stop(2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.echo_server",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50052, help="0 = any free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    parser.add_argument("--cpus", metavar="LIST",
                   help="run every thread on these CPUs (e.g. 0 or 0-1), as serve --cpu-affinity")
    parser.add_argument("--sync", action="store_true",
                        help="gRPC's thread-pool server (grpc.server) instead of grpc.aio")
    args = parser.parse_args(argv)
    if args.cpus:
        from retrieval.cpus import parse_cpu_list, pin_process

        pin_process(parse_cpu_list(args.cpus))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.sync:
        serve_sync(args.host, args.port, args.port_file)
    else:
        asyncio.run(serve(args.host, args.port, args.port_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

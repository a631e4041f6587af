"""Streams opened and never read: what they cost a server, and whether others still get in.

    python -m benchmarks.stream_abuse [--model M --index I --features D] [--workdir W]
        [--streams 5000[,20000…]] [--connections 1[,50…]] [--k 1000] [--wave 500]
        [--serve-arg=--flag=value …] [--name stream_abuse] [--out benchmarks/results]

A raw HTTP/2 client (no library: the frames it needs are a few lines each) opens
``--streams`` Retrieve calls, ``--wave`` at a time, spread over ``--connections``
connections after announcing an initial stream window of 0, so the server can send no
reply bytes: every reply stays in the server. It answers SETTINGS and PING, as a live
client does, and never reads. Meanwhile a normal client on its own connection calls
Retrieve; the table gives the server's RSS before, with the streams held, and after they
close, how many streams the server refused, and what the normal calls got.
``--serve-arg`` passes flags to ``two-tower serve`` (e.g.
``--serve-arg=--max-streams-per-connection=0`` for no per-connection limit).

Without ``--model``/``--index`` a small pipeline (2,000 items, so k=1000 replies are full)
is trained into ``--workdir`` once. Writes NAME.json and NAME.md to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

RETRIEVE = "/two_tower.retrieval.v1.RetrievalService/Retrieve"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
log = logging.getLogger("stream_abuse")


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + \
        struct.pack(">I", stream) + payload


def _hpack_string(text: str) -> bytes:
    raw = text.encode()
    if len(raw) < 127:
        return bytes((len(raw),)) + raw
    rest, out = len(raw) - 127, bytearray((127,))
    while rest >= 128:
        out.append(rest % 128 | 128)
        rest //= 128
    return bytes(out) + bytes((rest,)) + raw


def _headers_block(authority: str, path: str) -> bytes:
    """Literal fields without indexing (0x00 + name + value): no table, no Huffman."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path),
              (":authority", authority), ("content-type", "application/grpc"),
              ("te", "trailers")]
    return b"".join(b"\x00" + _hpack_string(n) + _hpack_string(v) for n, v in fields)


@dataclass
class HeldConnection:
    """One HTTP/2 connection whose streams the server may not send on (window 0)."""

    address: str
    sock: socket.socket = field(init=False)
    next_stream: int = 1
    refused: int = 0       # streams the server reset (RST_STREAM)
    answered: int = 0      # streams that got response headers
    goaway: bool = False
    closed: bool = False

    def __post_init__(self) -> None:
        host, port = self.address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self._lock = threading.Lock()
        # SETTINGS_INITIAL_WINDOW_SIZE (4) = 0, SETTINGS_ENABLE_PUSH (2) = 0
        self._send(PREFACE + _frame(SETTINGS, 0, 0, struct.pack(">HIHI", 4, 0, 2, 0)))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def open(self, n: int, message: bytes, path: str = RETRIEVE) -> None:
        block = _headers_block(self.address, path)
        body = b"\x00" + struct.pack(">I", len(message)) + message
        frames = bytearray()
        for _ in range(n):
            sid, self.next_stream = self.next_stream, self.next_stream + 2
            frames += _frame(HEADERS, END_HEADERS, sid, block)
            frames += _frame(DATA, END_STREAM, sid, body)
            if len(frames) > 1 << 16:
                self._send(bytes(frames))
                frames.clear()
        self._send(bytes(frames))

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _send(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def _read(self) -> None:
        buffer = b""
        try:
            while not self.closed:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, flags = buffer[3], buffer[4]
                    payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
                    self._on_frame(kind, flags, payload)
        except OSError:
            return

    def _on_frame(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            self._send(_frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self._send(_frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self.refused += 1
        elif kind == HEADERS:
            self.answered += 1
        elif kind == GOAWAY:
            self.goaway = True


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


def retrieve_message(user_id: str, k: int) -> bytes:
    from retrieval.client import build_request

    return build_request(user_id, k, {"hour_of_day": 22, "device": "tv"},
                         1_700_611_200).SerializeToString()


def normal_calls(address: str, n: int, timeout_s: float = 5.0) -> dict[str, int]:
    """``n`` Retrieve calls one after another on a connection of their own: codes."""
    import grpc

    from retrieval.v1 import retrieval_pb2 as pb
    from retrieval.v1 import retrieval_pb2_grpc as pb_grpc

    codes: dict[str, int] = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        for i in range(n):
            try:
                stub.Retrieve(pb.RetrieveRequest.FromString(retrieve_message(f"u{i}", 10)),
                              timeout=timeout_s)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1
    return codes


def hold(address: str, streams: int, connections: int, message: bytes,
         wave: int = 0, pause_s: float = 0.2) -> list[HeldConnection]:
    """``streams`` spread over ``connections``; with ``wave``, at most that many at a time
    with a pause between (a burst runs into gRPC's own pending-call limit sooner)."""
    held = [HeldConnection(address) for _ in range(connections)]
    left = [streams // connections + (i < streams % connections) for i in range(connections)]
    while any(left):
        for i, conn in enumerate(held):
            n = min(left[i], max(1, wave // connections) if wave else left[i])
            conn.open(n, message)
            left[i] -= n
        if wave and any(left):
            time.sleep(pause_s)
    return held


@dataclass
class Row:
    streams: int
    connections: int
    serve_args: str
    rss_before_mb: float
    rss_held_mb: float
    rss_after_mb: float
    refused: int
    normal_codes: dict[str, int]
    traceback_lines: int
    log_lines: int


def measure(pid: int, address: str, log_path: Path, streams: int, connections: int,
            k: int, serve_args: str, wave: int, settle_s: float = 3.0) -> Row:
    offset = log_path.stat().st_size
    before = rss_mb(pid)
    held = hold(address, streams, connections, retrieve_message("u1", k), wave)
    time.sleep(settle_s)
    held_rss = rss_mb(pid)
    codes = normal_calls(address, 20)
    for conn in held:
        conn.close()
    time.sleep(settle_s)
    text = log_path.read_bytes()[offset:].decode(errors="replace")
    return Row(streams, connections, serve_args, round(before, 1), round(held_rss, 1),
               round(rss_mb(pid), 1), sum(c.refused for c in held), codes,
               text.count("Traceback"), text.count("\n"))


def _table(rows: list[Row]) -> str:
    lines = ["| streams held | connections | serve flags | RSS before (MB) | RSS held (MB) | "
             "RSS after close (MB) | streams refused | 20 normal calls | tracebacks in log |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        codes = ", ".join(f"{c} {n}" for c, n in sorted(r.normal_codes.items()))
        lines.append(f"| {r.streams:,} | {r.connections} | {r.serve_args or '(defaults)'} | "
                     f"{r.rss_before_mb} | {r.rss_held_mb} | {r.rss_after_mb} | {r.refused:,} | "
                     f"{codes} | {r.traceback_lines} |")
    return "\n".join(lines)


def ensure_pipeline(workdir: Path) -> tuple[Path, Path, Path]:
    """A small trained pair with 2,000 items (k=1000 replies are full), made once."""
    from contracts.dataset import write_dataset
    from indexer.build import IndexSpec
    from indexer.job import JobOptions, run_build_index
    from training.pipeline import run_training
    from training.synthetic import SyntheticConfig, generate_synthetic
    from training.train import TrainConfig

    done = workdir / "pipeline.json"
    if done.exists():
        paths = json.loads(done.read_text())
        return Path(paths["model"]), Path(paths["index"]), Path(paths["data"])
    dataset, spec_toml = generate_synthetic(SyntheticConfig(
        num_users=500, num_items=2000, num_clusters=8, interactions_per_user=15, seed=3))
    write_dataset(dataset, workdir / "data", spec_toml)
    model_dir, _ = run_training(dataset, workdir / "models", TrainConfig(epochs=2))
    index_dir = run_build_index(model_dir, workdir / "indexes", IndexSpec("Flat"),
                                JobOptions(items=workdir / "data"))
    done.write_text(json.dumps({"model": str(model_dir), "index": str(index_dir),
                                "data": str(workdir / "data")}))
    return model_dir, index_dir, workdir / "data"


def start(model: Path, index: Path, features: Path, workdir: Path,
          serve_args: list[str]) -> tuple[subprocess.Popen, str, Path]:
    from app.processes import wait_for_port_file

    port_file, log_path = workdir / "port", workdir / "server.log"
    port_file.unlink(missing_ok=True)
    with open(log_path, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--model", str(model), "--index",
             str(index), "--features", str(features), "--port", "0", "--port-file",
             str(port_file), *serve_args], stdout=out, stderr=subprocess.STDOUT)
    port = wait_for_port_file(process, port_file, log_path, 120.0)[0]
    return process, f"127.0.0.1:{port}", log_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--index", type=Path)
    p.add_argument("--features", type=Path)
    p.add_argument("--workdir", type=Path, default=Path("artifacts/stream_abuse"))
    p.add_argument("--streams", default="5000")
    p.add_argument("--connections", default="1", help="comma-separated: one run each")
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--wave", type=int, default=500,
                   help="streams opened at a time, 0.2 s apart (0: all at once)")
    p.add_argument("--serve-arg", action="append", default=[])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="stream_abuse", help="file name of the results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        args.model, args.index, args.features = ensure_pipeline(args.workdir)
    rows = []
    runs = [(int(s), int(c)) for c in args.connections.split(",")
            for s in args.streams.split(",")]
    for streams, connections in runs:
        process, address, log_path = start(args.model, args.index, args.features,
                                           args.workdir, args.serve_arg)
        try:
            rows.append(measure(process.pid, address, log_path, streams, connections,
                                args.k, " ".join(args.serve_arg), args.wave))
            log.info("%s", rows[-1])
        finally:
            process.terminate()
            process.wait(timeout=30)
    table = _table(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    (args.out / f"{args.name}.json").write_text(json.dumps(
        {"measured_at": stamp, "k": args.k, "rows": [asdict(r) for r in rows]}, indent=2))
    (args.out / f"{args.name}.md").write_text(
        f"Measured {stamp} with `python -m benchmarks.stream_abuse "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

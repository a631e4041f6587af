"""`serve --workers N`: N serving processes on one port, under one supervisor.

A `serve` process is bound by its GIL to about one core (plus the Faiss threads). Here the
supervisor starts N workers, each a whole server (retrieval.server) with its own event
loop, GIL, Redis connections and version watcher, all listening on the same port with
SO_REUSEPORT: the kernel spreads new connections over the workers that listen (a
connection, with every call on it, stays with the worker that accepted it).

    supervisor   reserves the port (bound, not listening: it takes no connections),
                 serves the one /metrics, forwards SIGTERM, restarts a worker that dies
    worker i     loads the pair, then binds the port and answers; on SIGTERM drains

- Port: the supervisor binds host:port with SO_REUSEPORT first (port 0: the kernel picks
  one) and hands the bound port to every worker; a worker binds it only once loaded, so a
  worker that is starting or restarting is never handed a connection.
- Health: grpc.health.v1 is answered on the port by whichever worker accepted the
  connection; before the first worker has loaded, connections are refused.
- Metrics: each worker writes its values to files in a private PROMETHEUS_MULTIPROC_DIR;
  the supervisor's /metrics sums them (retrieval.metrics says how each gauge combines) and
  adds its own: two_tower_workers, two_tower_worker_restarts_total.
- SIGTERM/SIGINT: forwarded to every worker, which reports NOT_SERVING and drains for
  ``grace_seconds``; the supervisor exits 0 once all have exited 0 (a straggler is killed
  ``STOP_MARGIN_S`` after the grace and the exit is 1).
- A worker that exits unasked is logged with its exit status, counted and started again;
  more than ``max_restarts`` such exits within ``restart_window_s`` (a crash loop) stop
  every worker and exit 1. A worker that fails before the first all-SERVING start stops
  the whole start with its exit status.
- CPUs: with ``serve --cpu-affinity``, worker i runs every thread on the CPUs of
  ``SupervisorConfig.placement[i]`` (retrieval.cpus), a worker started again on the same.
- Version swaps: each worker follows CURRENT on its own, so for a moment two workers may
  serve different pairs; each reply names its model and index version, and within a worker
  a call is answered by one consistent pair (retrieval.swap).

The workers are started as ``python -m retrieval.workers`` with their configuration as
JSON on stdin (``encode_config``; no pickle anywhere in the service); each asks the kernel
for SIGTERM should the supervisor die. `serve` runs the supervisor with ``exec_supervisor``:
the process is replaced (same pid) by ``python -m retrieval.workers --supervisor``, which
imports this module alone, so what the command imported to build the configuration
(grpc, NumPy, Faiss, Redis; about 45 MB of heap) is not kept beside the workers.
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import importlib
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger(__name__)

STOP_MARGIN_S = 15.0   # past the drain grace, time for a worker's loop and threads to end
POLL_S = 0.2           # how often exits are checked when no signal arrives


@dataclass(frozen=True)
class SupervisorConfig:
    workers: int
    max_restarts: int = 5        # unasked exits tolerated within the window …
    restart_window_s: float = 60.0  # … beyond that, a crash loop: stop and exit 1
    log_format: str = "text"
    # worker i runs on placement[i]'s CPUs (retrieval.cpus.place_workers); (): no pinning
    placement: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not (
                1 <= self.workers <= 256):
            raise ValueError(f"workers must be an integer in [1, 256] (got {self.workers!r})")
        if self.max_restarts < 0 or self.restart_window_s <= 0:
            raise ValueError("max_restarts must be >= 0 and restart_window_s > 0 (got "
                             f"{self.max_restarts!r}, {self.restart_window_s!r})")
        # JSON (exec_supervisor) brings the placement back as lists
        object.__setattr__(self, "placement", tuple(tuple(g) for g in self.placement))
        if self.placement and (len(self.placement) != self.workers
                               or not all(self.placement)):
            raise ValueError(f"placement must name the CPUs of each of the {self.workers} "
                             f"workers (got {len(self.placement)} groups)")


@dataclass(frozen=True)
class Serving:
    """What the supervisor uses of a retrieval.server.ServerConfig, with the whole of it
    encoded for the workers: the supervisor never needs retrieval.server itself."""

    config: dict                 # encode_config(ServerConfig), on the reserved port
    host: str
    port: int
    metrics_port: int | None
    grace_seconds: float

    @classmethod
    def of(cls, server, port: int) -> Serving:
        server = dataclasses.replace(server, port=port)
        return cls(encode_config(server), server.host, port, server.metrics_port,
                   server.grace_seconds)

    def worker_config(self, index: int, cpus: tuple[int, ...] | None = None) -> dict:
        """Worker ``index``'s configuration (encoded): the server's, without /metrics, on
        ``cpus`` when given."""
        fields = {**self.config["fields"], "worker": index, "metrics_port": None}
        if cpus:
            fields["cpus"] = encode_config(tuple(cpus))
        return {**self.config, "fields": fields}


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen
    port_file: Path
    serving: bool = False


class Supervisor:
    def __init__(self, server: Serving, supervision: SupervisorConfig, run_dir: Path) -> None:
        self.server, self.supervision, self.run_dir = server, supervision, run_dir
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.all_serving_once = False  # every worker was SERVING once: the start is over
        self.crashes: deque[float] = deque()
        self.registry = CollectorRegistry()
        self.restarts = Counter("two_tower_worker_restarts_total",
                                "Workers started again after exiting unasked",
                                registry=self.registry)
        live = Gauge("two_tower_workers", "Worker processes running", registry=self.registry)
        live.set_function(lambda: sum(w.process.poll() is None for w in self.workers.values()))

    # --- starting --------------------------------------------------------------------------

    def start_worker(self, index: int) -> None:
        port_file = self.run_dir / f"worker-{index}.port"
        port_file.unlink(missing_ok=True)
        process = subprocess.Popen([sys.executable, "-m", "retrieval.workers"],
                                   stdin=subprocess.PIPE, env=self._env(),
                                   # not the terminal's group: Ctrl-C reaches the
                                   # supervisor alone, which forwards one SIGTERM
                                   process_group=0)
        assert process.stdin is not None
        with process.stdin:
            process.stdin.write(json.dumps({
                "config": self.server.worker_config(index, self._cpus(index)),
                "port_file": str(port_file),
                "log_format": self.supervision.log_format, "parent": os.getpid()}).encode())
        self.workers[index] = _Worker(index, process, port_file)
        log.info("worker %d started (pid %d)", index, process.pid)

    def _cpus(self, index: int) -> tuple[int, ...] | None:
        placement = self.supervision.placement
        return placement[index] if placement else None

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.run_dir / "metrics")}

    def all_serving(self) -> bool:
        for worker in self.workers.values():
            worker.serving = worker.serving or worker.port_file.exists()
        return all(w.serving for w in self.workers.values())

    # --- watching --------------------------------------------------------------------------

    def check_exits(self) -> int | None:
        """Restart workers that exited unasked; an exit status to end with, or None."""
        for worker in list(self.workers.values()):
            code = worker.process.poll()
            if code is None or self.stopping:
                continue
            mark_process_dead(worker.process.pid, str(self.run_dir / "metrics"))
            if not worker.serving and not self.all_serving_once:
                log.error("worker %d exited with %s while starting: stopping", worker.index,
                          _status(code))
                return code or 1
            now = time.monotonic()
            self.crashes.append(now)
            while self.crashes and self.crashes[0] < now - self.supervision.restart_window_s:
                self.crashes.popleft()
            if len(self.crashes) > self.supervision.max_restarts:
                log.error("worker %d exited with %s: %d unasked exits within %g s, a crash "
                          "loop; stopping every worker", worker.index, _status(code),
                          len(self.crashes), self.supervision.restart_window_s)
                return 1
            log.error("worker %d (pid %d) exited unasked with %s: starting it again",
                      worker.index, worker.process.pid, _status(code))
            self.restarts.inc()
            self.start_worker(worker.index)
        return None

    # --- stopping --------------------------------------------------------------------------

    def signal_all(self, sig: int) -> None:
        for worker in self.workers.values():
            if worker.process.poll() is None:
                try:
                    worker.process.send_signal(sig)
                except ProcessLookupError:
                    pass

    def stop(self) -> int:
        """SIGTERM every worker, wait for their drain; 0 when all exited 0."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.server.grace_seconds + STOP_MARGIN_S
        clean = True
        for worker in self.workers.values():
            try:
                code = worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time: killed", worker.index)
                worker.process.kill()
                code = worker.process.wait()
            if code == -signal.SIGTERM and not worker.serving:
                log.info("worker %d stopped while loading", worker.index)
            elif code != 0:
                clean = False
                log.error("worker %d stopped with %s", worker.index, _status(code))
        return 0 if clean else 1


def supervise(server, supervision: SupervisorConfig, port_file: Path | None = None) -> int:
    """Run ``supervision.workers`` workers of ``server`` (a retrieval.server.ServerConfig)
    on its port until SIGTERM/SIGINT; returns the exit status."""
    reserved = _reserve(server.host, server.port)
    try:
        return _supervise(Serving.of(server, reserved.getsockname()[1]), supervision, port_file)
    finally:
        reserved.close()


def exec_supervisor(server, supervision: SupervisorConfig,
                    port_file: Path | None = None) -> NoReturn:
    """``supervise``, in a fresh interpreter that replaces this process (same pid, exit
    status and signals) and imports only this module (see the module docstring). The port
    is reserved first: a port that cannot be bound raises OSError here, as in
    ``supervise``. The state crosses in an anonymous in-memory file, not on the command
    line or in the environment (it may hold TLS keys and tokens)."""
    reserved = _reserve(server.host, server.port)
    reserved.set_inheritable(True)
    state = {"serving": dataclasses.asdict(Serving.of(server, reserved.getsockname()[1])),
             "supervision": dataclasses.asdict(supervision), "socket": reserved.fileno(),
             "port_file": None if port_file is None else str(port_file)}
    fd = os.memfd_create("two-tower-supervisor", 0)  # inheritable: flags without CLOEXEC
    with os.fdopen(fd, "wb", closefd=False) as state_file:
        state_file.write(json.dumps(state).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "retrieval.workers", "--supervisor", str(fd)])


def _supervisor_main(fd: int) -> int:
    """``python -m retrieval.workers --supervisor FD``: what ``exec_supervisor`` started."""
    from retrieval.logs import configure_logging

    with os.fdopen(fd, "rb") as state_file:
        state = json.load(state_file)
    supervision = SupervisorConfig(**state["supervision"])
    configure_logging(supervision.log_format)
    reserved = socket.socket(fileno=state["socket"])
    reserved.set_inheritable(False)  # not handed on to the workers
    port_file = state["port_file"]
    try:
        return _supervise(Serving(**state["serving"]), supervision,
                          None if port_file is None else Path(port_file))
    except (ValueError, OSError) as exc:  # as the `serve` command reports them
        print(f"two-tower serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        reserved.close()


def _supervise(server: Serving, supervision: SupervisorConfig, port_file: Path | None) -> int:
    """Run the workers on the port ``server`` names (reserved by the caller)."""
    run_dir = Path(tempfile.mkdtemp(prefix="two-tower-serve-"))
    (run_dir / "metrics").mkdir()
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    handlers = {sig: signal.signal(sig, lambda *_: _wake(wakeup_w))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(Supervisor(server, supervision, run_dir), port_file, wakeup_r)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.close(wakeup_r)
        os.close(wakeup_w)
        shutil.rmtree(run_dir, ignore_errors=True)


def _run(supervisor: Supervisor, port_file: Path | None, wakeup_r: int) -> int:
    server = supervisor.server
    log.info("starting %d workers on %s:%d", supervisor.supervision.workers, server.host,
             server.port)
    for index in range(supervisor.supervision.workers):
        supervisor.start_worker(index)
    selector = selectors.DefaultSelector()
    selector.register(wakeup_r, selectors.EVENT_READ)
    try:
        while True:
            if selector.select(POLL_S):
                os.read(wakeup_r, 512)
                log.info("stopping: SIGTERM to %d workers, draining for up to %.1fs",
                         len(supervisor.workers), server.grace_seconds)
                return supervisor.stop()
            code = supervisor.check_exits()
            if code is not None:
                supervisor.stop()
                return code
            if not supervisor.all_serving_once and supervisor.all_serving():
                supervisor.all_serving_once = True
                _announce(supervisor, port_file)
    except BaseException:
        supervisor.stop()
        raise
    finally:
        selector.close()


def _announce(supervisor: Supervisor, port_file: Path | None) -> None:
    server = supervisor.server
    ports = [server.port]
    if server.metrics_port is not None:
        registry = supervisor.registry
        _WorkerMetrics(registry, str(supervisor.run_dir / "metrics"))  # registers itself
        http, _ = start_http_server(server.metrics_port, server.host, registry=registry)
        ports.append(http.server_port)
        log.info("metrics of every worker on http://%s:%d/metrics", server.host, ports[1])
    log.info("SERVING with %d workers on %s:%d", len(supervisor.workers), server.host,
             server.port)
    if port_file is not None:  # as a single `serve` writes it: "PORT [METRICS_PORT]"
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(" ".join(map(str, ports)))
        os.replace(tmp, port_file)


class _WorkerMetrics(MultiProcessCollector):
    """The workers' files, summed; a series a worker has left (a pair it no longer
    serves, set to 0 since a file cannot drop it) is left out."""

    def collect(self):
        for metric in super().collect():
            if metric.name == "two_tower_serving_info":
                metric.samples = [s for s in metric.samples if s.value != 0]
            yield metric


def _reserve(host: str, port: int) -> socket.socket:
    """host:port bound with SO_REUSEPORT and not listening: no other program takes the
    port while workers start and restart, and no connection is queued on it here."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind {host}:{port}: {exc.strerror}") from exc
    return sock


def _wake(fd: int) -> None:
    try:
        os.write(fd, b"x")
    except BlockingIOError:  # the pipe is full: a wake-up is already pending
        pass


def _status(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit status {code}"


# --- a worker ----------------------------------------------------------------------------

_MODULES = ("retrieval.", "contracts.")  # where a configuration's dataclasses may come from


def encode_config(value):
    """A configuration (frozen dataclasses of numbers, text, paths, bytes, tuples) as
    JSON-ready data that ``decode_config`` turns back into an equal object."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"dataclass": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: encode_config(getattr(value, f.name))
                           for f in dataclasses.fields(value) if f.init}}
    if isinstance(value, Path):
        return {"path": str(value)}
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    if isinstance(value, tuple | frozenset):
        return {type(value).__name__: [encode_config(v) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot pass a {type(value).__name__} to a worker: {value!r:.80}")


def decode_config(data):
    if not isinstance(data, dict):
        return data
    if "dataclass" in data:
        module, _, name = data["dataclass"].partition(":")
        if not module.startswith(_MODULES):
            raise ValueError(f"a worker's configuration names {module!r}")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: decode_config(v) for k, v in data["fields"].items()})
    (kind, value), = data.items()
    if kind == "path":
        return Path(value)
    if kind == "bytes":
        return base64.b64decode(value)
    return {"tuple": tuple, "frozenset": frozenset}[kind](decode_config(v) for v in value)



def _die_with_parent(parent: int) -> None:
    """SIGTERM to this process when the supervisor dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main() -> int:
    import asyncio

    from contracts.errors import TwoTowerError
    from retrieval.logs import configure_logging

    start = json.load(sys.stdin)
    _die_with_parent(start["parent"])
    configure_logging(start["log_format"])
    config, port_file = decode_config(start["config"]), Path(start["port_file"])
    from retrieval.server import serve

    try:
        asyncio.run(serve(config, port_file))
    except (TwoTowerError, ValueError, OSError) as exc:
        print(f"two-tower serve: worker {config.worker}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--supervisor"]:
        raise SystemExit(_supervisor_main(int(sys.argv[2])))
    raise SystemExit(_worker_main())

"""Starting and stopping the processes a demo, a test or a benchmark runs beside itself:
redis-server and `two-tower serve` children on 127.0.0.1 and free ports. (The signal wait
every gRPC server of ours stops on is retrieval.signals.stop_signalled.)

    redis = RedisProcess.start(workdir)        # redis://127.0.0.1:PORT/0, no persistence
    server = ServeProcess.start(["--model", M, "--index", I], workdir)
    ...                                        # server.address, server.rss_kib()
    server.stop(); redis.stop()

Everything here is the real program: nothing is mocked.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from retrieval.os_threads import thread_times

REDIS_START_TIMEOUT_S = 10.0
SERVE_START_TIMEOUT_S = 120.0
CLI = (sys.executable, "-m", "app.cli")


class ProcessStartError(RuntimeError):
    """A child did not come up: names the program and ends with its log's tail."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS), in KiB; 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines()
                 if line.startswith("VmRSS:")), 0)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the workers of `serve --workers N`)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def pss_kib(pid: int) -> int:
    """Proportional memory of ``pid`` (Pss of /proc/PID/smaps_rollup): each shared page
    divided among the processes that map it; 0 once it has exited."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return next((int(line.split()[1]) for line in rollup.splitlines()
                 if line.startswith("Pss:")), 0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used (/proc/PID/stat), 0 once it has exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids_mapping(directories: Sequence[str | Path], exclude: Sequence[int] = ()
                 ) -> dict[int, str]:
    """Processes that map a file under one of ``directories`` (/proc/PID/maps), each with
    the first such file: the sharers a proportional memory (PSS) divides pages with.
    Processes this user may not read are skipped."""
    prefixes = tuple(str(Path(d).resolve()).rstrip("/") + "/" for d in directories)
    skip = {os.getpid(), *exclude}
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            maps = (entry / "maps").read_text()
        except (OSError, ProcessLookupError):
            continue
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
            path = fields[5] if len(fields) == 6 else ""
            if path.startswith(prefixes):
                found[int(entry.name)] = path
                break
    return found


def thread_cpu_seconds(*pids: int) -> dict[str, float]:
    """CPU time of the threads of ``pids`` alive now, summed by the thread's OS name
    (retrieval.os_threads.thread_times): ``main`` for a process's first thread (in
    ``serve``, the event loop), else e.g. ``retrieve-work`` or gRPC's ``event_engine``.
    {} once they have exited."""
    out: dict[str, float] = {}
    for pid in pids:
        for name, seconds in thread_times(pid).values():
            out[name] = out.get(name, 0.0) + seconds
    return out


def stop_process(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM (after SIGCONT: a paused process would not act on it), then SIGKILL after
    ``timeout_s``; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


# --- redis-server --------------------------------------------------------------------------


@dataclass
class RedisProcess:
    """A redis-server on 127.0.0.1 without persistence, that a test or benchmark may pause,
    kill and start again on the same port."""

    port: int
    process: subprocess.Popen
    directory: Path
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, directory: Path, port: int | None = None,
              extra_args: Sequence[str] = (), attempts: int = 3) -> RedisProcess:
        """Started and answering PING; on a fixed ``port`` (to restart one where it was) or
        a free one, tried again on another when that was taken meanwhile."""
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(binary, os.X_OK):
            raise ProcessStartError("redis-server not found (looked on PATH and at "
                                    "/usr/bin/redis-server); `make test` installs it "
                                    "(apt-get install redis-server)")
        directory = directory.resolve()  # redis-server enters --dir before it opens --logfile
        directory.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            chosen = port or free_port()
            log = directory / f"redis-{chosen}.log"
            process = subprocess.Popen(
                [binary, "--bind", "127.0.0.1", "--port", str(chosen), "--save", "",
                 "--appendonly", "no", "--dir", str(directory), "--logfile", str(log),
                 *extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            redis = cls(chosen, process, directory, tuple(extra_args))
            if redis.wait_for_ping():
                return redis
            stop_process(process, 5)
        tail = log.read_text()[-500:] if log.exists() else "(no log)"
        raise ProcessStartError(f"redis-server did not answer PING after {attempts} "
                                f"attempts; last log {log}:\n{tail}")

    def wait_for_ping(self, timeout_s: float = REDIS_START_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                time.sleep(0.02)
        return False

    def restart(self) -> None:
        """A new redis-server on the same port (after ``kill``)."""
        started = RedisProcess.start(self.directory, self.port, self.extra_args)
        self.process = started.process

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def command(self, *args: str) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), *args], check=True,
                       capture_output=True, timeout=10)

    def stop(self) -> int:
        return stop_process(self.process, 5)


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """``with redis_server(dir) as url:`` a RedisProcess for the block, stopped after it."""
    redis = RedisProcess.start(directory)
    try:
        yield redis.url
    finally:
        redis.stop()


# --- `two-tower serve` -----------------------------------------------------------------------


def wait_for_port_file(process: subprocess.Popen, port_file: Path, log_path: Path,
                       timeout_s: float) -> list[int]:
    """The ports a `serve --port-file` child wrote once SERVING: [grpc] or [grpc, metrics].

    Raises RuntimeError with the end of ``log_path`` when the child exits first, and
    TimeoutError after ``timeout_s`` (the child is left to the caller)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path.exists() else "(no log)"
            raise RuntimeError(f"server exited with {process.returncode} before serving; "
                               f"log {log_path}:\n{tail}")
        ports = port_file.read_text().split() if port_file.exists() else []
        if ports:  # serve writes it with os.replace; other writers may be caught mid-write
            return [int(p) for p in ports]
        time.sleep(0.05)
    raise TimeoutError(f"server not SERVING after {timeout_s:.0f}s; see {log_path}")


@dataclass
class ServeProcess:
    """A `two-tower serve` child on a free port, once SERVING."""

    process: subprocess.Popen
    port: int
    log_path: Path
    metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, args: Sequence[str], workdir: Path, timeout_s: float = SERVE_START_TIMEOUT_S,
              env: Mapping[str, str] | None = None, command: Sequence[str] = (*CLI, "serve"),
              cwd: Path | None = None, name: str = "server", workers: int | None = 1
              ) -> ServeProcess:
        """``command ARGS --port 0 --port-file …`` with its output in workdir/NAME.log
        (and the ports in workdir/port, or NAME.port for another name). `serve` runs one
        process unless ``workers`` (or --workers in ARGS) says otherwise; None: its
        default (the usable cores with Redis)."""
        workdir.mkdir(parents=True, exist_ok=True)
        if workers is not None and tuple(command) == (*CLI, "serve") and "--workers" not in args:
            args = [*args, "--workers", str(workers)]
        port_file = workdir / ("port" if name == "server" else f"{name}.port")
        log_path = workdir / f"{name}.log"
        port_file.unlink(missing_ok=True)
        with open(log_path, "w") as log:
            process = subprocess.Popen([*command, *args, "--port", "0", "--port-file",
                                        str(port_file)], stdout=log, stderr=subprocess.STDOUT,
                                       env=None if env is None else dict(env), cwd=cwd)
        try:
            ports = wait_for_port_file(process, port_file, log_path, timeout_s)
        except TimeoutError:
            process.kill()
            process.wait()
            raise
        return cls(process, ports[0], log_path, (ports[1:] or [None])[0])

    def log(self) -> str:
        return self.log_path.read_text()

    def rss_kib(self) -> int:
        return rss_kib(self.process.pid)

    def pids(self) -> list[int]:
        """The process and its children: the supervisor and workers of --workers N."""
        return [self.process.pid, *child_pids(self.process.pid)]

    def cpu_seconds(self) -> float:
        """CPU time used by the server's processes alive now (exited ones not counted)."""
        return sum(cpu_seconds(pid) for pid in self.pids())

    def thread_cpu_seconds(self) -> dict[str, float]:
        """CPU time of the server's threads by name (thread_cpu_seconds), summed over
        its processes alive now: the workers' event loops together under ``main``."""
        return thread_cpu_seconds(*self.pids())

    def pss_kib(self) -> int:
        """Proportional memory of all the server's processes together."""
        return sum(pss_kib(pid) for pid in self.pids())

    def stop(self, timeout_s: float = 30.0) -> int:
        return stop_process(self.process, timeout_s)

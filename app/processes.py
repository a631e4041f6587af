"""Starting and stopping the processes a demo, a test or a benchmark runs beside itself:
`two-tower serve` children and redis-server."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


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

"""ghz runs and their reports: what to send, how to run ghz bounded, what came back.

    Load        one ghz run: closed loop at c workers, or open loop at a rate
    Plan        the closed-loop runs of a load test, then its open-loop run
    run_ghz     ghz on deploy/ghz/retrieve.json with --proto, -O json; returns the report
    Row         one result line; parse_report(report, variant, load) makes it
    summary     the ratios the service's targets are stated in

Every run is bounded (``-z`` or ``-n``, a per-request timeout, a hard subprocess timeout)
and targets the address it is given (127.0.0.1 in this project).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.loadtest")
REPO = Path(__file__).resolve().parents[1]
PROTO = "proto/retrieval/v1/retrieval.proto"  # relative to REPO, where ghz runs
CALL = "two_tower.retrieval.v1.RetrievalService.Retrieve"
GHZ_CONFIG = REPO / "deploy/ghz/retrieve.json"
DEVICES = ("mobile", "desktop", "tv")
HOURS = 24
CONTEXT = ("hour_of_day", "device")  # the context features call_data can send


@dataclass(frozen=True)
class Load:
    """One ghz run: closed loop at ``concurrency`` workers, or open loop at ``rps``."""

    mode: str              # "closed" | "open"
    concurrency: int
    duration: str = "10s"  # ghz -z; ignored when total > 0
    rps: int = 0           # open loop: arrivals per second
    total: int = 0         # > 0: ghz -n instead of -z (smoke runs)
    # ghz --connections: the concurrency spread over this many connections (the workers of
    # `serve --workers N` share a port by connection: one connection reaches one worker)
    connections: int = 1

    @property
    def label(self) -> str:
        return f"open@{self.rps}/s" if self.mode == "open" else f"c={self.concurrency}"


@dataclass(frozen=True)
class Row:
    """One line of the result table: what ghz saw in one run against one variant."""

    variant: str
    mode: str
    concurrency: int
    target_rps: int
    count: int               # completed requests, OK or not
    ok: int
    rps: float               # OK replies per second of the run
    p50_ms: float            # latency percentiles of OK replies (NaN when none)
    p90_ms: float
    p99_ms: float
    p999_ms: float
    errors: dict[str, int] = field(default_factory=dict)  # status name → count, non-OK only
    # measured around the run where the variant's process is ours (benchmarks.loadtest):
    cpu_ms_per_call: float = math.nan  # CPU of all its processes (/proc) / completed calls
    pss_mib: float = math.nan          # proportional memory of its processes, after the run
    stages: dict[str, float] = field(default_factory=dict)  # mean ms a stage (/metrics)
    # cpu_ms_per_call split by thread name (app.processes.thread_cpu_seconds): main (the
    # event loops), retrieve-work (the batches), event_engine (gRPC's), ...
    cpu_by_thread: dict[str, float] = field(default_factory=dict)

    @property
    def error_text(self) -> str:
        return ", ".join(f"{code}×{n}" for code, n in sorted(self.errors.items())) or "-"


# --- ghz --------------------------------------------------------------------------------

def find_ghz() -> Path | None:
    """The project's ghz (.tools/bin, from .ci/install-ghz.sh) or one on PATH."""
    local = REPO / ".tools/bin/ghz"
    if os.access(local, os.X_OK):
        return local
    found = shutil.which("ghz")
    return Path(found) if found else None


def call_data(user_ids: Sequence[str], k: int = 100,
              context: Collection[str] = CONTEXT) -> list[dict]:
    """Requests ghz sends round-robin: user i of U with hour (i mod 24) and a device that
    changes every 24 — lcm(U, 72) messages, so each user meets several contexts.
    ``context``: which of CONTEXT the requests carry (a server refuses a context feature
    its model does not have; loadtest passes the served model's, ``served_context``)."""
    if not user_ids:
        raise ValueError("expected at least one user id (got an empty list)")
    n = math.lcm(len(user_ids), HOURS * len(DEVICES))
    n = min(n, max(len(user_ids), 20_000))  # bounded file; still every user once
    out = []
    for i in range(n):
        values = {"hour_of_day": {"int_value": i % HOURS},
                  "device": {"string_value": DEVICES[(i // HOURS) % len(DEVICES)]}}
        call = {"user_id": user_ids[i % len(user_ids)], "k": k}
        sent = {name: value for name, value in values.items() if name in context}
        out.append({**call, "context": sent} if sent else call)
    return out


def read_user_ids(path: Path) -> list[str]:
    ids = [line.strip() for line in path.read_text().splitlines()]
    ids = [u for u in ids if u and not u.startswith("#")]
    if not ids:
        raise ValueError(f"{path}: expected one user id per line (found none)")
    return ids


def ghz_version(ghz: Path) -> str:
    stamp = ghz.parent / ".ghz-version"  # written by .ci/install-ghz.sh (ghz itself says "dev")
    return stamp.read_text().strip() if stamp.exists() else "(version unknown)"


def ghz_command(ghz: Path, address: str, load: Load, data_file: Path, out: Path,
                cpus: int = 1) -> list[str]:
    """ghz on the shared config (deploy/ghz/retrieve.json), bounded by -z or -n."""
    cmd = [str(ghz), "--config", str(GHZ_CONFIG), "--proto", PROTO, "--call", CALL,
           "--insecure", "-D", str(data_file), "-c", str(load.concurrency),
           "--cpus", str(cpus), "-t", "5s", "--duration-stop", "wait",
           "-O", "json", "-o", str(out)]
    cmd += ["-n", str(load.total)] if load.total > 0 else ["-z", load.duration]
    if load.mode == "open":
        cmd += ["--rps", str(load.rps), "--async"]
    if load.connections > 1:
        cmd += ["--connections", str(load.connections)]
    return [*cmd, address]


def run_ghz(ghz: Path, address: str, load: Load, data_file: Path, out: Path,
            cpus: Sequence[int] | None = None) -> dict:
    """Runs ghz once (on ``cpus`` when given) and returns its JSON report; raises
    RuntimeError with its stderr."""
    cmd = ghz_command(ghz, address, load, data_file, out)
    limit = (60.0 + load.total / 10) if load.total > 0 else parse_duration(load.duration) + 60.0
    log.info("ghz %s → %s", load.label, address)
    pin = None if cpus is None else functools.partial(os.sched_setaffinity, 0, set(cpus))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit,
                          preexec_fn=pin)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"ghz exited with {done.returncode}: {done.stderr.strip()[-2000:]}\n"
                           f"command: {shlex.join(cmd)}")
    return json.loads(out.read_text())


def parse_duration(duration: str) -> float:
    units = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if duration.endswith(suffix) and duration[:-len(suffix)].replace(".", "", 1).isdigit():
            return float(duration[:-len(suffix)]) * units[suffix]
    raise ValueError(f"duration must look like 500ms, 10s or 2m (got {duration!r})")


# --- reports → rows -------------------------------------------------------------------------

def ok_latencies_ms(report: dict) -> np.ndarray:
    """Latency of every OK reply, in ms, from the report's per-request details."""
    details = report.get("details") or []
    return np.array([d["latency"] / 1e6 for d in details if d.get("status") == "OK"],
                    dtype=np.float64)


def parse_report(report: dict, variant: str, load: Load) -> Row:
    """A ghz JSON report (``-O json``) → one table row. Percentiles are computed from the
    details (ghz's own summary stops at p99); errors are counted by gRPC status name."""
    statuses = dict(report.get("statusCodeDistribution") or {})
    ok = int(statuses.pop("OK", 0))
    total_s = report["total"] / 1e9
    lat = ok_latencies_ms(report)
    p50, p90, p99, p999 = (np.percentile(lat, [50, 90, 99, 99.9], method="inverted_cdf")
                           if len(lat) else [math.nan] * 4)
    return Row(variant=variant, mode=load.mode, concurrency=load.concurrency,
               target_rps=load.rps, count=int(report["count"]), ok=ok,
               rps=ok / total_s if total_s > 0 else 0.0, p50_ms=float(p50), p90_ms=float(p90),
               p99_ms=float(p99), p999_ms=float(p999),
               errors={code: int(n) for code, n in statuses.items() if n})


def summary(rows: Sequence[Row]) -> list[str]:
    """The ratios the service's targets are stated in, from this run's rows: each variant's
    best closed-loop RPS against echo's and naive's, and its open-loop p99."""
    best = {}
    for r in rows:
        if r.mode == "closed" and r.rps > best.get(r.variant, (0.0, 0))[0]:
            best[r.variant] = (r.rps, r.concurrency)
    lines = []
    for variant, (rps, c) in best.items():
        if variant == "echo":
            continue
        parts = [f"{variant}: best {rps:,.0f} RPS (c={c})"]
        for base in ("echo", "naive"):
            if base in best and base != variant:
                parts.append(f"{rps / best[base][0]:.2f}× {base}")
        lines.append(", ".join(parts))
    for r in rows:
        if r.mode == "open" and r.variant != "echo":
            lines.append(f"{r.variant}: open loop at {r.target_rps}/s: p99 {r.p99_ms:.2f} ms, "
                         f"errors {r.error_text}")
    return lines


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'variant':<10} {'load':<12} {'requests':>8} {'RPS':>8} {'p50 ms':>8} "
            f"{'p90 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'CPU ms/call':>11} {'PSS MiB':>8}"
            f"  errors")
    lines = [head, "-" * len(head)]
    for r in rows:
        label = f"open@{r.target_rps}/s" if r.mode == "open" else f"c={r.concurrency}"
        lines.append(f"{r.variant:<10} {label:<12} {r.count:>8} {r.rps:>8.1f} {r.p50_ms:>8.2f} "
                     f"{r.p90_ms:>8.2f} {r.p99_ms:>8.2f} {r.p999_ms:>9.2f} "
                     f"{r.cpu_ms_per_call:>11.3f} {r.pss_mib:>8.0f}  {r.error_text}")
    return "\n".join(lines)


def format_stages(rows: Sequence[Row]) -> str:
    """Where a call's time goes, per run of a variant with /metrics: mean ms a stage
    (queue, features, handoff, tower, ann: once a batch but felt by each call; return,
    total: per call) and the mean batch size."""
    names = ("queue", "features", "handoff", "tower", "ann", "return", "total")
    head = (f"{'variant':<10} {'load':<12} {'batch':>6} "
            + " ".join(f"{n:>9}" for n in names))
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r.stages:
            continue
        label = f"open@{r.target_rps}/s" if r.mode == "open" else f"c={r.concurrency}"
        lines.append(f"{r.variant:<10} {label:<12} {r.stages.get('batch', math.nan):>6.1f} "
                     + " ".join(f"{r.stages.get(f'{n}_ms', math.nan):>9.3f}" for n in names))
    return "\n".join(lines)


HALF_MAX = "half-max"
# the rate at which the variant's CPU per call at c=1 (batches of one) adds up to half of
# its CPUs: nominally half busy, whatever batching gains at higher concurrency (calls spaced
# out by an open loop cost somewhat more than back to back, so the load test prints how
# busy they really were)
HALF_BUSY = "half-busy"
# arrivals per second (int), a share of the best closed-loop RPS (float), or HALF_BUSY
Rate = int | float | str


def half_busy_rps(closed_rows: Sequence[Row], cpus: int = 1) -> int | None:
    """HALF_BUSY's rate from a variant's closed-loop rows: ``cpus`` / 2 over the CPU per
    call of its lowest-concurrency run; None without that run's CPU."""
    runs = sorted((r for r in closed_rows if r.mode == "closed"), key=lambda r: r.concurrency)
    if not runs or not runs[0].cpu_ms_per_call > 0:
        return None
    return max(1, round(500.0 * cpus / runs[0].cpu_ms_per_call))


@dataclass(frozen=True)
class Plan:
    """Closed-loop runs at each concurrency, then one open-loop run per entry of ``rates``:
    arrivals per second (int; 0 for none), or a share of the variant's best closed-loop RPS
    of this run (float: 0.5 is ``half-max``, where the latency target is stated)."""

    concurrency: tuple[int, ...]
    rates: tuple[Rate, ...]
    duration: str
    total: int = 0
    connections: int = 1  # Load.connections of every run
    cpus: int = 1  # the CPUs a variant runs on, for HALF_BUSY

    def closed(self) -> list[Load]:
        return [Load("closed", c, self.duration, total=self.total,
                     connections=min(c, self.connections)) for c in self.concurrency]

    def opens(self, closed_rows: Sequence[Row]) -> list[Load]:
        best = max((r.rps for r in closed_rows), default=2.0)
        loads = []
        for rate in self.rates:
            if rate == HALF_BUSY:
                rps = half_busy_rps(closed_rows, self.cpus) or 0
            else:
                rps = max(1, round(best * rate)) if isinstance(rate, float) else rate
            if rps > 0:  # open loop: --async sends on schedule; -c spreads it over workers
                loads.append(Load("open", max(self.concurrency), self.duration, rps=rps,
                                  total=self.total, connections=self.connections))
        return loads


def parse_rates(text: str) -> tuple[Rate, ...]:
    """``--rate``: comma-separated entries, each arrivals per second (``700``), a share of
    the best closed-loop RPS (``0.25max``), ``half-max`` (= ``0.5max``) or ``half-busy``
    (``half_busy_rps``)."""
    return tuple(_parse_rate(entry.strip()) for entry in text.split(","))


def _parse_rate(text: str) -> Rate:
    if text == HALF_MAX:
        return 0.5
    if text == HALF_BUSY:
        return HALF_BUSY
    try:
        rate: Rate = float(text[:-3]) if text.endswith("max") else int(text)
    except ValueError:
        rate = -1
    if rate < 0 or (isinstance(rate, float) and not 0 < rate <= 4):
        raise ValueError(f"--rate: expected arrivals per second >= 0, a share of the best "
                         f"closed-loop RPS like 0.25max, {HALF_MAX!r} or {HALF_BUSY!r} "
                         f"(got {text!r})")
    return rate

"""What each process of `serve --workers N` holds, mapping by mapping: is a second worker cheap?

    python -m benchmarks.worker_memory --pair W/items-…/pair.json [--workers 1,2]
        [--concurrency 50] [--connections 8] [--duration 5s] [--rounds 1]
        [--code DIR[,DIR…]]
        [--out benchmarks/results]

For each code tree (``--code``: the repository by default; a second tree, e.g. a
``git worktree`` of an older commit, gives a same-run A/B) and each worker count, it starts
``two-tower serve --workers N`` on the pair with a redis-server of its own (filled with
``two-tower load-features`` from the pair's data), runs ghz closed-loop at ``--concurrency``
over ``--connections`` connections for ``--duration``, then reads /proc/PID/smaps of the supervisor and every worker and sums
each process's mappings into kinds:

    index      the index artifact's files (index.faiss, item_ids.npy), mapped
    model      the model artifact's files (the NumPy tower's .npz), mapped
    cache      retrieval.mapped_cache's arrays (id tables, reply records, ...), mapped
    code       shared libraries and the interpreter
    heap       anonymous memory: malloc's arenas, NumPy arrays, Python objects
    other      stacks, other files, [vdso] …

with, per kind, PSS (each page divided among the processes that map it) and the private
part (pages only this process maps): what a process would free if it exited. The server's
PSS is the sum over its processes, as benchmarks.loadtest measures it; the target of issue
19 is PSS(2 workers) ≤ 1.3 × PSS(1 worker). Calls/s and CPU per call (all the server's
processes, /proc) are printed beside it. Each server gets a fresh cache directory of the
run's own (``TWO_TOWER_CACHE_DIR``), so the first worker builds the mapped tables and the
next maps them, as after a deploy.

Connections: the kernel hands each *connection* to one worker, and ghz opens one unless
told otherwise, so with one connection a single worker serves every call and the other
stays idle (and small). Each process's CPU seconds during the run are printed to show how
the calls spread.

Writes worker_memory.json to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from app.processes import ServeProcess, cpu_seconds, redis_server
from benchmarks.ghz import (
    Load,
    call_data,
    find_ghz,
    ghz_command,
    parse_duration,
    parse_report,
    read_user_ids,
)

log = logging.getLogger("benchmarks.worker_memory")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_USERS = REPO / "deploy/ghz/users.txt"
KINDS = ("index", "model", "cache", "code", "heap", "other")
_FIELDS = {"Pss": "pss", "Private_Clean": "private", "Private_Dirty": "private",
           "Rss": "rss", "Anonymous": "anonymous"}


@dataclass
class Memory:
    """KiB of one kind of mapping in one process."""

    pss: int = 0
    private: int = 0
    rss: int = 0
    anonymous: int = 0


@dataclass
class ProcessMemory:
    pid: int
    role: str                       # supervisor | worker | server (a single process)
    cpu_s: float = 0.0              # CPU seconds during the measured run
    kinds: dict[str, Memory] = field(default_factory=dict)

    @property
    def pss(self) -> int:
        return sum(m.pss for m in self.kinds.values())

    @property
    def private(self) -> int:
        return sum(m.private for m in self.kinds.values())


def kind_of(path: str, index: Path, model: Path, cache: Path) -> str:
    """Which kind a mapping of ``path`` (smaps' pathname, "" when anonymous) is."""
    if not path or path in ("[heap]",) or path.startswith("[anon"):
        return "heap"
    if path.startswith(str(index)):
        return "index"
    if path.startswith(str(model)):
        return "model"
    if path.startswith(str(cache)):
        return "cache"
    if ".so" in Path(path).name or Path(path).name.startswith("python"):
        return "code"
    return "other"


def smaps(pid: int, role: str, index: Path, model: Path, cache: Path,
          cpu_s: float = 0.0) -> ProcessMemory:
    """/proc/PID/smaps summed by kind (a mapping's header line, then its "Field: N kB")."""
    out = ProcessMemory(pid, role, cpu_s, {k: Memory() for k in KINDS})
    current = out.kinds["other"]
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):  # "start-end perms offset dev inode path"
            parts = line.split(None, 5)
            current = out.kinds[kind_of(parts[5].strip() if len(parts) > 5 else "",
                                        index, model, cache)]
        elif head[:-1] in _FIELDS:
            name = _FIELDS[head[:-1]]
            setattr(current, name, getattr(current, name) + int(rest.split()[0]))
    return out


# --- one server --------------------------------------------------------------------------

@dataclass
class Run:
    code: str
    workers: int
    rps: float
    cpu_ms_per_call: float
    processes: list[ProcessMemory]

    @property
    def pss(self) -> int:
        return sum(p.pss for p in self.processes)


def run_load(ghz: Path, address: str, load: Load, connections: int, data_file: Path,
             out: Path) -> dict:
    """ghz as benchmarks.ghz runs it, over ``connections`` connections."""
    cmd = ghz_command(ghz, address, load, data_file, out)
    cmd[-1:-1] = ["--connections", str(connections)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=parse_duration(load.duration) + 60)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"ghz exited with {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(out.read_text())


def measure(code: Path, workers: int, pair: dict, redis_url: str, ghz: Path, load: Load,
            connections: int, data_file: Path, workdir: Path) -> Run:
    cache = Path(tempfile.mkdtemp(prefix="worker-memory-cache-", dir=workdir))
    env = {**os.environ, "TWO_TOWER_CACHE_DIR": str(cache), "PYTHONPATH": str(code)}
    args = ["--model", pair["model"], "--index", pair["index"], "--redis-url", redis_url,
            "--workers", str(workers)]
    server = ServeProcess.start(args, workdir, 240.0, env=env, cwd=code,
                                name=f"serve-{workers}", workers=None)
    try:
        run_load(ghz, server.address, Load("closed", 8, total=400), connections, data_file,
                 workdir / "warmup.json")
        pids = server.pids()
        cpu_before = [cpu_seconds(p) for p in pids]
        report = run_load(ghz, server.address, load, connections, data_file,
                          workdir / f"ghz-{workers}.json")
        cpu = [cpu_seconds(p) - before for p, before in zip(pids, cpu_before, strict=True)]
        row = parse_report(report, f"workers{workers}", load)
        roles = (["server"] if len(pids) == 1 else
                 ["supervisor"] + ["worker"] * (len(pids) - 1))
        processes = [smaps(pid, role, Path(pair["index"]).resolve(),
                           Path(pair["model"]).resolve(), cache, cpu_s)
                     for pid, role, cpu_s in zip(pids, roles, cpu, strict=True)]
    finally:
        server.stop()
        shutil.rmtree(cache, ignore_errors=True)
    return Run(str(code), workers, row.rps, 1e3 * sum(cpu) / max(row.count, 1), processes)


# --- report ------------------------------------------------------------------------------

def format_run(run: Run) -> str:
    mib = 1 / 1024
    head = f"{'pid':>8} {'role':<10} {'CPU s':>6} {'PSS':>7} {'private':>8}  " + "  ".join(
        f"{k + ' pss/priv':>17}" for k in KINDS)
    title = (f"{run.code}  --workers {run.workers}: {run.rps:.0f} calls/s, "
             f"{run.cpu_ms_per_call:.3f} ms CPU a call, PSS {run.pss * mib:.0f} MiB")
    lines = [title, head]
    for p in run.processes:
        cells = "  ".join(f"{m.pss * mib:>8.1f}/{m.private * mib:>8.1f}" for m in p.kinds.values())
        lines.append(f"{p.pid:>8} {p.role:<10} {p.cpu_s:>6.1f} {p.pss * mib:>7.1f} "
                     f"{p.private * mib:>8.1f}  {cells}")
    return "\n".join(lines)


def ratios(runs: list[Run], workers: list[int]) -> list[str]:
    lines = []
    for code in dict.fromkeys(r.code for r in runs):
        mine = {w: [r for r in runs if r.code == code and r.workers == w] for w in workers}
        one = mine.get(1)
        if not one:
            continue
        base = sum(r.pss for r in one) / len(one)
        for w, rs in mine.items():
            if w != 1 and rs:
                pss = sum(r.pss for r in rs) / len(rs)
                lines.append(f"{code}: PSS {w} workers {pss / 1024:.0f} MiB against 1 worker "
                             f"{base / 1024:.0f} MiB: {pss / base:.2f}x (target <= 1.3)")
    return lines


def plot(runs: list[Run], path: Path) -> None:
    """One stacked bar per run: the server's PSS by kind of mapping, summed over its
    processes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(runs), 4.5))
    labels = [f"{Path(r.code).name}\n{r.workers} worker{'s' * (r.workers > 1)}" for r in runs]
    bottom = [0.0] * len(runs)
    for kind in KINDS:
        heights = [sum(p.kinds[kind].pss for p in r.processes) / 1024 for r in runs]
        ax.bar(range(len(runs)), heights, bottom=bottom, label=kind)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(range(len(runs)), labels, fontsize=8)
    ax.set_ylabel("PSS of all the server's processes (MiB)")
    ax.set_title("serve --workers N: proportional memory by kind of mapping", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker_memory",
                                description=__doc__.split("\n")[0])
    p.add_argument("--pair", type=Path, required=True,
                   help="pair.json of benchmarks.loadtest's workdir (model, index, data)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--connections", type=int, default=8,
                   help="ghz connections (the kernel spreads connections over the workers)")
    p.add_argument("--duration", default="5s")
    p.add_argument("--rounds", type=int, default=1, help="times each (code, workers) runs, "
                   "alternating")
    p.add_argument("--code", default=str(REPO),
                   help="comma-separated repository trees whose `serve` is measured (A/B)")
    p.add_argument("--users", type=Path, default=DEFAULT_USERS)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    p.add_argument("--note", default="")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ghz = find_ghz()
    if ghz is None:
        print("worker_memory: ghz not found; run `bash .ci/install-ghz.sh`", file=sys.stderr)
        return 2
    pair = json.loads(args.pair.read_text())
    workers = [int(w) for w in args.workers.split(",")]
    codes = [Path(c).resolve() for c in args.code.split(",")]
    load_avg = os.getloadavg()
    with ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="worker-memory-")))
        workdir.mkdir(parents=True, exist_ok=True)
        data_file = workdir / "call-data.json"
        data_file.write_text(json.dumps(call_data(read_user_ids(args.users))))
        url = stack.enter_context(redis_server(workdir / "redis"))
        subprocess.run([sys.executable, "-m", "app.cli", "load-features", "--data", pair["data"],
                        "--redis-url", url], cwd=REPO, check=True, capture_output=True)
        load = Load("closed", args.concurrency, args.duration)
        runs = []
        for _ in range(args.rounds):
            for code in codes:
                for w in workers:
                    runs.append(measure(code, w, pair, url, ghz, load, args.connections,
                                        data_file, workdir))
                    print(format_run(runs[-1]) + "\n", flush=True)
    lines = ratios(runs, workers)
    print("\n".join(lines))
    meta = {"utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": f"{platform.node() or 'host'} ({os.cpu_count()} cores)",
            "load_average_before": load_avg, "load_average_after": os.getloadavg(),
            "command": shlex.join(["python", "-m", "benchmarks.worker_memory", *sys.argv[1:]]),
            "pair": pair, "note": args.note, "summary": lines}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "worker_memory.json"
    path.write_text(json.dumps({"meta": meta, "runs": [
        {**{k: v for k, v in asdict(r).items() if k != "processes"}, "pss_kib": r.pss,
         "processes": [{**asdict(p), "pss_kib": p.pss, "private_kib": p.private}
                       for p in r.processes]} for r in runs]}, indent=1) + "\n")
    plot(runs, args.out / "worker_memory.png")
    log.info("wrote %s and worker_memory.png", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Load test of the retrieval service with ghz, beside the ceiling and the naive baseline.

    python -m benchmarks.loadtest [--model M --index I [--features D | --redis-url URL]]
        [--workdir W] [--items N] [--clusters C] [--content-dims D] [--index-spec S]
        [--redis]
        [--concurrency 1,10,50] [--rate R[,R…]] [--duration 10s] [--quick]
        [--server-args "..."] [--variant NAME="serve args"] [--out benchmarks/results]

For each server variant, in one run on one machine, it starts the server on a free
loopback port (``--port 0 --port-file``), warms it up, then runs ghz closed-loop at each
concurrency (``-c N -z DURATION``: N workers, each sends its next request when the last
one answered) and open-loop at each fixed arrival rate (``--rps R --async``: requests
are sent on schedule whether or not earlier ones answered, so queueing shows in the
latency). The variants:

* ``echo``  benchmarks/echo_server.py: the same rpc with a canned 100-candidate reply —
  the ceiling of Python gRPC here;
* ``naive``  benchmarks/naive_server.py: SavedModel user tower and Faiss once per request,
  no batching — the baseline, pinned so it survives changes to retrieval/;
* ``server`` ``two-tower serve`` as it is now, one process (``--workers 1``), plus
  ``--server-args``;
* every ``--variant NAME="ARGS"``: ``two-tower serve`` with ``--server-args`` and ARGS,
  to compare serving options in the same run (``--variant workers2="--workers 2"``).

Requests: one per user id of ``--users`` (round-robin), each with a varied context
(hour_of_day, device: those of the two the served model's spec has, as the server refuses
others) and k=100 — see deploy/ghz/. ghz gets ``--proto`` because Python gRPC reflection
cannot describe the methods to it, and ``--cpus 1`` (GOMAXPROCS=1) so the load generator
leaves the other core(s) to the server. Every run is bounded (``-z`` or
``-n``, per-request timeout, a hard subprocess timeout) and targets 127.0.0.1 only.

Placement (``--placement``): ``split`` (the default on 2 or more CPUs) runs ghz on the
last CPU and every server on the others, as a load generator on a host of its own would
leave them (serve variants through ``--cpu-affinity``, which a variant's own flag
overrides: ``--variant workers2="--workers 2 --cpu-affinity auto"`` takes every CPU);
``shared`` pins nothing, as every run before stop 21 did.

Without ``--model``/``--index`` the artifacts come from ``--workdir``: synthetic data
(3000 users, ``--items`` items in ``--clusters`` taste clusters, ``--content-dims`` dense
content features per item), a model trained there with ``MODEL_RECIPE`` (normalised
towers) and an index (``--index-spec``, default auto) made with the ``two-tower`` command
once, then reused.
``--redis`` starts a redis-server of the run's own on a free loopback port, fills it with
``two-tower load-features`` and serves every variant from it.

Writes to ``--out``: loadtest.json (rows + run metadata), loadtest.csv (rows),
loadtest_latency_hist.png and loadtest_throughput.png; raw ghz reports stay in the workdir.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.cpu_parts import measure_parts, scrape, stage_means_ms
from benchmarks.ghz import (
    CONTEXT,
    HALF_BUSY,
    HALF_MAX,
    Load,
    Plan,
    Row,
    ghz_version,
    parse_duration,
    call_data,
    find_ghz,
    format_stages,
    format_table,
    half_busy_rps,
    ok_latencies_ms,
    parse_rates,
    parse_report,
    read_user_ids,
    run_ghz,
    summary,
)
from app.processes import ProcessStartError, ServeProcess, pids_mapping, redis_server
from contracts.model_manifest import load_model_manifest

log = logging.getLogger("benchmarks.loadtest")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_USERS = REPO / "deploy/ghz/users.txt"
SERVER_START_TIMEOUT_S = 180.0


# --- servers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str
    command: list[str]  # without --port/--port-file


SERVE = [sys.executable, "-m", "app.cli", "serve"]
NAIVE = [sys.executable, "-m", "benchmarks.naive_server"]
ECHO = [sys.executable, "-m", "benchmarks.echo_server"]


def serve_command(model: Path, index: Path, features: Path | None, redis_url: str | None,
                  extra: Sequence[str] = (), base: Sequence[str] = SERVE) -> list[str]:
    cmd = [*base, "--model", str(model), "--index", str(index)]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    elif features is not None:
        cmd += ["--features", str(features)]
    return [*cmd, *extra]


@dataclass(frozen=True)
class Placement:
    """Which CPUs the servers and ghz run on; None: unpinned."""

    servers: tuple[int, ...] | None = None
    ghz: tuple[int, ...] | None = None

    @classmethod
    def of(cls, mode: str, cpus: Sequence[int] | None = None) -> Placement:
        """``split``: ghz on the last CPU, the servers on the others (``shared`` on one
        CPU); ``shared``: nothing pinned."""
        cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
        if mode == "shared" or len(cpus) < 2:
            return cls()
        return cls(tuple(cpus[:-1]), (cpus[-1],))

    def describe(self) -> dict:
        text = lambda cpus: "any" if cpus is None else ",".join(map(str, cpus))  # noqa: E731
        return {"servers": text(self.servers), "ghz": text(self.ghz)}


@contextmanager
def running(variant: Variant, workdir: Path) -> Iterator[ServeProcess]:
    """Starts the variant on 127.0.0.1 and a free port; yields it; always stops it."""
    server = ServeProcess.start([], workdir, SERVER_START_TIMEOUT_S, command=variant.command,
                                cwd=REPO, name=variant.name)
    try:
        yield server
    finally:
        server.stop()


# --- the run --------------------------------------------------------------------------------

def served_context(model: Path | None) -> tuple[str, ...]:
    """The context features of CONTEXT the model's spec has (all of them without a model,
    e.g. echo only): requests carry only those, as the server refuses others."""
    if model is None:
        return CONTEXT
    spec = load_model_manifest(model, verify=False).feature_spec
    names = {f.name for f in spec.tower("context")}
    return tuple(name for name in CONTEXT if name in names)


def measure(ghz: Path, variant: Variant, plan: Plan, data_file: Path,
            workdir: Path, warmup: int, opens: Sequence[Load] | None = None,
            ghz_cpus: Sequence[int] | None = None
            ) -> tuple[list[Row], dict[str, np.ndarray]]:
    """Every load of the plan against one fresh server of the variant (``opens``: these
    open-loop loads instead of the plan's), ghz on ``ghz_cpus`` when given."""
    rows: list[Row] = []
    latencies: dict[str, np.ndarray] = {}
    with running(variant, workdir) as server:
        if warmup > 0:
            run_ghz(ghz, server.address, Load("closed", 4, total=warmup), data_file,
                    workdir / f"{variant.name}-warmup.json", ghz_cpus)
        for load in plan.closed() if opens is None else []:
            _measure_one(ghz, server, variant, load, data_file, workdir, rows, latencies,
                         ghz_cpus)
        for open_load in plan.opens(rows) if opens is None else opens:
            _measure_one(ghz, server, variant, open_load, data_file, workdir, rows, latencies,
                         ghz_cpus)
    return rows, latencies


def _measure_one(ghz: Path, server: ServeProcess, variant: Variant, load: Load,
                 data_file: Path, workdir: Path, rows: list[Row],
                 latencies: dict[str, np.ndarray],
                 ghz_cpus: Sequence[int] | None = None) -> None:
    """One ghz run; around it, the server's CPU time (all its processes, /proc), its
    memory after it (PSS), and its stage timings (/metrics, when it has them)."""
    raw = workdir / f"{variant.name}-{load.label.replace('/', '_')}.json"
    metrics_before, cpu_before = scrape(server.metrics_port), server.cpu_seconds()
    threads_before = server.thread_cpu_seconds()
    report = run_ghz(ghz, server.address, load, data_file, raw, ghz_cpus)
    cpu = server.cpu_seconds() - cpu_before
    threads = server.thread_cpu_seconds()
    row = parse_report(report, variant.name, load)
    per_call = (lambda seconds: 1e3 * seconds / row.count) if row.count else (lambda _: math.nan)
    rows.append(dataclasses.replace(
        row, cpu_ms_per_call=per_call(cpu), pss_mib=server.pss_kib() / 1024,
        stages=stage_means_ms(metrics_before, scrape(server.metrics_port)),
        cpu_by_thread={name: per_call(seconds - threads_before.get(name, 0.0))
                       for name, seconds in sorted(threads.items())
                       if seconds > threads_before.get(name, 0.0)}))
    latencies[load.label] = ok_latencies_ms(report)


def write_results(rows: Sequence[Row], latencies: dict[str, dict[str, np.ndarray]],
                  meta: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "loadtest.json", out / "loadtest.csv"]
    plain = [{k: (None if isinstance(v, float) and math.isnan(v) else v)
              for k, v in asdict(r).items()} for r in rows]  # NaN (no OK reply) → null
    paths[0].write_text(json.dumps({"meta": meta, "rows": plain}, indent=2) + "\n")
    with open(paths[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "mode", "concurrency", "target_rps", "count", "ok", "rps",
                         "p50_ms", "p90_ms", "p99_ms", "p999_ms", "cpu_ms_per_call", "pss_mib",
                         "errors"])
        for r in rows:
            writer.writerow([r.variant, r.mode, r.concurrency, r.target_rps, r.count, r.ok,
                             f"{r.rps:.2f}", f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}",
                             f"{r.p99_ms:.3f}", f"{r.p999_ms:.3f}", f"{r.cpu_ms_per_call:.4f}",
                             f"{r.pss_mib:.1f}", r.error_text])
    return [*paths, *save_plots(rows, latencies, meta, out)]


def save_plots(rows: Sequence[Row], latencies: dict[str, dict[str, np.ndarray]], meta: dict,
               out: Path) -> list[Path]:
    """Latency histogram (each variant at its highest closed-loop concurrency, log x), OK
    replies per second against concurrency, one line per variant, and each run's CPU per
    call stacked by thread name (where rows have it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    note = f"{meta['host']}, {meta['utc'][:16]}Z" + (" — noisy" if meta.get("noisy") else "")
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, by_load in latencies.items():
        closed = [r for r in rows if r.variant == variant and r.mode == "closed"]
        if not closed:
            continue
        top = max(closed, key=lambda r: r.concurrency)
        lat = by_load.get(f"c={top.concurrency}", np.array([]))
        if len(lat):
            bins = np.geomspace(max(lat.min(), 1e-3), lat.max() * 1.01, 50)
            ax.hist(lat, bins=bins, histtype="step", label=f"{variant} c={top.concurrency}")
    ax.set(xscale="log", xlabel="latency of OK replies (ms, log)", ylabel="requests",
           title=f"Retrieve latency ({note})")
    ax.legend()
    hist = out / "loadtest_latency_hist.png"
    fig.tight_layout()
    fig.savefig(hist, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for variant in dict.fromkeys(r.variant for r in rows):
        closed = sorted((r for r in rows if r.variant == variant and r.mode == "closed"),
                        key=lambda r: r.concurrency)
        ax.plot([r.concurrency for r in closed], [r.rps for r in closed], marker="o",
                label=variant)
    ticks = sorted({r.concurrency for r in rows if r.mode == "closed"})
    ax.set(xscale="log", xlabel="concurrency (closed-loop ghz workers, log)",
           ylabel="OK replies per second", title=f"Throughput vs concurrency ({note})")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.legend()
    thr = out / "loadtest_throughput.png"
    fig.tight_layout()
    fig.savefig(thr, dpi=120)
    plt.close(fig)
    threads = save_thread_plot(rows, note, out)
    return [hist, thr] if threads is None else [hist, thr, threads]


def save_thread_plot(rows: Sequence[Row], note: str, out: Path) -> Path | None:
    """loadtest_cpu_threads.png: each run's server CPU per call stacked by thread name
    (Row.cpu_by_thread); None when no row has the split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = [r for r in rows if r.cpu_by_thread]
    if not split:
        return None
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(split)), 4))
    bottoms = np.zeros(len(split))
    for name in sorted({n for r in split for n in r.cpu_by_thread},
                       key=lambda n: -sum(r.cpu_by_thread.get(n, 0.0) for r in split)):
        heights = np.array([r.cpu_by_thread.get(name, 0.0) for r in split])
        ax.bar(range(len(split)), heights, bottom=bottoms, label=name)
        bottoms += heights
    labels = [f"{r.variant} " + (f"open@{r.target_rps}/s" if r.mode == "open"
                                 else f"c={r.concurrency}") for r in split]
    ax.set_xticks(range(len(split)), labels, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="server CPU ms per call", title=f"Where a call's CPU goes, by thread ({note})")
    ax.legend(fontsize=7)
    path = out / "loadtest_cpu_threads.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- artifacts ----------------------------------------------------------------------------

class ArtifactsUnavailable(RuntimeError):
    """The model/index pair could not be made; the message says which step and why."""


# The load test's model: L2-normalised towers with temperature 0.05, the recipe our quality
# runs chose on both MovieLens protocols (docs/quality.md). On the 50k load-test dataset it
# also validates better after the 5 epochs trained here (held-out recall@10 0.116 against
# 0.104 unnormalised). It matters for speed: the unnormalised model's item embeddings share
# one large common direction (random pairs at cosine 0.99), and on the 1M catalogue IVF
# needed nprobe 320 for recall@100 0.95; the normalised model needs 128. It is now also
# `two-tower train`'s default; spelled out here so the load test's model stays the same if
# that default moves.
MODEL_RECIPE = ("--normalize", "--temperature", "0.05")
RECIPE_TAG = "cosine"  # in the artifact directory's name, so older models are not reused


def ensure_artifacts(workdir: Path, quick: bool, items: int = 50_000, content_dims: int = 0,
                     clusters: int = 10, index_spec: str = "auto") -> tuple[Path, Path, Path]:
    """(model, index, data) made in ``workdir/items-N[-clusters-C][-content-D]-cosine`` by
    the two-tower command, or reused from an earlier run (its ``pair.json``). The index is
    ``build-index --index index_spec``; an earlier pair with another spec keeps its data
    and model and gets a new index."""
    workdir = workdir / (("quick" if quick else f"items-{items}"
                          + (f"-clusters-{clusters}" if clusters != 10 else "")
                          + (f"-content-{content_dims}" if content_dims else ""))
                         + f"-{RECIPE_TAG}")
    pair_file = workdir / "pair.json"
    pair = json.loads(pair_file.read_text()) if pair_file.exists() else {}
    model, index, data = (Path(pair[k]) if k in pair else None for k in ("model", "index", "data"))
    if model is None or data is None or not (model.is_dir() and data.is_dir()):
        model, data = None, workdir / "data"
    elif index is not None and index.is_dir() and pair.get("index_spec", "auto") == index_spec:
        log.info("reusing model %s and index %s from %s", model.name, index.name, pair_file)
        return model, index, data
    if not (data / "features.toml").exists():
        sizes = (("--users", "300", "--items", "300") if quick
                 else ("--users", "3000", "--items", str(items)))
        _two_tower("generate", "--out", str(data), *sizes, "--clusters", str(clusters),
                   "--content-dims", str(content_dims), prints_path=False)
    if model is None:
        model = Path(_two_tower("train", "--data", str(data), "--out", str(workdir / "models"),
                                "--epochs", "1" if quick else "5", "--no-eval", *MODEL_RECIPE))
    # As the nightly job builds it: item tower over the catalogue, the index (auto: IVF at
    # 50k items), nprobe tuned and gated on the dataset's held-out users.
    index = Path(_two_tower("build-index", "--model", str(model), "--out",
                            str(workdir / "indexes"), "--index", index_spec, "--items",
                            str(data), "--data", str(data)))
    if not (index / "manifest.json").exists():
        raise ArtifactsUnavailable(f"build-index printed {str(index)!r} as its last line, "
                                   "which is not an index directory (no manifest.json)")
    pair_file.write_text(json.dumps({"model": str(model), "index": str(index),
                                     "data": str(data), "index_spec": index_spec},
                                    indent=2) + "\n")
    return model, index, data


def _best(rows: Sequence[Row], variant: str) -> float:
    return max((r.rps for r in rows if r.variant == variant and r.mode == "closed"),
               default=0.0)


def target_figures(rows: Sequence[Row], parts: dict[str, float], top_c: int,
                   cpus: int = 1) -> dict:
    """The figures the service's targets (issue: serving at its own limit) are computed
    from in this run, each ratio beside them; a target whose rows the run lacks is absent.
    ``cpus``: the CPUs each serving variant ran on, for the tail at the half-busy rate
    (``half_busy``: the same ratios where the CPUs are nominally half busy)."""
    def row(variant: str, mode: str, c: int | None = None) -> Row | None:
        return next((r for r in rows if r.variant == variant and r.mode == mode
                     and (c is None or r.concurrency == c)), None)

    def row_at(variant: str, rps: int) -> Row | None:  # an open-loop run at that rate
        return next((r for r in rows if r.variant == variant and r.mode == "open"
                     and r.target_rps == rps), None)

    out: dict = {}
    server, echo = row("server", "closed", top_c), row("echo", "closed", top_c)
    if server and echo and parts:
        unavoidable = (echo.cpu_ms_per_call + parts["ann_ms_per_query"]
                       + parts["tower_ms_per_user"] + parts["redis_parse_ms_per_user"])
        out["cpu"] = {"server": server.cpu_ms_per_call, "echo": echo.cpu_ms_per_call,
                      "echo_rps": echo.rps, "parts": unavoidable,
                      "ratio": server.cpu_ms_per_call / unavoidable}
        same_rate = row_at("echo@srv", max(1, round(_best(rows, "server"))))
        if same_rate is not None:
            at_rate = same_rate.cpu_ms_per_call + unavoidable - echo.cpu_ms_per_call
            out["cpu_at_rate"] = {"rps": same_rate.rps, "echo": same_rate.cpu_ms_per_call,
                                  "parts": at_rate,
                                  "ratio": server.cpu_ms_per_call / at_rate}
    for variant in sorted({r.variant for r in rows if r.variant.startswith("workers")}):
        many = row(variant, "closed", top_c)
        if server and many:
            out[variant] = {"cpu_ratio": many.cpu_ms_per_call / server.cpu_ms_per_call,
                            "pss_ratio": many.pss_mib / server.pss_mib,
                            "pss": many.pss_mib, "server_pss": server.pss_mib,
                            "rps": many.rps, "server_rps": server.rps}
    def tail(variant: str, rate: int | None = None) -> dict | None:
        """At ``rate`` (default: its own half-max), echo at that rate beside it."""
        half = max(1, round(_best(rows, variant) * 0.5)) if rate is None else rate
        echo_half, one, at_half = (row_at("echo@srv", half), row(variant, "closed", 1),
                                   row_at(variant, half))
        if not (at_half and echo_half and one):
            return None
        return {"rps": half, "p99": at_half.p99_ms, "echo_p99": echo_half.p99_ms,
                "p99_ratio": at_half.p99_ms / echo_half.p99_ms, "p50": at_half.p50_ms,
                "c1_p50": one.p50_ms, "p50_ratio": at_half.p50_ms / one.p50_ms,
                "busy": at_half.rps * at_half.cpu_ms_per_call / 1e3 / cpus,
                "errors": at_half.error_text}

    half = max(1, round(_best(rows, "server") * 0.5))
    at_half = row_at("server", half)
    if (h := tail("server")) is not None:
        out["half"] = h
        # the same ratio for echo at half its own maximum: the queueing gRPC alone has there
        echo_at_half = row_at("echo", max(1, round(_best(rows, "echo") * 0.5)))
        echo_c1 = row("echo", "closed", 1)
        if echo_at_half and echo_c1:
            h["echo_own_p50_ratio"] = echo_at_half.p50_ms / echo_c1.p50_ms
    for variant in sorted({r.variant for r in rows if r.variant.startswith("workers")}):
        if (h := tail(variant)) is not None:
            out.setdefault(variant, {})["half"] = h
    busy_rate = half_busy_rps([r for r in rows if r.variant == "server"], cpus)
    if busy_rate is not None and (h := tail("server", busy_rate)) is not None:
        out["half_busy"] = h
    fixed = batch_cost(row("server", "closed", 1), server)
    if fixed:
        out["fixed"] = fixed
        if at_half and at_half.stages.get("batch"):
            # the worker's share of a core at half load: what its queue waits behind
            out["fixed"]["half"] = {"rps": at_half.rps, "batch": at_half.stages["batch"],
                                    "cpu": at_half.cpu_ms_per_call,
                                    "busy": at_half.rps * at_half.cpu_ms_per_call / 1e3}
    if _best(rows, "server") and _best(rows, "naive"):
        out["naive"] = {"server": _best(rows, "server"), "naive": _best(rows, "naive"),
                        "ratio": _best(rows, "server") / _best(rows, "naive")}
    return out


def batch_cost(small: Row | None, large: Row | None) -> dict | None:
    """A batch's fixed CPU and a call's own, from two closed-loop runs of one worker whose
    mean batch sizes differ (c=1 and the top concurrency): with CPU a call = F / b + m,
    ``fixed_ms`` is F (a batch) and ``per_call_ms`` m, each also by thread name
    (``by_thread``: Row.cpu_by_thread). None without both rows' batch sizes, or with equal
    ones."""
    if small is None or large is None:
        return None
    b_small, b_large = small.stages.get("batch"), large.stages.get("batch")
    if not b_small or not b_large or abs(1 / b_small - 1 / b_large) < 1e-9:
        return None

    def fit(cpu_small: float, cpu_large: float) -> tuple[float, float]:
        fixed = (cpu_small - cpu_large) / (1 / b_small - 1 / b_large)
        return fixed, cpu_small - fixed / b_small

    fixed, per_call = fit(small.cpu_ms_per_call, large.cpu_ms_per_call)
    by_thread = {}
    for name in sorted(set(small.cpu_by_thread) | set(large.cpu_by_thread)):
        f, m = fit(small.cpu_by_thread.get(name, 0.0), large.cpu_by_thread.get(name, 0.0))
        by_thread[name] = {"fixed_ms": f, "per_call_ms": m}
    return {"fixed_ms": fixed, "per_call_ms": per_call, "batches": (b_small, b_large),
            "by_thread": by_thread}


def target_lines(rows: Sequence[Row], parts: dict[str, float], top_c: int,
                 cpus: int = 1) -> list[str]:
    """The service's targets, each with the figures it is computed from in this run and
    whether it holds."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    f = target_figures(rows, parts, top_c, cpus)
    out = ["", "targets:"]
    if "cpu" in f:
        cpu = f["cpu"]
        out.append(f"  CPU per call at c={top_c}: server {cpu['server']:.3f} ms against "
                   f"the parts' {cpu['parts']:.3f} (echo {cpu['echo']:.3f} + ANN "
                   f"{parts['ann_ms_per_query']:.3f} + tower {parts['tower_ms_per_user']:.3f} + "
                   f"Redis parse {parts['redis_parse_ms_per_user']:.3f}, batch "
                   f"{parts['batch']}): {cpu['ratio']:.2f}x (<= 1.2: "
                   f"{verdict(cpu['ratio'] <= 1.2)})")
        if "cpu_at_rate" in f:
            at = f["cpu_at_rate"]
            out.append(f"    with echo's CPU per call at the server's rate "
                       f"({at['rps']:,.0f}/s, echo {at['echo']:.3f} ms in place of "
                       f"{cpu['echo']:.3f} at its own {cpu['echo_rps']:,.0f}/s): parts "
                       f"{at['parts']:.3f}, {at['ratio']:.2f}x")
    def half_line(who: str, h: dict) -> str:
        return (f"  half load{who} ({h['rps']}/s): p99 {h['p99']:.2f} ms against echo's "
                f"{h['echo_p99']:.2f} at that rate, {h['p99_ratio']:.2f}x (<= 2: "
                f"{verdict(h['p99_ratio'] <= 2)}); p50 {h['p50']:.2f} against "
                f"{h['c1_p50']:.2f} at c=1, {h['p50_ratio']:.2f}x (<= 1.5: "
                f"{verdict(h['p50_ratio'] <= 1.5)}); errors {h['errors']}")

    for variant in sorted(k for k in f if k.startswith("workers")):
        w = f[variant]
        if "cpu_ratio" in w:
            out.append(f"  {variant} against 1 worker at c={top_c}: CPU per call "
                       f"{w['cpu_ratio']:.2f}x (<= 1.10: {verdict(w['cpu_ratio'] <= 1.10)}), "
                       f"PSS {w['pss']:.0f} against {w['server_pss']:.0f} MiB, "
                       f"{w['pss_ratio']:.2f}x (<= 1.3: {verdict(w['pss_ratio'] <= 1.3)}), "
                       f"{w['rps']:,.0f} against {w['server_rps']:,.0f} calls/s")
    if "half" in f:
        out.append(half_line("", f["half"]))
        if "echo_own_p50_ratio" in f["half"]:
            out.append(f"    (echo at half its own maximum: p50 "
                       f"{f['half']['echo_own_p50_ratio']:.2f}x its c=1 p50)")
    for variant in sorted(k for k in f if k.startswith("workers") and "half" in f[k]):
        out.append(half_line(f", {variant} at its own", f[variant]["half"]))
    if "half_busy" in f:
        h = f["half_busy"]
        out.append(f"  not a target, the same ratios at the nominally half-busy rate "
                   f"({h['rps']}/s; measured {100 * h['busy']:.0f} % of {cpus} CPU busy): p99 "
                   f"{h['p99']:.2f} ms, {h['p99_ratio']:.2f}x echo's {h['echo_p99']:.2f}; "
                   f"p50 {h['p50']:.2f}, {h['p50_ratio']:.2f}x c=1's; errors {h['errors']}")
    if "fixed" in f:
        fx = f["fixed"]
        threads = sorted(fx["by_thread"].items(), key=lambda kv: -kv[1]["fixed_ms"])
        out.append(f"  why: CPU a call = F/b + m over batches of b (c=1: "
                   f"{fx['batches'][0]:.1f}, c={top_c}: {fx['batches'][1]:.1f}): F "
                   f"{fx['fixed_ms']:.3f} ms a batch ("
                   + ", ".join(f"{name} {v['fixed_ms']:.3f}" for name, v in threads[:4])
                   + f"), m {fx['per_call_ms']:.3f} ms a call")
        if "half" in fx:
            h = fx["half"]
            out.append(f"    at half load ({h['rps']:,.0f}/s) batches of {h['batch']:.1f} at "
                       f"{h['cpu']:.3f} ms a call: the worker {100 * h['busy']:.0f} % busy")
    if "naive" in f:
        x = f["naive"]["ratio"]
        out.append(f"  server against naive (best closed loop): {x:.2f}x (>= 3: "
                   f"{verdict(x >= 3)})")
    return out if len(out) > 2 else []


def _two_tower(*args: str, prints_path: bool = True) -> str:
    """Runs one two-tower subcommand; returns the last line it printed (the path it made,
    for the commands that print one)."""
    log.info("two-tower %s", shlex.join(args))
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or (prints_path and not lines):
        raise ArtifactsUnavailable(
            f"`two-tower {args[0]}` failed (exit {done.returncode}): "
            f"{done.stderr.strip()[-1500:] or '(no stderr)'}\n"
            "Pass --model DIR --index DIR to load-test artifacts you already have.")
    return lines[-1].strip() if lines else ""


# --- command line ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadtest",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model artifact dir (default: made in --workdir)")
    p.add_argument("--index", type=Path, help="index artifact dir (with --model)")
    p.add_argument("--features", type=Path, help="dataset dir that fills the server's "
                   "in-process feature store (default with --workdir: its data)")
    p.add_argument("--redis-url", help="serve user features from this Redis instead")
    p.add_argument("--redis", action="store_true",
                   help="start a redis-server of this run's own, fill it with the data's "
                        "users (two-tower load-features) and serve from it")
    p.add_argument("--items", type=int, default=50_000,
                   help="catalogue size of the artifacts made in --workdir")
    p.add_argument("--clusters", type=int, default=10,
                   help="taste clusters of the made catalogue (two-tower generate --clusters)")
    p.add_argument("--content-dims", type=int, default=0,
                   help="dense content features per item of the made catalogue (two-tower "
                        "generate --content-dims): without them, items nobody touched tie "
                        "on category and tags")
    p.add_argument("--index-spec", default="auto",
                   help="index of the made pair (two-tower build-index --index), e.g. "
                        "IVF4096,SQ8; nprobe is tuned to the recall gate either way")
    p.add_argument("--workdir", type=Path, default=REPO / "artifacts/loadtest",
                   help="made artifacts and raw ghz reports (reused when present)")
    p.add_argument("--users", type=Path, default=DEFAULT_USERS,
                   help="user ids, one a line, sent round-robin")
    p.add_argument("--concurrency", default="1,10,50",
                   help="comma-separated closed-loop worker counts")
    p.add_argument("--rate", default="100",
                   help="comma-separated open-loop arrival rates: per second (0: no "
                        f"open-loop run), a share of each variant's best closed-loop RPS in "
                        f"this run (0.25max), {HALF_MAX} (= 0.5max), or {HALF_BUSY}: the "
                        "rate at which each variant's CPU per call at c=1 adds up to half of "
                        "its CPUs (nominally half busy, whatever batching gains)")
    p.add_argument("--duration", default="10s", help="length of each ghz run (ghz -z)")
    p.add_argument("--total", type=int, default=0,
                   help="requests per ghz run instead of --duration (ghz -n)")
    p.add_argument("--warmup", type=int, default=200, help="requests before measuring")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small artifacts and, unless given, c=1,4, 2s runs, "
                        "20/s open loop, 50 warm-up requests")
    p.add_argument("--variants", default="echo,naive,server",
                   help="built-in variants to run: echo (canned reply), naive (pinned "
                        "per-request baseline), server (two-tower serve as it is now)")
    p.add_argument("--server-args", default="",
                   help="extra `two-tower serve` arguments for every server variant")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="ARGS"',
                   help="also run `two-tower serve` with these extra arguments (repeatable)")
    p.add_argument("--no-cpu-parts", dest="cpu_parts", action="store_false",
                   help="skip timing the unavoidable parts of a call (ANN, tower, Redis "
                        "parse) apart, which the CPU-per-call target is stated against")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    p.add_argument("--connections", type=int, default=1,
                   help="ghz --connections for every measured run (at most the concurrency "
                        "in closed loop): serve --workers N shares its port by connection, so "
                        "one connection reaches one worker; give several to load them all")
    p.add_argument("--placement", choices=("split", "shared"), default="split",
                   help="split: ghz on the last CPU, every server on the others (serve "
                        "--cpu-affinity, unless a variant gives its own); shared: nothing "
                        "pinned (the runs before stop 21)")
    p.add_argument("--note", default="", help="stored with the results and on the plots")
    p.add_argument("--write-data", type=Path, metavar="FILE",
                   help="only write the ghz call data made from --users to FILE, and exit")
    return p


def _variants(args, pair: tuple[Path, Path, Path | None] | None,
              placement: Placement = Placement()) -> list[Variant]:
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(chosen) - {"echo", "naive", "server"}
    if unknown:
        raise ValueError(f"--variants: expected some of echo, naive, server "
                         f"(got {sorted(unknown)})")
    cpus = None if placement.servers is None else ",".join(map(str, placement.servers))
    pinned = [] if cpus is None else ["--cpus", cpus]
    out = [Variant("echo", [*ECHO, *pinned])] if "echo" in chosen else []
    if pair is None:
        return out
    base = shlex.split(args.server_args)
    model, index, features = pair
    if "naive" in chosen:
        out.append(Variant("naive", serve_command(model, index, features, args.redis_url,
                                                  pinned, base=NAIVE)))
    serve = [("server", [])] if "server" in chosen else []
    for spec in args.variant:
        name, sep, extra = spec.partition("=")
        if not sep or not name:
            raise ValueError(f'--variant: expected NAME="serve args" (got {spec!r})')
        serve.append((name, shlex.split(extra)))
    # One serving process unless the variant's args say --workers (a later flag wins): the
    # default with Redis would be every usable core (retrieval.workers).
    # --metrics-port 0: its stage timings are read around each run
    affinity = [] if cpus is None else ["--cpu-affinity", cpus]
    return out + [Variant(name, serve_command(model, index, features, args.redis_url,
                                              ["--workers", "1", "--metrics-port", "0",
                                               *affinity, *base, *extra]))
                  for name, extra in serve]


def wants_server(args) -> bool:
    return bool(args.variant) or bool({"naive", "server"} & set(args.variants.split(",")))


def _pair(args) -> tuple[Path, Path, Path | None] | None:
    if (args.model is None) != (args.index is None):
        raise ValueError("--model and --index go together (got only one)")
    if args.model is None and not wants_server(args):
        return None
    if args.model is not None:
        if args.features is None and not args.redis_url:
            log.warning("no --features or --redis-url: every user is served cold-start")
        return args.model, args.index, args.features
    try:
        model, index, data = ensure_artifacts(args.workdir, args.quick, args.items,
                                               args.content_dims, args.clusters,
                                               args.index_spec)
    except (ArtifactsUnavailable, subprocess.TimeoutExpired) as exc:
        log.error("no model/index pair, so only the echo server is measured: %s", exc)
        return None
    return model, index, args.features or data


def _meta(ghz: Path, variants: Sequence[Variant], note: str) -> dict:
    return {"utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": f"{platform.node() or 'host'} ({os.cpu_count()} cores)",
            "ghz": f"{ghz} {ghz_version(ghz)}", "ghz_cpus": 1, "note": note,
            "noisy": "noisy" in note.lower(),
            "command": shlex.join(["python", "-m", "benchmarks.loadtest", *sys.argv[1:]]),
            "variants": {v.name: shlex.join(v.command) for v in variants}}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.write_data is not None:
        args.write_data.write_text(json.dumps(call_data(
            read_user_ids(args.users), context=served_context(args.model)), indent=1))
        return 0
    ghz = find_ghz()
    if ghz is None:
        print("loadtest: ghz not found in .tools/bin or on PATH; run `bash .ci/install-ghz.sh`",
              file=sys.stderr)
        return 2
    if args.quick:  # smaller defaults; values given on the command line are kept
        for name, value in (("concurrency", "1,4"), ("duration", "2s"), ("rate", "20"),
                            ("warmup", 50)):
            if getattr(args, name) == _parser().get_default(name):
                setattr(args, name, value)
    try:
        return _run(args, ghz)
    except (ValueError, OSError, ProcessStartError) as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, ghz: Path) -> int:
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not concurrency or min(concurrency) < 1:
        raise ValueError(f"--concurrency: expected positive integers (got {args.concurrency!r})")
    parse_duration(args.duration)  # validates early
    parse_rates(args.rate)
    pair = _pair(args)
    with ExitStack() as stack:
        if args.redis and pair is not None:
            args.redis_url = filled_redis(stack, args.workdir, pair[2])
        return _measure_all(args, ghz, pair, concurrency)


def _sharers(pair) -> dict[int, str]:
    """Processes (not this run's) that map the pair's files or the serving cache: a server
    left running from an earlier run shares those pages and lowers every server's PSS, one
    worker's more than two workers' (a stray 1M-item server turned 1.18x into 1.61x)."""
    if pair is None:
        return {}
    from retrieval import mapped_cache

    found = pids_mapping([d for d in (*pair[:2], mapped_cache.cache_dir()) if d is not None])
    for pid, path in sorted(found.items()):
        log.warning("process %d maps %s: PSS divides those pages with it (stop it for the "
                    "memory figures)", pid, path)
    return found


def filled_redis(stack: ExitStack, workdir: Path, data: Path | None) -> str:
    """A private redis-server holding the users of ``data``; stopped with ``stack``."""
    if data is None:
        raise ValueError("--redis needs the users' data: pass --features DIR (or no --model)")
    url = stack.enter_context(redis_server(workdir / "redis"))
    _two_tower("load-features", "--data", str(data), "--redis-url", url, prints_path=False)
    log.info("serving features from %s, filled from %s", url, data)
    return url


def _measure_all(args: argparse.Namespace, ghz: Path, pair, concurrency: list[int]) -> int:
    placement = Placement.of(args.placement)
    variants = _variants(args, pair, placement)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data_file = args.workdir / "call-data.json"
    context = served_context(pair[0] if pair is not None else None)
    log.info("requests carry context %s (the served model's)", ", ".join(context) or "none")
    data_file.write_text(json.dumps(call_data(read_user_ids(args.users), context=context)))
    server_cpus = 1 if placement.servers is None else len(placement.servers)
    plan = Plan(tuple(concurrency), parse_rates(args.rate), args.duration, args.total,
                args.connections, server_cpus)
    rows, latencies, failed = [], {}, []
    sharers = _sharers(pair)
    for variant in variants:
        try:
            variant_rows, latencies[variant.name] = measure(
                ghz, variant, plan, data_file, args.workdir / "runs", args.warmup,
                ghz_cpus=placement.ghz)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
            log.error("variant %s not measured: %s", variant.name, exc)
            failed.append(variant.name)
            continue
        rows += variant_rows
    if "echo" in latencies and "server" in latencies and (0.5 in plan.rates
                                                          or HALF_BUSY in plan.rates):
        # the tail target compares with echo at each serving variant's own half-max rate
        # (and half-busy rate)
        serving = {r.variant for r in rows if r.variant not in ("echo", "naive")}
        wanted = {v: {max(1, round(_best(rows, v) * 0.5)),
                      half_busy_rps([r for r in rows if r.variant == v], server_cpus)}
                  for v in serving}
        halves = [r.target_rps for r in rows if r.mode == "open" and r.variant in serving
                  and r.target_rps in wanted[r.variant]]
        echo = next(v for v in variants if v.name == "echo")
        # and at the server's best closed-loop rate: gRPC's CPU per call falls as the call
        # rate rises (more calls a loop turn), so echo at its own maximum is a lower part
        # than the server's gRPC work at the server's rate
        top = max(1, round(_best(rows, "server")))
        extra, extra_lat = measure(ghz, echo, plan, data_file, args.workdir / "runs", args.warmup,
                                   opens=[Load("open", max(plan.concurrency), plan.duration,
                                               rps=r, total=plan.total,
                                               connections=plan.connections)
                                          for r in dict.fromkeys((*halves, top))],
                                   ghz_cpus=placement.ghz)
        rows += [dataclasses.replace(r, variant="echo@srv") for r in extra]
        latencies["echo@srv"] = extra_lat
    parts = {}
    if args.cpu_parts and pair is not None and args.redis_url and "server" in latencies:
        batch = next((r.stages.get("batch", 1.0) for r in rows if r.variant == "server"
                      and r.mode == "closed" and r.concurrency == max(plan.concurrency)), 1.0)
        parts = measure_parts(pair[0], pair[1], args.redis_url, read_user_ids(args.users),
                              batch)
    print(format_table(rows))
    print("\nwhere a call's time goes (server /metrics, mean ms):")
    print(format_stages(rows))
    lines = summary(rows) + target_lines(rows, parts, max(plan.concurrency), server_cpus)
    print("\n".join(lines))
    if sharers:
        lines.append(f"  note: {len(sharers)} other processes mapped the pair's files (pids "
                     f"{', '.join(map(str, sorted(sharers)))}): the PSS figures are shares "
                     "with them, not the servers' own")
        print(lines[-1])
    meta = {**_meta(ghz, variants, args.note), "placement": placement.describe(),
            "server_cpus": server_cpus,
            "summary": lines, "cpu_parts": parts, "other_mappers": sorted(sharers)}
    for path in write_results(rows, latencies, meta, args.out):
        log.info("wrote %s", path)
    if pair is None and wants_server(args):
        failed.append("naive/server (no model/index pair; see the error above)")
    if failed:
        print(f"loadtest: not measured: {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What one batch costs the server's compute thread, stage by stage, at batch sizes 1-32:
the CPU a batch pays whatever its size (F) against what each call adds (m).

    .venv/bin/python -m benchmarks.batch_cost --workdir /work/art19/loadtest \\
        --items 1000000 --clusters 1000 --content-dims 8 [--redis-url URL] [--rounds 300]

The pair is the load test's (benchmarks.loadtest: ``--workdir`` and the sizes find its
pair.json; or ``--model DIR --index DIR --data DIR``), served from a redis-server of the
run's own filled with the data's users (or ``--redis-url``). One thread, one OpenMP
thread, in this process: each batch size's batches are the real ``Retriever`` stages
(retrieval.retriever) on users taken in turn, so no batch repeats the one before it:

* ``read``: the batch's users from Redis (``Retriever._read_batch``: one round trip,
  decoding included, the wait for the reply not counted);
* ``inputs``: the requests and their tower inputs (contracts.inputs.user_inputs);
* ``tower``: the NumPy user tower;
* ``search``: the exclusions and the Faiss search at the served setting, k=100;
* ``reply``: each call's top k and the reply bytes of the batch;
* ``batch``: ``_read_batch`` then ``_compute_batch`` as the server runs them (its glue and
  metrics too), measured apart from the stages above.

Thread CPU (time.thread_time) per batch, the median over ``--rounds`` batches a size (the
sizes take turns, one batch each, so that a machine that slows down meanwhile slows every
size alike); F
and m of each stage are the least-squares line through its CPU per batch against the
batch size. The load test fits the same F and m from its c=1 and c=50 rows
(loadtest.batch_cost), where gRPC, the event loop and the other process on the core add
their own.

Writes batch_cost.json and batch_cost.png to --out (benchmarks/results) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SIZES = (1, 2, 4, 8, 16, 32)
STAGES = ("read", "inputs", "tower", "search", "reply")
K = 100
RESULTS = Path(__file__).resolve().parent / "results"


def measure(model: Path, index: Path, redis_url: str, user_ids: list[str],
            sizes: tuple[int, ...] = SIZES, rounds: int = 300) -> dict:
    """CPU ms per batch of each stage at each size, and each stage's F and m."""
    import faiss

    from contracts.inputs import user_inputs
    from retrieval.feature_store import RedisFeatureStore
    from retrieval.pair import load_pair
    from retrieval.query import RetrieveQuery
    from retrieval.retriever import BatchingConfig, Retriever, _excluded, _Job, _user_request

    faiss.omp_set_num_threads(1)
    pair = load_pair(model, index)
    retriever = Retriever(RedisFeatureStore.from_url(redis_url),
                          batching=BatchingConfig(faiss_threads=1))
    retriever.set_pair(pair)
    spec = pair.model.feature_spec
    context = {f.name: "mobile" if f.name == "device" else 9
               for f in spec.tower("context") if f.name in ("device", "hour_of_day")}
    clock = time.thread_time
    turn = iter(range(10**9))

    def jobs(n: int) -> list:
        return [_Job(pair, RetrieveQuery(
            user_id=user_ids[next(turn) % len(user_ids)], k=K, context=context,
            event_time=int(time.time()), recent_item_ids=(), exclude_item_ids=frozenset(),
            request_id=""),
            None) for _ in range(n)]

    times = {n: {name: [] for name in (*STAGES, "batch")} for n in sizes}
    for i in range(rounds + 20):  # the sizes take turns: a drift of the machine hits all
        for n in sizes:
            batch = jobs(n)
            t0 = clock()
            read = retriever._read_batch(batch)
            t1 = clock()
            requests = [_user_request(j.query, read[r][0]) for r, j in enumerate(batch)]
            inputs = user_inputs(spec, requests)
            t2 = clock()
            emb = pair.user_tower(inputs)
            t3 = clock()
            exclude = [_excluded(j.query, q, read[r][0])
                       for r, (j, q) in enumerate(zip(batch, requests, strict=True))]
            found = pair.index.search(emb, K, exclude, [j.query.rules for j in batch])
            t4 = clock()
            tops = [c.top(K) for c in found]
            pair.index.wire.records_many([t.rows for t in tops], [t.score_array for t in tops])
            t5 = clock()
            whole = jobs(n)
            t6 = clock()
            retriever._compute_batch(whole, retriever._read_batch(whole))
            t7 = clock()
            if i >= 20:  # warm-up
                for name, (a, b) in zip((*STAGES, "batch"), ((t0, t1), (t1, t2), (t2, t3),
                                                            (t3, t4), (t4, t5), (t6, t7))):
                    times[n][name].append(1e3 * (b - a))
    per_size = {n: {name: statistics.median(v) for name, v in times[n].items()} for n in sizes}
    for n in sizes:
        log.info("batch of %d: %s", n, ", ".join(f"{k} {v:.3f}" for k, v in per_size[n].items()))
    fits = {}
    for name in (*STAGES, "batch"):
        m, f = np.polyfit(np.array(sizes, float), [per_size[n][name] for n in sizes], 1)
        fits[name] = {"fixed_ms": float(f), "per_call_ms": float(m)}
    return {"sizes": list(sizes), "rounds": rounds, "ms_per_batch": per_size, "fits": fits}


def format_table(result: dict) -> str:
    names = (*STAGES, "batch")
    head = "batch size " + "".join(f"{n:>10}" for n in names) + "   (CPU ms a batch)"
    lines = [head, "-" * len(head)]
    for n in result["sizes"]:
        row = result["ms_per_batch"][n]
        lines.append(f"{n:>10} " + "".join(f"{row[name]:>10.3f}" for name in names))
    fits = result["fits"]
    lines.append(f"{'F (fixed)':>10} " + "".join(f"{fits[k]['fixed_ms']:>10.3f}" for k in names))
    lines.append(f"{'m (a call)':>10} " + "".join(f"{fits[k]['per_call_ms']:>10.3f}"
                                                   for k in names))
    return "\n".join(lines)


def save_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    at = np.arange(len(sizes))  # one bar a size, evenly spaced
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bottom = np.zeros(len(sizes))
    for name in STAGES:
        per_call = np.array([result["ms_per_batch"][n][name] / n for n in sizes])
        ax.bar(at, per_call, bottom=bottom, label=name)
        bottom += per_call
    ax.plot(at, [result["ms_per_batch"][n]["batch"] / n for n in sizes], "k.-",
            label="whole batch (the server's code)")
    ax.set_xticks(at, [str(n) for n in sizes])
    ax.set(xlabel="batch size", ylabel="compute thread CPU ms a call",
           title="A batch's cost by stage (one thread)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.ghz import read_user_ids
    from benchmarks.loadtest import DEFAULT_USERS, ensure_artifacts, filled_redis

    p = argparse.ArgumentParser(prog="python -m benchmarks.batch_cost",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="the load test's --workdir (its pair.json)")
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--content-dims", type=int, default=0)
    p.add_argument("--index-spec", default="auto", help="as the load test's")
    p.add_argument("--users", type=Path, help="user ids, one a line (default: the load "
                   "test's)")
    p.add_argument("--model", type=Path)
    p.add_argument("--index", type=Path)
    p.add_argument("--data", type=Path, help="the pair's dataset (its users)")
    p.add_argument("--redis-url", help="a Redis holding the data's users (default: a "
                   "redis-server of the run's own, filled with them)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    model, index, data = args.model, args.index, args.data
    if model is None:  # the load test's pair, made as it makes it when not there yet
        if args.workdir is None:
            p.error("give --workdir (the load test's) or --model, --index and --data")
        model, index, data = ensure_artifacts(args.workdir, False, args.items,
                                              args.content_dims, args.clusters, args.index_spec)
    elif index is None or data is None:
        p.error("--model needs --index and --data (the dataset whose users are read)")
    sizes = tuple(int(s) for s in args.sizes.split(","))
    with ExitStack() as stack:
        url = args.redis_url or filled_redis(stack, args.workdir or args.out, data)
        users = read_user_ids(args.users or DEFAULT_USERS)
        result = measure(model, index, url, users, sizes, args.rounds)
    result.update(model=str(model), index=str(index))
    print(format_table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_cost.json").write_text(json.dumps(result, indent=2))
    save_plot(result, args.out / "batch_cost.png")
    log.info("wrote %s and batch_cost.png", args.out / "batch_cost.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

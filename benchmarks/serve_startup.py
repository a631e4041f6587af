"""`two-tower serve`'s start-up: seconds from exec to SERVING, and the process's memory,
for each Python environment given (e.g. the [serve] install without TensorFlow beside the
full one).

    python -m benchmarks.serve_startup --model M --index I \\
        --python serve=/tmp/venv-serve/bin/python --python full=.venv/bin/python

Each environment is started ``--runs`` times in turn (interleaved, so a slow moment of the
machine falls on both); the table gives the median and the range. RSS is read from
/proc/<pid>/status once SERVING (VmRSS) and at its peak (VmHWM). Whether TensorFlow was
importable and whether serving imported it are read from the environment itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.processes import wait_for_port_file

RESULTS = Path(__file__).resolve().parent / "results"


def start_once(python: str, model: Path, index: Path, workdir: Path) -> dict:
    port_file, log_path = workdir / "port", workdir / "server.log"
    port_file.unlink(missing_ok=True)
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen([python, "-m", "app.cli", "serve", "--model", str(model),
                                    "--index", str(index), "--port", "0", "--port-file",
                                    str(port_file)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port_file(process, port_file, log_path, 300)
        seconds = time.monotonic() - started
        status = Path(f"/proc/{process.pid}/status").read_text()
        maps = Path(f"/proc/{process.pid}/maps").read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
    kib = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
           if line.startswith(("VmRSS", "VmHWM"))}
    return {"seconds_to_serving": seconds, "rss_mib": kib["VmRSS"] / 1024,
            "peak_rss_mib": kib["VmHWM"] / 1024, "tensorflow_loaded": "tensorflow" in maps}


def tensorflow_importable(python: str) -> bool:
    done = subprocess.run([python, "-c", "import importlib.util as u; "
                           "print(u.find_spec('tensorflow') is not None)"],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip() == "True"


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in ("seconds_to_serving", "rss_mib", "peak_rss_mib"):
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["tensorflow_loaded"] = any(r["tensorflow_loaded"] for r in runs)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--python", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_startup.json")
    args = parser.parse_args(argv)
    envs = dict(p.split("=", 1) for p in args.python)
    runs: dict[str, list[dict]] = {name: [] for name in envs}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for name, python in envs.items():
                runs[name].append(start_once(python, args.model, args.index, Path(tmp)))
                print(f"run {i + 1}/{args.runs} {name}: "
                      f"{runs[name][-1]['seconds_to_serving']:.2f} s", file=sys.stderr)
    report = {name: {"python": envs[name], "tensorflow_importable": tensorflow_importable(
        envs[name]), **summarise(r), "runs": r} for name, r in runs.items()}
    print("| environment | TF importable | TF loaded by serve | s to SERVING (median, range) "
          "| RSS MiB at SERVING | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in report.items():
        s, m, p = r["seconds_to_serving"], r["rss_mib"], r["peak_rss_mib"]
        print(f"| {name} | {r['tensorflow_importable']} | {r['tensorflow_loaded']} | "
              f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f}) | {m['median']:.0f} | "
              f"{p['median']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

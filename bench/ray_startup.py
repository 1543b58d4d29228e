"""What an embedded local Ray costs a laptop run, per optional part (deepfake.cluster's defaults come from this).

Each variant starts a fresh embedded Ray in its own process through `deepfake.cluster.connect`, runs one task
(so a worker is up), then measures: seconds to start, the memory of Ray's processes (sum of USS/PSS over the
driver's process tree), and the CPU they burn while idle for `--idle` seconds. Variants run interleaved,
`--repeats` times each. Prints one JSON document.

    python bench/ray_startup.py --repeats 2 --idle 10 --out bench/results/ray_startup.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

from report import emit  # noqa: E402 - bench/report.py, next to this script

log = logging.getLogger("bench.ray_startup")

VARIANTS: dict[str, dict] = {
    "default": {"env": {}, "options": {}},
    "no_dashboard": {"env": {}, "options": {"include_dashboard": False}},
    "no_metrics": {"env": {"RAY_enable_metrics_collection": "0"}, "options": {}},
    "no_log_to_driver": {"env": {}, "options": {"log_to_driver": False}},
    "lean": {"env": {"RAY_enable_metrics_collection": "0"}, "options": {"include_dashboard": False}},
}

CHILD = r"""
import json, os, sys, time
opts = json.loads(sys.argv[1]); idle = float(sys.argv[2])
TICK = os.sysconf("SC_CLK_TCK")

def stat(pid):  # (ppid, cpu seconds, name) from /proc (no psutil here)
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    name = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / TICK, name

def tree(root):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                kids.setdefault(stat(int(d))[0], []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], list(kids.get(root, []))
    while todo:
        pid = todo.pop(); out.append(pid); todo += kids.get(pid, [])
    return out

def cpu(pids):
    total = 0.0
    for pid in pids:
        try:
            total += stat(pid)[1]
        except OSError:
            pass
    return total

def mem(pid):  # (uss, pss) in bytes from smaps_rollup
    uss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k == "Pss":
                pss = int(v.split()[0]) * 1024
            elif k in ("Private_Clean", "Private_Dirty"):
                uss += int(v.split()[0]) * 1024
    return uss, pss

t0 = time.perf_counter()
from deepfake import cluster
import ray
cluster.connect(num_cpus=2, options=opts)
@ray.remote
def one():
    return 1
ray.get(one.remote())
started = time.perf_counter() - t0
me = os.getpid()
ps = tree(me); c0 = cpu(ps); time.sleep(idle); c1 = cpu(ps)
uss = pss = 0
names = {}
for pid in tree(me):
    try:
        u, p = mem(pid); uss += u; pss += p
        n = stat(pid)[2]; names[n] = names.get(n, 0) + p
    except OSError:
        pass
ray.shutdown()
top = sorted(names.items(), key=lambda kv: -kv[1])[:8]
print(json.dumps({"start_s": started, "pss_mb": pss / 2**20, "uss_mb": uss / 2**20, "processes": len(ps),
                  "idle_cpu_pct": 100 * (c1 - c0) / idle, "pss_mb_by_process": {k: round(v / 2**20, 1) for k, v in top}}))
"""


def run_variant(name: str, idle: float) -> dict:
    v = VARIANTS[name]
    env = {k: val for k, val in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(v["env"])
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(v["options"]), str(idle)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{name}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runs: dict[str, list[dict]] = {n: [] for n in args.variants}
    for r in range(args.repeats):
        for name in args.variants:
            res = run_variant(name, args.idle)
            log.info("round %d %s: %s", r + 1, name, {k: v for k, v in res.items() if k != "pss_mb_by_process"})
            runs[name].append(res)
    summary = {
        name: {
            key: round(statistics.median(x[key] for x in rs), 2)
            for key in ("start_s", "pss_mb", "uss_mb", "idle_cpu_pct", "processes")
        }
        | {"pss_mb_by_process": rs[-1]["pss_mb_by_process"]}
        for name, rs in runs.items()
    }
    emit(
        {
            "bench": "ray_startup",
            "cores": os.cpu_count(),
            "repeats": args.repeats,
            "idle_s": args.idle,
            "variants": {n: {"env": VARIANTS[n]["env"], "options": VARIANTS[n]["options"]} for n in args.variants},
            "median": summary,
            "runs": runs,
        },
        args.out,
    )


if __name__ == "__main__":
    main()

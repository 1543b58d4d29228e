"""Throughput of `deepfake predict` (Ray Data: streamed archive -> actor pool -> CSV) against a plain
single-process PyTorch loop (the same decode + Predictor path, no Ray) over the same images in one run,
and the peak memory of each whole process tree (driver + Ray's processes and workers).

    .venv/bin/python bench/predict_throughput.py --model models/x            # 20k images from cifake_train
    .venv/bin/python bench/predict_throughput.py --quick                     # 2k images, trains a tiny model

Both sides run as child processes so their memory is measured the same way (/proc: RSS summed over the
tree, and PSS, which counts shared pages such as Ray's object store once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from report import emit  # noqa: E402 - bench/report.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifake_train.tar.gz"


def subset_archive(src: Path, n: int, dst: Path) -> Path:
    """The first n image members of src, as a .tar.gz (what a user would hand to `deepfake predict`)."""
    from deepfake.predict import is_image_name

    k = 0
    with tarfile.open(src, "r:*") as tin, tarfile.open(dst, "w:gz", compresslevel=6) as tout:
        for m in tin:
            if m.isfile() and is_image_name(m.name):
                tout.addfile(m, tin.extractfile(m))
                k += 1
                if k >= n:
                    break
    return dst


# ---------------------------------------------------------------------------------------------- memory
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(RSS sum, PSS sum, process count) in bytes over pid and all its descendants."""
    kids, todo, pids = _children(), [pid], []
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += kids.get(p, [])
    rss = pss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss, len(pids)


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd, sampling its process tree's memory every 0.5 s; returns wall time, peaks and stdout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"rss": 0, "pss": 0, "procs": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss, pss, n = tree_memory(proc.pid)
            peak["rss"], peak["pss"], peak["procs"] = (
                max(peak["rss"], rss),
                max(peak["pss"], pss),
                max(peak["procs"], n),
            )
            stop.wait(0.5)

    t0 = time.perf_counter()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {
        "wall_s": round(wall, 2),
        "peak_rss_tree_mb": round(peak["rss"] / 2**20, 1),
        "peak_pss_tree_mb": round(peak["pss"] / 2**20, 1),
        "max_processes": peak["procs"],
        "stdout": out,
    }


# ---------------------------------------------------------------------------------------------- plain loop
def plain_loop(model: str, archive: str, batch_size: int) -> dict:
    """Decode + forward in one process: the same read_archive/predict_rows core, no Ray."""
    import torch

    from deepfake.inference import load_scorer
    from deepfake.predict import predict_rows, read_archive

    t0 = time.perf_counter()
    predictors = load_scorer(model, jit=True)
    t_load = time.perf_counter() - t0
    n, batch = 0, []
    t1 = time.perf_counter()
    for row in read_archive(archive, set()):
        batch.append(row)
        if len(batch) == batch_size:
            n += len(predict_rows(predictors, *map(list, zip(*batch)))["filename"])
            batch = []
    if batch:
        n += len(predict_rows(predictors, *map(list, zip(*batch)))["filename"])
    t = time.perf_counter() - t1
    return {
        "images": n,
        "load_s": round(t_load, 2),
        "loop_s": round(t, 2),
        "images_per_s": round(n / t, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: train a tiny one on the shipped sample)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="tar(.gz) archive of images")
    ap.add_argument("--n", type=int, default=20_000, help="images")
    ap.add_argument("--quick", action="store_true", help="2,000 images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--concurrency", type=int, help="replicas for deepfake predict (default: its own choice)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "predict_throughput.json"))
    ap.add_argument("--_plain", nargs=3, metavar=("MODEL", "ARCHIVE", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._plain:
        print(json.dumps(plain_loop(args._plain[0], args._plain[1], int(args._plain[2]))))
        return
    n = 2_000 if args.quick else args.n
    sys.path.insert(0, str(ROOT))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from tests.conftest import train_small_model

            model = str(train_small_model(tmp / "model"))
        archive = subset_archive(Path(args.data), n, tmp / "subset.tar.gz")
        py = sys.executable
        plain = run_measured([py, __file__, "--_plain", model, str(archive), str(args.batch_size)], env)
        plain.update(json.loads(plain.pop("stdout").strip().splitlines()[-1]))
        cmd = [py, "-m", "deepfake.cli", "predict", str(archive), "--model", model, "-o", str(tmp / "p.csv")]
        cmd += ["--batch-size", str(args.batch_size), "--overwrite"]
        if args.concurrency:
            cmd += ["--concurrency", str(args.concurrency)]
        ray_run = run_measured(cmd, env)
        summary = json.loads(ray_run.pop("stdout"))
        ray_run.update({k: summary[k] for k in ("rows_written", "errors", "startup_s", "replicas", "seconds")})
        ray_run["images_per_s_incl_startup"] = round(summary["rows_written"] / ray_run["wall_s"], 1)
        ray_run["images_per_s_excl_startup"] = summary["steady_images_per_s"]
    result = {
        "images": n,
        "data": Path(args.data).name,
        "model": model,
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
        "plain_pytorch": plain,
        "deepfake_predict_ray_data": ray_run,
        "ratio_excl_startup": round(ray_run["images_per_s_excl_startup"] / plain["images_per_s"], 3),
        "ratio_incl_startup": round(ray_run["images_per_s_incl_startup"] / plain["images_per_s"], 3),
        "goal_ratio": 0.8,
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    emit(result, None if args.quick and args.out == ap.get_default("out") else args.out)


if __name__ == "__main__":
    main()

"""Torch training steps on the main thread vs on a second thread of the same process, as Ray Train runs them.

Ray Train calls the training function on a thread of its own in each worker while the worker's main thread serves
Ray. When both threads have run parallel torch ops, libgomp keeps two thread teams; with more OpenMP threads than
cores it spins only briefly at its barriers before sleeping, and every op waits for woken threads. This measures
steps/s and the process's CPU use for each arrangement, in one process, in this order:

- `main`: steps on the main thread (its team is created);
- `thread`: the same steps on a new thread while the main thread's team exists (Ray Train's default);
- `thread_main_one`: the same in a fresh process whose main thread ran its ops at one OpenMP thread
  (OMP_NUM_THREADS=1, what deepfake.train.WORKER_ENV gives a Train worker) while the thread sets its own count.

    python bench/omp_threads.py --seconds 6 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from report import emit  # noqa: E402 - bench/report.py, next to this script


def steps(threads: int, seconds: float, image_size: int, batch: int) -> dict:
    """Forward + backward + AdamW steps of efficientnet_b0 on random images for `seconds`, after two warm-up steps."""
    import timm
    import torch

    torch.set_num_threads(threads)
    model = timm.create_model("efficientnet_b0", num_classes=2)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(batch, 3, image_size, image_size)

    def step() -> None:
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()

    for _ in range(2):
        step()
    cpu, start, n = time.process_time(), time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    wall = time.perf_counter() - start
    return {"steps_per_s": round(n / wall, 3), "cores_busy": round((time.process_time() - cpu) / wall, 2)}


def on_thread(fn, *args) -> dict:
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(fn(*args)))
    t.start()
    t.join()
    return box


def child(args: argparse.Namespace) -> dict:
    """In this (fresh) process: the main thread runs its ops at one thread, then the steps run on a thread."""
    steps(1, 1.0, args.image_size, args.batch)
    return on_thread(steps, args.threads, args.seconds, args.image_size, args.batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = []
    for rep in range(args.repeats):
        main_run = steps(args.threads, args.seconds, args.image_size, args.batch)
        thread_run = on_thread(steps, args.threads, args.seconds, args.image_size, args.batch)
        argv = [sys.executable, __file__, "--child", *sys.argv[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        fixed = json.loads(subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout)
        runs.append({"repeat": rep + 1, "main": main_run, "thread": thread_run, "thread_main_one": fixed})
    emit(
        {
            "setup": {k: getattr(args, k) for k in ("threads", "seconds", "image_size", "batch")},
            "runs": runs,
            "thread_over_main": [round(r["thread"]["steps_per_s"] / r["main"]["steps_per_s"], 3) for r in runs],
            "thread_main_one_over_main": [
                round(r["thread_main_one"]["steps_per_s"] / r["main"]["steps_per_s"], 3) for r in runs
            ],
        },
        args.out,
    )


if __name__ == "__main__":
    main()

"""Training throughput: Ray Train (1 and 2 workers) vs a plain single-process PyTorch loop, side by side.

Same model, image size, global batch, data and epoch loop (`deepfake.train.train_one_epoch`); equal total
cores (the plain loop gets all of them as torch threads; Ray workers split them). Figures are steady-state
images/s: the median of the epochs after the first (the first alone when there is one), so Ray's worker
start-up (reported separately) and the first epoch's warm-up do not count. Epochs of a few seconds (the small
sample) are noise; use a slice of the train split for a figure:

    python bench/train_throughput.py --data ../shared/data/cifake_train.tar.gz --max-per-class 2500 --epochs 4

    python bench/train_throughput.py --data ../shared/data/cifake_small.tar.gz

Where Ray Train's gap comes from: `--ray-task` runs the plain loop in a Ray task, `--ray-actor` on a thread of a
Ray actor (as a Train worker runs it), `--idle-actors 5` that again beside five idle actors, each after every
variant's Ray Train runs and against the same plain runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from report import emit  # noqa: E402 - bench/report.py, next to this script
from torch import nn
from torch.utils.data import DataLoader

from deepfake.config import Config
from deepfake.loop import build_optimizer, build_scheduler, make_datasets, prepare_splits, train_one_epoch
from deepfake.model import create_model, to_device
from deepfake.train import WORKER_ENV, fit

log = logging.getLogger("bench.train_throughput")
GOAL = 0.95  # issue 20: Ray Train's images/s over the plain loop's, equal total cores
SETUP_KEYS = ("data", "max_per_class", "image_size", "stem_stride", "batch_size", "epochs", "cores")


RAY_VARIANTS: dict[str, tuple[dict, dict]] = {  # ray.init options, environment of the embedded Ray
    "default": ({"include_dashboard": None}, {}),  # deepfake.cluster's defaults (metrics collection off)
    "ray_defaults": ({"include_dashboard": None}, {"RAY_enable_metrics_collection": "1"}),
    "no_dashboard": ({"include_dashboard": False}, {}),
    "no_metrics": ({"include_dashboard": None}, {"RAY_enable_metrics_collection": "0"}),
    "lean": ({"include_dashboard": False}, {"RAY_enable_metrics_collection": "0"}),
    # Ray Train's preemption watcher and metrics callbacks back on (deepfake.cluster turns them off)
    "train_extras": (
        {"include_dashboard": None},
        {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_METRICS_ENABLED": "1"},
    ),
    # OpenMP's wait policy in the Train workers (results/train_throughput_omp.json): a thread waiting at a barrier
    # sleeps at once (PASSIVE), spins without end (ACTIVE) or spins 10,000 times before it sleeps (libgomp's
    # default is 300,000): whether a partner spinning while Ray's other processes preempt a thread costs throughput
    "omp_passive": ({"include_dashboard": None}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "omp_active": ({"include_dashboard": None}, {"OMP_WAIT_POLICY": "ACTIVE"}),
    "gomp_spin_10k": ({"include_dashboard": None}, {"GOMP_SPINCOUNT": "10000"}),
}
# Ray's own OpenMP setting in the Train workers (OMP_NUM_THREADS = the worker's CPUs) instead of deepfake.train's
# WORKER_ENV, with deepfake.cluster's defaults otherwise
RAY_VARIANTS["ray_worker_env"] = RAY_VARIANTS["default"]
WORKER_ENVS = {"ray_worker_env": {}}


def base_config(args: argparse.Namespace) -> Config:
    cfg = Config()
    cfg.data.path = args.data
    cfg.data.image_size = args.image_size
    cfg.data.max_per_class = args.max_per_class
    cfg.model.stem_stride = args.stem_stride
    cfg.train.batch_size = args.batch_size
    cfg.train.epochs = args.epochs
    cfg.train.patience = 0
    cfg.train.log_every = 0
    cfg.train.storage_path = str(Path(args.storage).resolve())
    return cfg


def steady(rates: list[float]) -> float:
    """Images/s of a run: the median of its epochs after the first (which pays warm-up)."""
    return float(np.median(rates[1:] if len(rates) > 1 else rates))


def plain_loop(cfg: Config, cores: int) -> dict:
    torch.set_num_threads(cores)
    torch.manual_seed(0)
    _, _, splits = prepare_splits(cfg)
    ds = make_datasets(cfg, {"train": splits["train"]})["train"]
    loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
    model = to_device(create_model(cfg.model), torch.device("cpu"), cfg.model.channels_last)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, len(loader))
    rates = []
    for epoch in range(1, cfg.train.epochs + 1):
        stats = train_one_epoch(
            model, loader, opt, sched, nn.CrossEntropyLoss(), torch.device("cpu"), "off", epoch=epoch
        )
        rates.append(stats.count / stats.seconds)
    return {"images_per_s": steady(rates), "per_epoch": rates, "threads": cores}


def ray_train(cfg: Config, workers: int, cores: int, tag: str) -> dict:
    cfg.train.workers = workers
    cfg.train.cpus_per_worker = max(1, cores // workers)
    cfg.train.name = f"bench-{tag}-{workers}w-{int(time.time())}"
    start = time.time()
    out = fit(cfg, export=False)
    wall = time.time() - start
    rates = [h["train_images_per_s"] for h in out["history"]]
    train_time = sum(h["epoch_seconds"] for h in out["history"])
    return {
        "images_per_s": steady(rates),
        "per_epoch": rates,
        "workers": workers,
        "cpus_per_worker": cfg.train.cpus_per_worker,
        "wall_s": round(wall, 1),
        "overhead_s": round(wall - train_time, 1),  # Ray/worker start-up, checkpointing, export
    }


def ray_task_loop(args: argparse.Namespace, cores: int) -> dict:
    """The plain loop itself inside one Ray task holding all the cores, on a fresh embedded Ray: what a Ray
    worker process costs with none of Ray Train's machinery (controller, worker group, reports, checkpoints)."""
    import ray

    from deepfake import cluster

    cluster.connect()
    try:
        task = ray.remote(num_cpus=cores)(plain_loop)
        return ray.get(task.remote(base_config(args), cores))
    finally:
        cluster.disconnect()


class LoopActor:
    """The plain loop on a thread of its own in a Ray actor whose main thread goes back to serving Ray, as a Ray
    Train worker runs its loop (deepfake.train.WORKER_ENV in its environment too), but none of Ray Train's
    controller, helper actors, process group or reports."""

    def start(self, cfg: Config, cores: int) -> None:
        import threading

        self.result: dict | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = plain_loop(cfg, cores)
            except BaseException as e:  # handed to the driver by poll
                self.error = e

        self.thread = threading.Thread(target=run, name="TrainingThread", daemon=True)
        self.thread.start()

    def poll(self) -> dict | None:
        """None while the loop runs; its result, or its exception raised, once it ended."""
        if self.thread.is_alive():
            return None
        if self.error is not None:
            raise self.error
        return self.result


class IdleActor:
    """An actor that does nothing: a Python Ray worker process whose main thread still wakes 100 times a second."""

    def ready(self) -> bool:
        return True


def ray_actor_loop(args: argparse.Namespace, cores: int, idle_actors: int = 0) -> dict:
    """LoopActor on a fresh embedded Ray, polled every 2 s (Ray Train's controller polls its workers as often),
    beside `idle_actors` idle ones (Ray Train keeps five beside its worker: controller, placement-group cleaner,
    synchronization actor, autoscaling coordinator, dataset manager)."""
    import ray

    from deepfake import cluster
    from deepfake.train import worker_runtime_env

    cluster.connect()
    try:
        idle = [ray.remote(num_cpus=0)(IdleActor).remote() for _ in range(idle_actors)]
        ray.get([a.ready.remote() for a in idle])
        actor = ray.remote(num_cpus=cores, runtime_env=worker_runtime_env())(LoopActor).remote()
        ray.get(actor.start.remote(base_config(args), cores))
        while (result := ray.get(actor.poll.remote())) is None:
            time.sleep(2)
        return result
    finally:
        cluster.disconnect()


# The runs without Ray Train that follow each variant's Ray Train runs, in order: name -> (asked for, run)
EXTRA_RUNS: dict[str, tuple[Callable[[argparse.Namespace], bool], Callable[[argparse.Namespace], dict]]] = {
    "ray_task": (lambda a: a.ray_task, lambda a: ray_task_loop(a, a.cores)),
    "ray_actor": (lambda a: a.ray_actor, lambda a: ray_actor_loop(a, a.cores)),
    "ray_actor_idle": (lambda a: a.idle_actors > 0, lambda a: ray_actor_loop(a, a.cores, a.idle_actors)),
}


def extras(args: argparse.Namespace) -> list[str]:
    """Names of the extra runs asked for."""
    return [name for name, (asked, _) in EXTRA_RUNS.items() if asked(args)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cifake_small.tar.gz")
    p.add_argument("--max-per-class", type=int, default=None)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--stem-stride", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--storage", default="runs/bench")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument(
        "--ray",
        nargs="+",
        default=["default", "ray_defaults"],
        choices=sorted(RAY_VARIANTS),
        help="embedded-Ray variants to run, one after the other, each against the same plain loop",
    )
    p.add_argument("--repeats", type=int, default=1, help="run the variants this many times (medians reported)")
    p.add_argument(
        "--ray-task",
        action="store_true",
        help="also run the plain loop inside a Ray task (no Ray Train) after each variant's Ray Train runs",
    )
    p.add_argument(
        "--ray-actor",
        action="store_true",
        help="also run the plain loop on a thread of a Ray actor (how a Train worker runs it, no Ray Train)",
    )
    p.add_argument(
        "--idle-actors",
        type=int,
        default=0,
        help="with --ray-actor, also run the actor's loop beside this many idle actors (Ray Train keeps five)",
    )
    args = p.parse_args()
    if args.idle_actors and not args.ray_actor:
        p.error("--idle-actors compares against --ray-actor's run: pass both")
    logging.basicConfig(level=logging.WARNING)
    from deepfake import cluster

    # The plain loop runs before, between and after the Ray runs (this VM's speed drifts by 15% over minutes):
    # each Ray figure is divided by the mean of the plain runs on either side of it.
    plains = [plain_loop(base_config(args), args.cores)]
    results: dict = {}
    for rep, variant in enumerate(args.ray * args.repeats):
        tag = variant if args.repeats == 1 else f"{variant}_r{rep // len(args.ray) + 1}"
        options, env = RAY_VARIANTS[variant]
        saved = dict(cluster.EMBEDDED_OPTIONS)
        cluster.EMBEDDED_OPTIONS.update(options)
        os.environ.update(env)
        saved_worker_env = dict(WORKER_ENV)
        if variant in WORKER_ENVS:
            WORKER_ENV.clear()
            WORKER_ENV.update(WORKER_ENVS[variant])
        try:
            for w in args.workers:
                results[f"{tag}_{w}w"] = ray_train(base_config(args), w, args.cores, f"tp-{tag}")
        finally:
            cluster.disconnect()
            cluster.EMBEDDED_OPTIONS.clear()
            cluster.EMBEDDED_OPTIONS.update(saved)
            for key in env:
                os.environ.pop(key, None)
            WORKER_ENV.clear()
            WORKER_ENV.update(saved_worker_env)
        for name in extras(args):
            results[f"{tag}_{name}"] = EXTRA_RUNS[name][1](args)
        plains.append(plain_loop(base_config(args), args.cores))
        around = (plains[-2]["images_per_s"] + plains[-1]["images_per_s"]) / 2
        for key in [f"{tag}_{w}w" for w in args.workers] + [f"{tag}_{name}" for name in extras(args)]:
            results[key]["ratio_vs_plain_around"] = round(results[key]["images_per_s"] / around, 3)
    fig = {
        "setup": {k: getattr(args, k) for k in SETUP_KEYS},
        "ray_variants": {
            v: {"ray_init": RAY_VARIANTS[v][0], "env": RAY_VARIANTS[v][1], "worker_env": WORKER_ENVS.get(v, WORKER_ENV)}
            for v in args.ray
        },
        "plain_pytorch_runs": [round(x["images_per_s"], 1) for x in plains],
        **results,
        "ratios_vs_plain": {k: v["ratio_vs_plain_around"] for k, v in results.items()},
        "goal": f"Ray Train >= {GOAL}x the plain loop at equal total cores",
    }
    if args.repeats > 1:
        # one run's ratio moves by 0.2 with this VM's drift: the median, and every run's figure beside it
        runs = {
            f"{v}_{w}": [results[f"{v}_r{r + 1}_{w}"]["ratio_vs_plain_around"] for r in range(args.repeats)]
            for v in args.ray
            for w in [*(f"{w}w" for w in args.workers), *extras(args)]
        }
        fig["median_ratio_vs_plain"] = {k: round(float(np.median(r)), 3) for k, r in runs.items()}
        fig["runs_at_goal"] = {k: f"{sum(x >= GOAL for x in r)} of {len(r)}" for k, r in runs.items()}
    emit(fig, args.out)


if __name__ == "__main__":
    main()

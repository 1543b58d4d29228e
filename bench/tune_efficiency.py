"""What ASHA saves: wall time of an N-trial ASHA search vs the same N sampled configs run to the full budget.

Both searches run in this process, on one local Ray, on the same data split: first ASHA with a seeded
random searcher, then FIFO over exactly the configs ASHA sampled (Tune's points_to_evaluate). Prints JSON
and saves it to bench/results/tune_efficiency.json (or --out).

The default budget is 16 epochs with grace 1 and reduction factor 4: rungs at 1 and 4 epochs before the
full 16. `--scheduler asha` (the default, `deepfake.asha.PromotingASHA`) pauses every trial at every rung
and resumes only the top quarter; `--scheduler asha-stop` is Ray's ASHAScheduler, the stopping variant,
where the first trials to reach a rung always go on (there is nothing to compare them with yet), so with
only 8 trials about half of them run the whole budget.

    .venv/bin/python bench/tune_efficiency.py --data ../shared/data/cifake_small.tar.gz
    .venv/bin/python bench/tune_efficiency.py --quick          # shipped sample, 4 trials, 3 epochs
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from report import emit  # noqa: E402 - bench/report.py, next to this script

from deepfake.config import Config  # noqa: E402
from deepfake.tune import run_search  # noqa: E402


def base_config(args: argparse.Namespace) -> Config:
    cfg = Config()
    cfg.data.path = args.data
    cfg.data.image_size = args.image_size
    cfg.data.max_per_class = args.max_per_class
    cfg.model.stem_stride = args.stem_stride
    cfg.train.log_every = 0
    cfg.train.seed = args.seed
    t = cfg.tune
    t.samples, t.epochs, t.grace_period, t.reduction_factor = args.trials, args.epochs, args.grace, args.rf
    t.max_concurrent, t.cpus_per_trial_worker, t.searcher = args.max_concurrent, args.cpus_per_worker, "random"
    t.space = {
        "optimizer": {"choice": ["adamw", "sgd", "adam"]},
        "lr": {"loguniform": [1e-4, 3e-1]},  # wide on purpose: a real search meets hopeless rates
        "batch_size": {"choice": [32, 64, 128]},
        "weight_decay": {"loguniform": [1e-5, 1e-1]},
    }
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifake_small.tar.gz"))
    p.add_argument("--max-per-class", type=int, default=None)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--stem-stride", type=int, default=1)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=16, help="per-trial budget (ASHA max_t)")
    p.add_argument("--grace", type=int, default=1)
    p.add_argument("--rf", type=int, default=4)
    p.add_argument("--scheduler", choices=["asha", "asha-stop"], default="asha")
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="shipped sample, 4 trials, 3 epochs")
    p.add_argument("--work", help="keep the searches here (default: a temporary folder)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "tune_efficiency.json"))
    args = p.parse_args()
    if args.quick:
        args.data, args.trials, args.epochs, args.stem_stride = None, 4, 3, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from deepfake.cluster import connect

    connect("local", num_cpus=int(args.max_concurrent * args.cpus_per_worker))
    work = Path(args.work or tempfile.mkdtemp(prefix="tune_eff_"))
    cfg = base_config(args)

    start = time.time()
    asha = run_search(cfg, work / "asha", scheduler=args.scheduler)
    asha_wall = time.time() - start
    trials = pd.read_csv(work / "asha" / "trials.csv")
    keys = [c for c in trials.columns if c.startswith("config/")]
    points = [
        {k.removeprefix("config/"): row[k].item() if hasattr(row[k], "item") else row[k] for k in keys}
        for _, row in trials.sort_values("trial_id").iterrows()
    ]

    start = time.time()
    run_search(cfg, work / "fifo", points=points, scheduler="fifo")
    fifo_wall = time.time() - start
    full = pd.read_csv(work / "fifo" / "trials.csv")

    # Did ASHA keep the config that the full-budget run ranks best?
    fifo_best = full.iloc[0]
    asha_best_cfg = {k: asha["best_params"][k.removeprefix("config/")] for k in keys}
    fifo_rank_of_asha_best = next(
        (i + 1 for i, (_, r) in enumerate(full.iterrows()) if all(r[k] == v for k, v in asha_best_cfg.items())), None
    )
    result = {
        "data": args.data or "shipped sample",
        "max_per_class": args.max_per_class,
        "image_size": args.image_size,
        "stem_stride": args.stem_stride,
        "trials": args.trials,
        "scheduler": args.scheduler,
        "epochs_budget": args.epochs,
        "grace_period": args.grace,
        "reduction_factor": args.rf,
        "max_concurrent": args.max_concurrent,
        "asha_wall_s": round(asha_wall, 1),
        "fifo_wall_s": round(fifo_wall, 1),
        "wall_ratio": round(asha_wall / fifo_wall, 3),
        "goal_ratio": 0.4,
        "asha_epochs": int(trials["epochs_run"].sum()),
        "fifo_epochs": int(full["epochs_run"].sum()),
        "epoch_ratio": round(trials["epochs_run"].sum() / max(1, full["epochs_run"].sum()), 3),
        "asha_stopped_early": asha["stopped_early"],
        "asha_best_val_acc": asha["best_val_acc"],
        "fifo_best_val_acc": float(fifo_best["best_val_acc"]),
        "fifo_rank_of_asha_best": fifo_rank_of_asha_best,
        "asha_best_params": asha["best_params"],
        "fifo_best_params": {k.removeprefix("config/"): fifo_best[k] for k in keys},
        "per_trial_asha": trials[["trial_id", *keys, "best_val_acc", "epochs_run", "stopped_early"]].to_dict("records"),
        "host": f"{platform.node()} {os.cpu_count()} CPUs",
        "load_avg_at_end": os.getloadavg()[0],
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()

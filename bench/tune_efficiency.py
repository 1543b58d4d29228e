"""Trial schedulers side by side: Ray's ASHAScheduler, HyperBandScheduler and HyperBandForBOHB, on the same N trials and budget, in the same run, against FIFO (every trial to the full
budget). For each: wall time, trial-epochs spent, and where the config it chose ranks in the full-budget run.

All searches run in this process, on one local Ray, on the same data split: the first scheduler samples the
configs with a seeded random searcher, every other one (and FIFO) runs exactly those (Tune's
points_to_evaluate). Prints JSON and saves it to bench/results/tune_efficiency.json (or --out).

The default budget is 16 epochs with grace 1 and reduction factor 4: rungs at 1 and 4 epochs before the
full 16. `asha` is Ray's ASHAScheduler, the stopping variant, where the first trials to reach a rung always
go on (there is nothing to compare them with yet), so with only 8 trials about half of them run the whole
budget. A hand-written promoting ASHA (pause every trial at every rung, resume the top quarter) was measured
here against it (bench/results/tune_efficiency.json: 171 s against 163 s, the same trial-epochs and chosen
config) and removed, since it did not win.

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

from deepfake.config import Config, ConfigError  # noqa: E402
from deepfake.tune import run_search  # noqa: E402

log = logging.getLogger("bench.tune_efficiency")


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
    p.add_argument(
        "--schedulers",
        nargs="+",
        default=["asha", "hyperband", "bohb"],
        help="compared on the same trials (the first samples them); fifo always runs last as the reference",
    )
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

    runs: dict[str, dict] = {}

    def search(name: str, points=None) -> pd.DataFrame:
        t0 = time.time()
        res = run_search(cfg, work / name, points=points, scheduler=name)
        trials = pd.read_csv(work / name / "trials.csv")
        runs[name] = {"wall_s": round(time.time() - t0, 1), "result": res, "trials": trials}
        log.info("%s: %.0f s, %d trial-epochs", name, runs[name]["wall_s"], trials["epochs_run"].sum())
        return trials

    # the first scheduler samples the configs (seeded random search); every other one runs exactly those
    first = search(args.schedulers[0])
    keys = [c for c in first.columns if c.startswith("config/")]
    points = [
        {k.removeprefix("config/"): row[k].item() if hasattr(row[k], "item") else row[k] for k in keys}
        for _, row in first.sort_values("trial_id").iterrows()
    ]
    skipped = {}
    for name in args.schedulers[1:]:
        try:
            search(name, points)
        except ConfigError as e:  # bohb without its optional packages
            log.warning("%s skipped: %s", name, e)
            skipped[name] = str(e)
    search("fifo", points)  # every trial to the full budget: the reference ranking

    full = runs["fifo"]["trials"]

    def full_budget_rank(params: dict) -> int | None:
        """Where a scheduler's chosen config ranks among the full-budget runs (1 = the true best)."""
        for i, (_, r) in enumerate(full.iterrows()):
            if all(r[f"config/{k}"] == params[k] for k in (c.removeprefix("config/") for c in keys)):
                return i + 1
        return None

    table = {}
    for name, r in runs.items():
        chosen = {k.removeprefix("config/"): r["result"]["best_params"][k.removeprefix("config/")] for k in keys}
        rank = full_budget_rank(chosen)
        table[name] = {
            "wall_s": r["wall_s"],
            "wall_vs_fifo": round(r["wall_s"] / runs["fifo"]["wall_s"], 3),
            "trial_epochs": int(r["trials"]["epochs_run"].sum()),
            "best_val_acc_seen": r["result"]["best_val_acc"],
            "chosen_config_full_budget_rank": rank,
            "chosen_config_full_budget_val_acc": None if rank is None else float(full.iloc[rank - 1]["best_val_acc"]),
            "stopped_early": r["result"]["stopped_early"],
        }
    result = {
        "data": args.data or "shipped sample",
        "max_per_class": args.max_per_class,
        "image_size": args.image_size,
        "stem_stride": args.stem_stride,
        "trials": args.trials,
        "epochs_budget": args.epochs,
        "grace_period": args.grace,
        "reduction_factor": args.rf,
        "max_concurrent": args.max_concurrent,
        "schedulers": table,
        "not_run": skipped,
        "fifo_best_val_acc": float(full.iloc[0]["best_val_acc"]),
        "fifo_best_params": {k.removeprefix("config/"): full.iloc[0][k] for k in keys},
        "per_trial_fifo": full[["trial_id", *keys, "best_val_acc", "epochs_run"]].to_dict("records"),
        "host": f"{platform.node()} {os.cpu_count()} CPUs",
        "load_avg_at_end": os.getloadavg()[0],
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()

"""Train a recipe on one GPU inside a fixed wall-clock budget (a lent GPU is held for minutes, not hours).

The lease is short and is spent once, so nothing is guessed: the script measures the real step rate (the
recipe's loader, model, optimizer and batch, on this GPU) for each candidate input size, takes the largest
size that still fits `--min-epochs` into what is left of the budget, fixes the epoch count so that the
cosine schedule ends inside it, then trains with the torch backend (`deepfake train --backend torch`: the
same loop, checkpoints and model card as Ray Train, no Ray needed on the GPU box). The chosen size and epochs
go into the exported card's config, so `deepfake train --config` reproduces the run anywhere.

If the run is interrupted (SIGINT, e.g. `timeout -s INT`), the best epoch so far is exported (train.fit does
that for the torch backend).

    python bench/train_gpu.py --config deepfake/configs/cifake-b0-gpu.yaml --data cifake_train.tar.gz \\
        --budget 420 --sizes 64,32 --min-epochs 40 --out models/cifake-b0-gpu
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch
from report import emit  # noqa: E402 - bench/report.py, next to this script
from torch import nn
from torch.utils.data import DataLoader

from deepfake import config as cfgmod
from deepfake.checkpoint import host_info
from deepfake.data import BlobStore
from deepfake.loop import build_optimizer, loader_kwargs, make_datasets, prepare_splits, train_one_epoch
from deepfake.model import create_model, pick_device, to_device
from deepfake.train import Interrupted, fit, run_name

log = logging.getLogger("bench.train_gpu")


def step_rate(cfg: cfgmod.Config, refs: list[str], labels: list[str], store: BlobStore, batches: int) -> float:
    """Training images/s of the recipe at cfg's input size: loader workers, model, optimizer, AMP, all real.
    The first pass warms up (worker start, cuDNN autotuning); the second is timed."""
    device = pick_device(cfg.train.use_gpu)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    n = min(len(refs), batches * cfg.train.batch_size)
    ds = make_datasets(cfg, {"train": (refs[:n], labels[:n])}, store)["train"]
    loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, **loader_kwargs(cfg, device))
    model = to_device(create_model(cfg.model), device, cfg.model.channels_last)
    opt = build_optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(2):
        stats = train_one_epoch(model, loader, opt, None, loss_fn, device, cfg.train.amp, None, cfg.model.channels_last)
    return stats.count / stats.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--budget", type=float, default=420, help="seconds from start to the end of the last epoch")
    p.add_argument("--sizes", default="64,32", help="candidate input sizes, preferred first")
    p.add_argument("--min-epochs", type=int, default=40, help="the least epochs a size must fit to be chosen")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--calib-batches", type=int, default=40)
    p.add_argument("--out", help="model export folder (default: the config's train.out)")
    p.add_argument("--storage", default="runs")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    start = time.time()
    overrides = {"data.path": args.data, "train.backend": "torch", "train.storage_path": args.storage}
    overrides.update(dict(item.split("=", 1) for item in args.set))
    if args.out:
        overrides["train.out"] = args.out
    cfg = cfgmod.load(args.config, overrides)
    cfg.train.name = run_name(cfg)
    prepared = prepare_splits(cfg)
    refs, labels = prepared[2]["train"]
    n_train, n_val = len(refs), len(prepared[2]["val"][0])
    calib_refs = refs[: args.calib_batches * cfg.train.batch_size]
    store = BlobStore(calib_refs)

    calibration, chosen = [], None
    for size in (int(s) for s in args.sizes.split(",")):
        trial = cfg.copy()
        trial.data.image_size = size
        rate = step_rate(trial, calib_refs, labels, store, args.calib_batches)
        # an epoch: the train pass, validation (forward only, ~3x the rate), a checkpoint and loader restarts
        epoch_s = n_train / rate + n_val / (3 * rate) + 2.0
        left = args.budget - (time.time() - start) - 20.0  # fit's own set-up: blob store, workers, model
        epochs = min(args.max_epochs, math.floor(left / epoch_s))
        calibration.append({"image_size": size, "train_images_per_s": round(rate, 1), "epoch_s": round(epoch_s, 2)})
        log.info("size %d: %.0f img/s, %.1f s/epoch, %d epochs fit in %.0f s", size, rate, epoch_s, epochs, left)
        if epochs >= args.min_epochs:
            chosen = (size, epochs)
            break
    if chosen is None:
        chosen = (calibration[-1]["image_size"], max(1, epochs))
    cfg.data.image_size, cfg.train.epochs = chosen
    log.info("training at %d px for %d epochs", *chosen)
    del store
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    fit_start = time.time()
    interrupted = False
    try:
        out = fit(cfg, prepared=prepared)
    except Interrupted as e:  # fit exported the best epoch so far; its card's history says how many ran
        out, interrupted = e.result, True
    model_dir, metrics, history = out["model_dir"], out["metrics"], out["history"]
    emit(
        {
            "host": host_info(),
            "torch": torch.__version__,
            "calibration": calibration,
            "image_size": cfg.data.image_size,
            "epochs": cfg.train.epochs,
            "epochs_run": len(history),
            "interrupted": interrupted,
            "fit_seconds": round(time.time() - fit_start, 1),
            "total_seconds": round(time.time() - start, 1),
            "best": metrics,
            "val_acc_per_epoch": [round(h["val_acc"], 4) for h in history],
            "model_dir": model_dir,
        },
        args.json,
    )


if __name__ == "__main__":
    main()

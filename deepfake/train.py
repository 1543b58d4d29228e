"""Training, driven: the thin Ray Train driver (TorchTrainer over N workers, a checkpoint every epoch, restarts
after a crash, resume by name) around the one loop in `deepfake.loop`, the same loop in this process for
`train.backend: torch`, and the export of the best epoch as a model folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepfake import checkpoint as ckpt_io
from deepfake import cluster
from deepfake import config as cfgmod
from deepfake.config import Config, ConfigError
from deepfake.data import DataError, data_credits
from deepfake.files import is_occupied
from deepfake.labels import CLASSES
from deepfake.loop import LocalSession, prepare_splits, run_loop, with_pretrained
from deepfake.model import PACKAGED, create_model, data_config, packaged_weights, pick_device, resolve_pretrained

log = logging.getLogger(__name__)

# Ray Train runs the loop on a thread of its own in each worker; the worker's main thread serves Ray. Once both
# threads have run parallel torch ops, libgomp keeps two thread teams, and with more OpenMP threads than cores it
# stops spinning at its barriers (100 spins, then sleep): every op then waits for woken threads. On 2 cores the same
# training steps on a second thread kept 1.15-1.39 cores busy instead of 1.99 (bench/omp_threads.py). So the rest of
# the worker runs one OpenMP thread and the loop sets its own count (loop_config["threads"]). bench/train_throughput.py
# measures Ray Train with and without it (results/train_throughput_worker_env*.json, _r5.json: 1 worker, median 0.84x
# of the plain loop over 15 runs with it, 0.83x over 11 without, on 2026-12-03: a difference inside this VM's
# run-to-run spread; the mechanism is real, Ray Train's gap lies mostly elsewhere).
WORKER_ENV = {"OMP_NUM_THREADS": "1"}


def worker_runtime_env() -> dict[str, Any]:
    """RunConfig.worker_runtime_env for every TorchTrainer deepfake starts (training and multi-worker trials)."""
    return {"env_vars": dict(WORKER_ENV)}


class TrainSession:
    """Where the loop runs under Ray Train: DDP across the worker group, Train's checkpoints and reports."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_loader(self, loader):
        import ray.train.torch

        # move_to_device=False: the loop moves each batch itself. Ray's device wrapper would fetch batch k+1
        # before step k runs, so the augmentations and the model's dropout would draw from the global RNG in
        # another order than --backend torch does, and the same config would train differently on the two
        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point."""
    run_loop(loop_config, TrainSession())


def scaling(cfg: Config):
    """ScalingConfig from the settings: GPUs when present (or asked), else CPU workers sharing the cores."""
    from ray.train import ScalingConfig

    resources = cluster.cluster_resources()
    want = cfg.train.use_gpu.lower()
    gpus = resources.get("GPU", 0)
    use_gpu = want in ("true", "yes", "1") or (want == "auto" and gpus >= 1)
    cpus = cfg.train.cpus_per_worker
    if cpus is None:
        total = int(resources.get("CPU", 1))
        cpus = max(1, total // max(1, cfg.train.workers))
    return ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}), cpus


def write_uri_files(uri_dir: str, files: dict[str, str]) -> None:
    """Write small text files under a local folder or a storage URI with pyarrow's filesystems (what Ray
    Train uses itself), so local and cloud runs store them the same way."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri_dir)
    fs.create_dir(root, recursive=True)
    for name, text in files.items():
        with fs.open_output_stream(f"{root}/{name}") as f:
            f.write(text.encode())


def run_name(cfg: Config) -> str:
    return cfg.train.name or datetime.now().strftime("train-%Y%m%d-%H%M%S")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a torch-backend run, after the best epoch so far was exported; `result` is what fit
    would have returned (the history stops at the last finished epoch)."""

    def __init__(self, result: dict[str, Any]):
        super().__init__(f"interrupted after epoch {len(result['history'])}")
        self.result = result


def fit(
    cfg: Config,
    address: str | None = None,
    export: bool = True,
    prepared: tuple | None = None,
    callbacks: Sequence[Callable[[int, int], None]] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train (Ray Train, or in this process with backend "torch") and export the best checkpoint (lowest val
    loss) with its model card. `prepared`: prepare_splits(cfg)'s result, when the caller already scanned;
    `callbacks`: run_loop's per-epoch callables (they travel to the Ray Train workers, so must pickle);
    `overwrite`: replace an existing model folder at train.out (refused before training otherwise)."""
    cfgmod.check(cfg)
    backend = cfg.train.backend.lower()
    pretrained = resolve_pretrained(cfg.model.pretrained)  # a missing file fails now, not in a worker
    name = run_name(cfg)
    if export and not overwrite:
        check_out(cfg.train.out, name)
    storage = cfg.train.storage_path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    elif backend == "torch":
        raise ConfigError(f"train.storage_path: {storage} is a URI; the torch backend writes a local folder")
    run_dir = f"{storage}/{name}"
    split, rep, splits = prepared or prepare_splits(cfg)  # bad data fails before Ray starts
    if len(splits["train"][0]) < cfg.train.batch_size:
        raise DataError(
            f"the train part has {len(splits['train'][0])} images, fewer than one batch (train.batch_size "
            f"{cfg.train.batch_size}): lower the batch size or add images"
        )
    if backend == "ray":
        cluster.connect(address)
    # the resolved config and the split, next to the checkpoints (a local folder or s3:// / gs://)
    write_uri_files(run_dir, {"config.yaml": cfg.to_yaml(), "split.csv": split.to_csv(index=False)})
    loop_config = {
        "cfg": with_pretrained(cfg, pretrained).to_dict(),
        "splits": splits,
        "run_dir": run_dir,
        "callbacks": list(callbacks),
    }
    log.info("run %s (%s backend): %s", name, backend, rep["splits"])
    start = time.time()
    interrupted = False
    if backend == "ray":
        best, best_metrics, last, hardware = _fit_ray(cfg, name, storage, loop_config)
    else:
        best, best_metrics, last, hardware, interrupted = _fit_torch(cfg, Path(run_dir), loop_config)
    seconds = time.time() - start
    with last.as_directory() as d:
        history = ckpt_io.read_train_state(Path(d)).history
    out = {
        "run": name,
        "run_dir": run_dir,
        "checkpoint": best.path,
        "metrics": best_metrics,
        "history": history,
        "data": rep,
        "train_seconds": seconds,
    }
    if export:
        out["model_dir"] = str(export_best(cfg, best, best_metrics, history, rep, seconds, hardware, pretrained))
        if cfg.train.calibrate and not interrupted:
            out["trust"] = calibrate_exported(out["model_dir"], cfg.train.use_gpu)
    if interrupted:
        raise Interrupted(out)
    return out


def check_out(out: str, run: str) -> None:
    """Refuse to train into an existing model folder (or file) at `out`, unless it is this same run's own
    export (a run resumed after Ctrl-C exported its best epoch there); --overwrite replaces it."""
    if not is_occupied(out):
        return
    try:
        if (ckpt_io.read_metadata(out).get("config") or {}).get("train", {}).get("name") == run:
            return
    except ckpt_io.CheckpointError:
        pass
    raise ConfigError(f"train.out: {out} already exists; pass --overwrite to replace it, or choose another --out")


def calibrate_exported(model_dir: str, use_gpu: str = "auto") -> dict[str, Any] | None:
    """Fit the new folder's calibration and out-of-domain guard on the run's own data (deepfake.calibrate);
    data too small for it leaves the folder unfitted, with a warning: its answers say in_domain: null."""
    from deepfake.calibrate import calibrate
    from deepfake.calibration import CalibrationError
    from deepfake.guard import GuardError

    try:
        return calibrate(model_dir, device={"true": "cuda", "false": "cpu"}.get(str(use_gpu).lower(), "auto"))
    except (CalibrationError, GuardError) as e:
        log.warning(
            "%s is not calibrated (%s); answers will say in_domain: null. Run deepfake calibrate later.", model_dir, e
        )
        return None


def _fit_ray(cfg: Config, name: str, storage: str, loop_config: dict[str, Any]):
    """TorchTrainer over cfg.train.workers; Train keeps the checkpoints and restarts crashed workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    scaling_config, cpus = scaling(cfg)
    log.info("%d Ray Train workers x %s CPU, GPU=%s", cfg.train.workers, cpus, scaling_config.use_gpu)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={**loop_config, "threads": cpus},
        scaling_config=scaling_config,
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.num_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env=worker_runtime_env(),
        ),
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(metric="val_loss", mode="min") or result.checkpoint
    if best is None:
        raise RuntimeError(f"run {name} finished without a checkpoint")
    best_metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best.path), result.metrics)
    hardware = f"{cfg.train.workers} Ray Train worker(s) x {cpus} CPU" + (", GPU" if scaling_config.use_gpu else "")
    return best, best_metrics, result.checkpoint or best, hardware


def _fit_torch(cfg: Config, run_dir: Path, loop_config: dict[str, Any]):
    """The same loop in this process on one device; no worker restarts (rerun with --resume instead)."""
    if cfg.train.workers != 1:
        raise ConfigError(f"train.workers: {cfg.train.workers}; the torch backend runs one process (use ray)")
    session = LocalSession(run_dir, pick_device(cfg.train.use_gpu), cfg.train.num_to_keep)
    where = "GPU" if session.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    hardware = f"1 process (no Ray) on {where}"
    interrupted = False
    try:
        run_loop(loop_config, session)
    except KeyboardInterrupt:
        # Ctrl-C keeps what was learnt: the best finished epoch is exported like a finished run's (fit raises
        # Interrupted after the export); --resume still continues from the latest epoch
        if session.best() is None:
            raise
        interrupted = True
        hardware += f", interrupted after epoch {session.latest().metrics['epoch']}"
        log.warning("interrupted: exporting the best epoch so far (continue with --resume %s)", run_dir.name)
    best = session.best()
    if best is None:
        raise RuntimeError(f"run {run_dir.name} finished without a checkpoint")
    return best, best.metrics, session.latest(), hardware, interrupted


def export_best(cfg, best, metrics, history, rep, seconds, hardware: str, pretrained: str) -> Path:
    """The best checkpoint as a model folder; `pretrained` is fit's resolved model.pretrained."""
    dc = data_config(cfg.model.arch)
    model = create_model(cfg.model.model_copy(update={"pretrained": "none"}))  # the checkpoint sets every weight
    with best.as_directory() as d:
        ckpt_io.load_train_checkpoint(Path(d), model)
    keep = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
    data_summary = {k: v for k, v in rep.items() if k != "skipped_files"}
    meta = ckpt_io.build_metadata(
        cfg.model,
        cfg.data.image_size,
        dc["mean"],
        dc["std"],
        dc["interpolation"],
        CLASSES,
        config=cfg.to_dict(),
        metrics={k: metrics[k] for k in keep if k in metrics},
        best_epoch=metrics.get("epoch"),
        epochs_run=len(history),
        history=history,
        data=data_summary,
        train_seconds=round(seconds, 1),
        hardware=f"{hardware} on {ckpt_io.host_info()}",
        credits=data_credits(rep["source"]),
    )
    if pretrained.startswith(PACKAGED):  # the card names where the initial weights came from, and their licence
        meta["weights_origin"] = packaged_weights(pretrained)[1]
    parent = ckpt_io.parent_model(pretrained)
    if parent:
        meta["parent"] = {**parent, "path": cfg.model.pretrained}  # as given, not this machine's absolute path
    return ckpt_io.save_model(model, cfg.train.out, meta)

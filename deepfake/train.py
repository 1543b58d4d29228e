"""Training: one epoch loop (used by Ray Train, Ray Tune and the plain-PyTorch benchmark alike) and the
Ray Train driver that runs it data-parallel, checkpoints every epoch, resumes, and exports the best model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepfake import checkpoint as ckpt_io
from deepfake import config as cfgmod
from deepfake.config import LR_SCHEDULERS, Config, ConfigError, from_dict, one_of
from deepfake.data import CLASSES, BlobStore, DataError, ImageDataset, data_credits
from deepfake.model import (
    amp_dtype,
    autocast,
    create_model,
    data_config,
    freeze_frozen_batchnorm,
    input_to_device,
    pick_device,
    resolve_pretrained,
    to_device,
)
from deepfake.transforms import build_transform

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- core pieces
def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """timm's optimizer factory over the trainable parameters (no decay on norms and biases)."""
    from timm.optim import create_optimizer_v2

    t = cfg.train
    name = t.optimizer.lower()
    kwargs: dict[str, Any] = {}
    if name in ("sgd", "momentum", "nesterov"):
        kwargs["momentum"] = t.momentum
    try:
        return create_optimizer_v2(unwrap_for_opt(model), opt=name, lr=t.lr, weight_decay=t.weight_decay, **kwargs)
    except (ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f"train.optimizer {t.optimizer!r}: {e}") from None


def unwrap_for_opt(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def lr_multiplier(cfg: Config, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step LR factor for LambdaLR: StepLR (the seed's 5/0.1), cosine, or constant; linear warmup."""
    t = cfg.train
    warmup = max(0, t.warmup_epochs) * steps_per_epoch
    total = max(1, t.epochs * steps_per_epoch)
    one_of("train.scheduler", t.scheduler, LR_SCHEDULERS, ignore_case=True)
    kind = t.scheduler.lower()

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "step":
            return t.gamma ** ((step // steps_per_epoch) // max(1, t.step_size))
        if kind == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


@dataclass
class EpochStats:
    loss: float
    correct: float
    count: float
    seconds: float

    def reduced(self, device: torch.device) -> EpochStats:
        """Sum over data-parallel workers (time: the slowest), so every rank sees the same numbers."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        t = torch.tensor([self.loss, self.correct, self.count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        s = torch.tensor([self.seconds], dtype=torch.float64, device=device)
        dist.all_reduce(s, op=dist.ReduceOp.MAX)
        return EpochStats(*t.tolist(), s.item())

    @property
    def mean_loss(self) -> float:
        return self.loss / max(1.0, self.count)

    @property
    def acc(self) -> float:
        return self.correct / max(1.0, self.count)


def batch_to_device(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device, channels_last: bool):
    """(images, labels) on the device, the images in the model's memory format."""
    x, y = batch
    return input_to_device(x, device, channels_last), y.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_fn: nn.Module,
    device: torch.device,
    amp: str = "auto",
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = True,
    log_every: int = 0,
    epoch: int = 0,
) -> EpochStats:
    model.train()
    freeze_frozen_batchnorm(model)
    total_loss, correct, count = 0.0, 0.0, 0.0
    start = time.perf_counter()
    n_steps = len(loader)
    for step, batch in enumerate(loader):
        x, y = batch_to_device(batch, device, channels_last)
        with autocast(device, amp):
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = y.shape[0]
        total_loss += float(loss.detach()) * n
        correct += float((logits.detach().argmax(1) == y).sum())
        count += n
        if log_every and (step + 1) % log_every == 0:
            rate = count / (time.perf_counter() - start)
            log.info(
                "epoch %d step %d/%d loss %.4f acc %.3f %.1f img/s",
                epoch,
                step + 1,
                n_steps,
                total_loss / count,
                correct / count,
                rate,
            )
    return EpochStats(total_loss, correct, count, time.perf_counter() - start)


@torch.no_grad()
def evaluate_loader(
    model: nn.Module, loader, loss_fn: nn.Module, device: torch.device, amp: str = "auto", channels_last: bool = True
) -> EpochStats:
    model.eval()
    total_loss, correct, count = 0.0, 0.0, 0.0
    start = time.perf_counter()
    for batch in loader:
        x, y = batch_to_device(batch, device, channels_last)
        with autocast(device, amp):
            logits = model(x)
        total_loss += float(loss_fn(logits.float(), y)) * y.shape[0]
        correct += float((logits.argmax(1) == y).sum())
        count += y.shape[0]
    return EpochStats(total_loss, correct, count, time.perf_counter() - start)


def make_datasets(
    cfg: Config, splits: dict[str, tuple[list[str], list[str]]], store: BlobStore | None = None
) -> dict[str, ImageDataset]:
    dc = data_config(cfg.model.arch)
    store = store or BlobStore(ref for refs, _ in splits.values() for ref in refs)
    out = {}
    for name, (refs, labels) in splits.items():
        tf = build_transform(
            cfg.data.image_size,
            dc["mean"],
            dc["std"],
            train=(name == "train"),
            interpolation=dc["interpolation"],
            hflip=cfg.data.hflip,
            rotation=cfg.data.rotation,
            crop_padding=cfg.data.crop_padding,
            degrade=cfg.data.degrade,
        )
        out[name] = ImageDataset(refs, labels, tf, store)
    return out


def loader_kwargs(cfg: Config, device: torch.device) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_workers": cfg.data.loader_workers, "pin_memory": device.type == "cuda"}
    if cfg.data.loader_workers > 0:
        kw["persistent_workers"] = True
    return kw


# ---------------------------------------------------------------------------------------------- the loop
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

        return ray.train.torch.prepare_data_loader(loader)

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


class TuneTrialSession:
    """Where a one-worker Tune trial runs the loop: in the trial's own process, on the GPU Tune gave it if any.

    No worker group, controller or process group to start, which is most of a short trial's cost; reports and
    checkpoints go to Tune, so ASHA sees every epoch and a restored trial resumes from its last one."""

    rank, world = 0, 1

    def __init__(self) -> None:
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def prepare_loader(self, loader):
        return loader

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def get_checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


class LocalCheckpoint:
    """An epoch checkpoint folder of a torch-backend run, with the two calls fit uses of ray.train.Checkpoint."""

    def __init__(self, path: Path, metrics: dict[str, Any]):
        self.path, self.metrics = str(path), metrics

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class LocalSession:
    """Where the loop runs with train.backend torch: this process, one device. Epoch checkpoints go to the run
    folder (written whole, then renamed), the best num_to_keep by validation loss are kept, plus the latest,
    which --resume continues from."""

    rank, world = 0, 1

    def __init__(self, run_dir: Path, device: torch.device, num_to_keep: int = 2):
        self.run_dir, self.device, self.num_to_keep = Path(run_dir), device, max(1, num_to_keep)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        found = sorted(p for p in self.run_dir.glob("checkpoint_*") if p.is_dir() and not p.name.endswith(".tmp"))
        self.checkpoints = [LocalCheckpoint(p, ckpt_io.read_train_state(p).history[-1]) for p in found]

    def prepare_loader(self, loader):
        return loader

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def get_checkpoint(self) -> LocalCheckpoint | None:
        return self.latest()

    def latest(self) -> LocalCheckpoint | None:
        return max(self.checkpoints, key=lambda c: c.metrics["epoch"], default=None)

    def best(self) -> LocalCheckpoint | None:
        return min(self.checkpoints, key=lambda c: c.metrics["val_loss"], default=None)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            return
        path = self.run_dir / f"checkpoint_{metrics['epoch']:06d}"
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        self.checkpoints = [c for c in self.checkpoints if c.path != str(path)]
        self.checkpoints.append(LocalCheckpoint(path, dict(metrics)))
        keep = sorted(self.checkpoints, key=lambda c: c.metrics["val_loss"])[: self.num_to_keep] + [self.latest()]
        for c in [c for c in self.checkpoints if c not in keep]:
            shutil.rmtree(c.path, ignore_errors=True)
        self.checkpoints = [c for c in self.checkpoints if c in keep]


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point."""
    run_loop(loop_config, TrainSession())


def run_loop(loop_config: dict[str, Any], session: TrainSession | TuneTrialSession | LocalSession) -> None:
    """The one training loop: a report + checkpoint every epoch, resume from the session's checkpoint,
    early stopping agreed by all ranks (the reduced validation loss is the same on each)."""
    from torch.utils.data import DataLoader, Subset

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = from_dict(loop_config["cfg"])
    rank, world = session.rank, session.world
    if loop_config.get("threads"):
        torch.set_num_threads(int(loop_config["threads"]))
    torch.manual_seed(cfg.train.seed + rank)
    device = session.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once

    datasets = make_datasets(cfg, loop_config["splits"])
    per_worker_batch = max(1, cfg.train.batch_size // world)
    kw = loader_kwargs(cfg, device)
    train_loader = DataLoader(datasets["train"], batch_size=per_worker_batch, shuffle=True, drop_last=True, **kw)
    if len(train_loader) == 0:
        raise DataError(
            f"the train part ({len(datasets['train'])} images) is smaller than one batch ({per_worker_batch} per "
            "worker): lower train.batch_size or add images"
        )
    train_loader = session.prepare_loader(train_loader)
    # Validation shards by stride, without DistributedSampler's padding, so the reduced metrics are exact.
    val_ds = Subset(datasets["val"], range(rank, len(datasets["val"]), world))
    val_loader = DataLoader(val_ds, batch_size=per_worker_batch, **kw)

    model = to_device(create_model(cfg.model), device, cfg.model.channels_last)
    model = session.prepare_model(model)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, len(train_loader)))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype(device, cfg.train.amp) == torch.float16 else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    eval_loss = nn.CrossEntropyLoss(reduction="mean")

    state = ckpt_io.TrainState(epoch=0, best_val_loss=math.inf, epochs_since_best=0, history=[])
    resumed = session.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            state, _ = ckpt_io.load_train_checkpoint(Path(d), model, optimizer, scheduler)
        log.info("resumed from checkpoint after epoch %d", state.epoch)

    for epoch in range(state.epoch + 1, cfg.train.epochs + 1):
        if cfg.train.fail_at_epoch == epoch and rank == 0:
            marker = Path(loop_config["run_dir"]) / f".failed_once_epoch{epoch}"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                raise RuntimeError(f"injected failure at epoch {epoch} (fail_at_epoch)")
        # Seeded per epoch, so that a run resumed from a checkpoint (a crash, a paused trial) shuffles and
        # augments exactly as the uninterrupted run would have.
        torch.manual_seed(cfg.train.seed + 1009 * epoch + rank)
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        tr = train_one_epoch(
            model,
            train_loader,
            optimizer,
            scheduler,
            loss_fn,
            device,
            cfg.train.amp,
            scaler,
            cfg.model.channels_last,
            cfg.train.log_every if rank == 0 else 0,
            epoch,
        ).reduced(device)
        va = evaluate_loader(model, val_loader, eval_loss, device, cfg.train.amp, cfg.model.channels_last)
        va = va.reduced(device)
        improved = va.mean_loss < state.best_val_loss - 1e-6
        state.best_val_loss = min(state.best_val_loss, va.mean_loss)
        state.epochs_since_best = 0 if improved else state.epochs_since_best + 1
        state.epoch = epoch
        metrics = {
            "epoch": epoch,
            "train_loss": tr.mean_loss,
            "train_acc": tr.acc,
            "val_loss": va.mean_loss,
            "val_acc": va.acc,
            "lr": optimizer.param_groups[0]["lr"],
            "train_images_per_s": tr.count / max(tr.seconds, 1e-9),
            "epoch_seconds": tr.seconds + va.seconds,
            "world_size": world,
        }
        state.history.append(metrics)
        stop = cfg.train.patience > 0 and state.epochs_since_best >= cfg.train.patience
        metrics["early_stopped"] = stop
        if rank == 0:
            log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                ckpt_io.save_train_checkpoint(Path(tmp), model, optimizer, scheduler, state, {})
            session.report(metrics, Path(tmp) if rank == 0 else None)
        if stop:
            log.info("early stopping: validation loss has not improved for %d epochs", cfg.train.patience)
            break


# ---------------------------------------------------------------------------------------------- driver
def embedded(address: str | None = None) -> bool:
    """Whether ensure_ray(address) would start an embedded local Ray (no cluster given or set in RAY_ADDRESS)."""
    return (address or os.environ.get("RAY_ADDRESS")) in (None, "", "local")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS/--address if given, else start an embedded local Ray in this process.

    Ray starts its workers at nice 15, so on a small machine every normal-priority process (this driver,
    Ray's own daemons, an HTTP load generator) preempts the actual training or serving. The embedded
    Ray is the whole job here, so its workers run at normal priority (RAY_worker_niceness overrides)."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if embedded(address):
            os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address=address, num_cpus=num_cpus, logging_level=logging.WARNING, log_to_driver=True)


def scaling(cfg: Config):
    """ScalingConfig from the settings: GPUs when present (or asked), else CPU workers sharing the cores."""
    import ray
    from ray.train import ScalingConfig

    want = cfg.train.use_gpu.lower()
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = want in ("true", "yes", "1") or (want == "auto" and gpus >= 1)
    cpus = cfg.train.cpus_per_worker
    if cpus is None:
        total = int(ray.cluster_resources().get("CPU", 1))
        cpus = max(1, total // max(1, cfg.train.workers))
    return ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}), cpus


def prepare_splits(cfg: Config) -> tuple[Any, dict, dict[str, tuple[list[str], list[str]]]]:
    """Scan + split on the driver once; workers get the ref lists (not the bytes) and read their own."""
    from deepfake.data import SAMPLE_DIR, report, scan, split_samples

    path = cfg.data.path or str(SAMPLE_DIR)
    catalog = scan(path)
    split = split_samples(
        catalog.samples, cfg.data.val_ratio, cfg.data.test_ratio, cfg.data.seed, cfg.data.max_per_class
    )
    rep = report(catalog, split)
    splits = {}
    for name in ("train", "val", "test"):
        part = split[split["split"] == name]
        splits[name] = (part["ref"].tolist(), part["label"].tolist())
    if not splits["train"][0] or not splits["val"][0]:
        raise DataError(f"{path}: too few images for a train and a validation part ({rep['splits']})")
    return split, rep, splits


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


def fit(cfg: Config, address: str | None = None, export: bool = True, prepared: tuple | None = None) -> dict[str, Any]:
    """Train (Ray Train, or in this process with backend "torch") and export the best checkpoint (lowest val
    loss) with its model card. `prepared`: prepare_splits(cfg)'s result, when the caller already scanned."""
    cfgmod.check(cfg)
    backend = cfg.train.backend.lower()
    pretrained = resolve_pretrained(cfg.model.pretrained)  # a missing file fails now, not in a worker
    name = run_name(cfg)
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
        ensure_ray(address)
    # the resolved config and the split, next to the checkpoints (a local folder or s3:// / gs://)
    write_uri_files(run_dir, {"config.yaml": cfg.to_yaml(), "split.csv": split.to_csv(index=False)})
    loop_config = {"cfg": with_pretrained(cfg, pretrained).to_dict(), "splits": splits, "run_dir": run_dir}
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
    model = create_model(dataclasses.replace(cfg.model, pretrained="none"))  # the checkpoint sets every weight
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
    parent = ckpt_io.parent_model(pretrained)
    if parent:
        meta["parent"] = {**parent, "path": cfg.model.pretrained}  # as given, not this machine's absolute path
    return ckpt_io.save_model(model, cfg.train.out, meta)


def with_pretrained(cfg: Config, pretrained: str) -> Config:
    """A copy of `cfg` whose model.pretrained is `pretrained` (the recorded config keeps what was given)."""
    out = cfg.copy()
    out.model.pretrained = pretrained
    return out

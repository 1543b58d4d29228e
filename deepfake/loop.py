"""The training loop, on its own: one epoch loop and its sessions, used by Ray Train (`deepfake.train`), by Ray
Tune trials (`deepfake.tune`) and in a plain process (`train.backend: torch`) alike. No Ray here: a session
object is where the loop's checkpoints and reports go.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from deepfake import checkpoint as ckpt_io
from deepfake.config import LOG_FORMAT, LR_SCHEDULERS, Config, ConfigError, from_dict, one_of
from deepfake.data import BlobStore, DataError, ImageDataset
from deepfake.model import (
    amp_dtype,
    autocast,
    create_model,
    data_config,
    freeze_frozen_batchnorm,
    input_to_device,
    to_device,
)
from deepfake.transforms import build_transform

log = logging.getLogger(__name__)


class Session(Protocol):
    """Where the loop runs: its rank in the worker group, its device, and where checkpoints/reports go."""

    rank: int
    world: int
    device: torch.device

    def prepare_loader(self, loader): ...

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def get_checkpoint(self): ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...


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


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step schedule from torch's own schedulers: an optional linear warm-up (LinearLR), then StepLR
    (the seed's gamma every step_size epochs), CosineAnnealingLR down to 0 at the last step, or a constant lr."""
    from torch.optim import lr_scheduler as sched

    t = cfg.train
    one_of("train.scheduler", t.scheduler, LR_SCHEDULERS, ignore_case=True)
    warmup = round(max(0.0, t.warmup_epochs) * steps_per_epoch)
    rest = max(1, t.epochs * steps_per_epoch - warmup)
    kind = t.scheduler.lower()
    if kind == "step":
        main: sched.LRScheduler = sched.StepLR(
            optimizer, step_size=max(1, t.step_size) * steps_per_epoch, gamma=t.gamma
        )
    elif kind == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=rest, eta_min=0.0)
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup <= 1:
        return main
    warm = sched.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return sched.SequentialLR(optimizer, [warm, main], milestones=[warmup])


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
    progress: bool = False,
) -> EpochStats:
    model.train()
    freeze_frozen_batchnorm(model)
    total_loss, correct, count = 0.0, 0.0, 0.0
    start = time.perf_counter()
    n_steps = len(loader)
    bar = tqdm(total=n_steps, unit="step", desc=f"epoch {epoch}", disable=not progress, mininterval=2, leave=False)
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
        bar.update(1)
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
    bar.close()
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
    interactive = True  # a terminal watches this process: a progress bar per epoch

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


def run_loop(loop_config: dict[str, Any], session: Session) -> None:
    """The one training loop: a report + checkpoint every epoch, resume from the session's checkpoint,
    early stopping agreed by all ranks (the reduced validation loss is the same on each).

    `loop_config["callbacks"]`: callables `cb(epoch, rank)` run at the start of each epoch, in the process
    that trains (a progress hook, or a test's injected worker failure)."""
    from torch.utils.data import DataLoader, Subset

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
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
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
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
        for callback in loop_config.get("callbacks") or ():
            callback(epoch, rank)
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
            progress=getattr(session, "interactive", False),
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


def prepare_splits(cfg: Config) -> tuple[Any, dict, dict[str, tuple[list[str], list[str]]]]:
    """Scan + split on the driver once; workers get the ref lists (not the bytes) and read their own."""
    from deepfake.data import SAMPLE_DIR, report, scan, split_samples

    path = cfg.data.path or str(SAMPLE_DIR)
    catalog = scan(path, allow_outside=cfg.data.allow_outside)
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


def with_pretrained(cfg: Config, pretrained: str) -> Config:
    """A copy of `cfg` whose model.pretrained is `pretrained` (the recorded config keeps what was given)."""
    out = cfg.copy()
    out.model.pretrained = pretrained
    return out

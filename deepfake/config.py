"""One typed settings object for every stage: YAML sets it, the CLI overrides it, each run saves it.

Sections mirror the stages (data, model, train, tune), so a `best_config.yaml` written by the search is
a complete config that `deepfake train --config` reads unchanged.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent  # the source checkout (models/, serve_config.yaml, rayjobs/)


class ConfigError(ValueError):
    """A settings file or override that cannot be applied; the message names the key."""


def locate(path: str | Path, accept=Path.exists) -> Path:
    """A user-given path: as is when absolute, else the first of cwd/path and REPO_ROOT/path that `accept`s
    (so shipped defaults work from any directory of a checkout), else cwd/path for the error message."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return next((c for c in (Path.cwd() / p, REPO_ROOT / p) if accept(c)), Path.cwd() / p)


@dataclass
class DataConfig:
    path: str | None = None  # folder (ai/ + real/ or FAKE/ + REAL/), CSV manifest or .tar.gz; None: shipped sample
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 0
    max_per_class: int | None = None  # cap per class (after de-duplication), for quick runs
    image_size: int = 224
    hflip: bool = True  # the seed's augmentation: horizontal flip + rotation
    rotation: float = 10.0
    crop_padding: int = 0  # random shift: reflect-pad by N px and crop back (moves pixels, never resamples them)
    degrade: float = 0.0  # share of training images degraded: down-up resampling, blur, JPEG or crop (one each)
    loader_workers: int = 0  # DataLoader processes per training worker; 0 decodes in the training process
    allow_outside: bool = False  # a CSV manifest may name files outside its own folder (refused otherwise)


@dataclass
class ModelConfig:
    arch: str = "efficientnet_b0"
    pretrained: str = "none"  # "none", "hub", or a path to weights (.safetensors, or a deepfake model dir)
    finetune: str = "all"  # "all", or "last:K": the last K blocks + head (the seed used last:3)
    stem_stride: int | None = None  # 1 keeps full resolution for tiny (32 px) inputs; None: the arch's own
    drop_rate: float = 0.2
    channels_last: bool = True


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128  # per step, over all workers
    optimizer: str = "adamw"  # adamw, adam, sgd (momentum), or any timm optimizer name
    lr: float = 7.6e-4
    weight_decay: float = 3.8e-4
    momentum: float = 0.9
    scheduler: str = "step"  # step (StepLR), cosine, none
    step_size: int = 5
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    patience: int = 3  # early stopping on validation loss; 0 disables
    amp: str = "auto"  # auto (bf16/fp16 on GPU, off on CPU), bf16, fp16, off
    # ray: Ray Train's TorchTrainer (N workers, fault tolerance, cluster storage); torch: the same loop in this
    # process on one device, without Ray (a single-GPU box with no Ray installed)
    backend: str = "ray"
    workers: int = 1
    use_gpu: str = "auto"  # auto, true, false
    cpus_per_worker: int | None = None  # None: share this machine's CPUs between the workers
    seed: int = 0
    storage_path: str = "runs"  # local dir, shared filesystem or cloud URI (s3://, gs://) for Ray checkpoints
    name: str | None = None  # run name; None: a fresh timestamped name. Same name + --resume continues a run
    out: str = "models/latest"  # where the best model and its card are exported
    max_failures: int = 2  # worker crashes survived by restarting from the last checkpoint
    num_to_keep: int = 2
    calibrate: bool = True  # after export: fit temperature, operating points and the out-of-domain guard
    log_every: int = 20


@dataclass
class TuneConfig:
    samples: int = 8
    epochs: int = 4  # per-trial budget (ASHA max_t)
    grace_period: int = 1
    reduction_factor: int = 2
    # asha: pause trials at each rung, resume the top 1/reduction_factor (deepfake.asha, the paper's variant);
    # asha-stop: Ray's ASHAScheduler (a trial goes on if it beats the rung so far); fifo: every trial in full
    scheduler: str = "asha"
    searcher: str = "optuna"  # optuna (TPE) or random
    max_concurrent: int = 2
    workers_per_trial: int = 1
    cpus_per_trial_worker: float = 1.0
    gpus_per_trial_worker: float = 0.0
    metric: str = "val_acc"
    mode: str = "max"
    space: dict[str, Any] = field(
        default_factory=lambda: {
            "optimizer": {"choice": ["adamw", "sgd", "adam"]},
            "lr": {"loguniform": [1e-4, 1e-2]},
            "batch_size": {"choice": [32, 64, 128]},
            "weight_decay": {"loguniform": [1e-5, 1e-1]},
        }
    )
    out: str = "tune_out"
    name: str | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def copy(self) -> Config:
        return from_dict(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_yaml())


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a YAML or CLI value against the field's annotation, converting strings from the CLI."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        what = "an integer" if tp is int else "a number"
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {what}, got {value!r}")
        if isinstance(value, int) or (isinstance(value, float) and (tp is float or value.is_integer())):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _section_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.key` (e.g. `train.lr`) with type checking; unknown keys are an error, not ignored."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{dotted}: expected section.key, e.g. train.lr")
    section_name, key = parts
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        sections = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise ConfigError(f"unknown section {section_name!r} (known: {sections})")
    types_ = _section_types(section)
    if key not in types_:
        raise ConfigError(f"unknown key {dotted!r} (known in {section_name}: {', '.join(types_)})")
    setattr(section, key, _coerce(value, types_[key], dotted))


# Keys older configs carry that no longer mean anything (a saved run or model card still loads; nothing is set).
RETIRED = {"train.fail_at_epoch"}


def from_dict(raw: dict[str, Any] | None) -> Config:
    cfg = Config()
    if raw is None:
        return cfg
    if not isinstance(raw, dict):
        raise ConfigError("a config file must be a mapping of sections (data, model, train, tune)")
    for section_name, values in raw.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section {section_name!r} must be a mapping")
        for key, value in values.items():
            if f"{section_name}.{key}" not in RETIRED:
                set_value(cfg, f"{section_name}.{key}", value)
    return cfg


LR_SCHEDULERS = ("step", "cosine", "none")
BACKENDS = ("ray", "torch")
AMP = ("auto", "bf16", "fp16", "off")


def at_least(*rules: tuple[str, float | None, float]) -> None:
    """(key, value, lowest allowed) rules; None values are unset options, not errors."""
    for key, value, low in rules:
        if value is not None and value < low:
            raise ConfigError(f"{key}: must be >= {low}, got {value}")


def one_of(key: str, value: str, choices: tuple[str, ...], ignore_case: bool = False) -> None:
    """A setting that names one of a fixed set (a scheduler, a backend); the message lists the set."""
    if (value.lower() if ignore_case else value) not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def check(cfg: Config) -> None:
    """The values a run would otherwise reject late (after the scan, inside a Ray worker, with a traceback)
    or misread silently (an unknown amp mode), refused up front with the key in the message."""
    from timm.optim import list_optimizers

    d, m, t = cfg.data, cfg.model, cfg.train
    at_least(
        ("data.image_size", d.image_size, 8),
        ("data.max_per_class", d.max_per_class, 1),
        ("data.rotation", d.rotation, 0),
        ("data.crop_padding", d.crop_padding, 0),
        ("data.loader_workers", d.loader_workers, 0),
        ("model.stem_stride", m.stem_stride, 1),
        ("model.drop_rate", m.drop_rate, 0),
        ("train.epochs", t.epochs, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.weight_decay", t.weight_decay, 0),
        ("train.momentum", t.momentum, 0),
        ("train.step_size", t.step_size, 1),
        ("train.warmup_epochs", t.warmup_epochs, 0),
        ("train.label_smoothing", t.label_smoothing, 0),
        ("train.patience", t.patience, 0),
        ("train.workers", t.workers, 1),
        ("train.cpus_per_worker", t.cpus_per_worker, 1),
        ("train.max_failures", t.max_failures, -1),
        ("train.num_to_keep", t.num_to_keep, 1),
        ("train.log_every", t.log_every, 0),
    )
    for key, value in (
        ("model.drop_rate", m.drop_rate),
        ("train.momentum", t.momentum),
        ("train.label_smoothing", t.label_smoothing),
    ):
        if value >= 1:
            raise ConfigError(f"{key}: must be below 1, got {value}")
    if t.lr <= 0 or t.gamma <= 0:
        raise ConfigError(f"train.lr and train.gamma must be > 0, got {t.lr} and {t.gamma}")
    one_of("train.scheduler", t.scheduler, LR_SCHEDULERS, ignore_case=True)
    one_of("train.backend", t.backend, BACKENDS, ignore_case=True)
    one_of("train.amp", t.amp, AMP, ignore_case=True)
    if t.optimizer.lower() not in list_optimizers():
        raise ConfigError(f"train.optimizer: unknown optimizer {t.optimizer!r} (adamw, adam, sgd or another timm name)")
    if t.batch_size // t.workers < 2:
        raise ConfigError(
            f"train.batch_size: {t.batch_size} over {t.workers} worker(s) leaves {t.batch_size // t.workers} "
            "image(s) per worker step; BatchNorm needs at least 2"
        )


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- overrides (dotted keys); the order the CLI applies them in."""
    raw = None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
    cfg = from_dict(raw)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_value(cfg, key, value)
    return cfg

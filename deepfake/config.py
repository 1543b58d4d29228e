"""One typed settings object for every stage: YAML sets it, the CLI overrides it, each run saves it.

Sections mirror the stages (data, model, train, tune), so a `best_config.yaml` written by the search is
a complete config that `deepfake train --config` reads unchanged. The sections are pydantic models (the
settings system the Serve app's arguments use too): pydantic checks and converts every value, unknown keys
are refused, and a bad value is a ConfigError that names its key.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

REPO_ROOT = Path(__file__).resolve().parent.parent  # the source checkout (models/, serve_config.yaml, rayjobs/)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the CLI, Ray job entrypoints and Train workers


class ConfigError(ValueError):
    """A settings file or override that cannot be applied; the message names the key."""


def locate(path: str | Path, accept=Path.exists) -> Path:
    """A user-given path: as is when absolute, else the first of cwd/path and REPO_ROOT/path that `accept`s
    (so shipped defaults work from any directory of a checkout), else cwd/path for the error message."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return next((c for c in (Path.cwd() / p, REPO_ROOT / p) if accept(c)), Path.cwd() / p)


class Section(BaseModel):
    """A config section: typed fields with defaults; assignments are checked as well as construction."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class DataConfig(Section):
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


class ModelConfig(Section):
    arch: str = "efficientnet_b0"
    pretrained: str = "none"  # "none", "hub", or a path to weights (.safetensors, or a deepfake model dir)
    finetune: str = "all"  # "all", or "last:K": the last K blocks + head (the seed used last:3)
    stem_stride: int | None = None  # 1 keeps full resolution for tiny (32 px) inputs; None: the arch's own
    drop_rate: float = 0.2
    channels_last: bool = True


class TrainConfig(Section):
    epochs: int = 10
    batch_size: int = 128  # per step, over all workers
    optimizer: str = "adamw"  # adamw, adam, sgd (momentum), or any timm optimizer name
    lr: float = 7.6e-4
    weight_decay: float = 3.8e-4
    momentum: float = 0.9
    scheduler: str = "step"  # step (StepLR), cosine, none
    step_size: int = 5
    gamma: float = 0.1
    warmup_epochs: float = 0  # linear warm-up, in epochs (fractions allowed: 0.25 = a quarter of the first)
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


class TuneConfig(Section):
    samples: int = 8
    epochs: int = 4  # per-trial budget (ASHA max_t)
    grace_period: int = 1
    reduction_factor: int = 2
    # asha: Ray's ASHAScheduler (a trial goes on if it beats the rung so far); a hand-written promoting ASHA
    # did not beat it in bench/tune_efficiency.py (171 s against 163 s, the same trial-epochs and the same
    # chosen config) and was removed; hyperband, bohb: Ray's HyperBand schedulers; fifo: every trial in full
    scheduler: str = "asha"
    searcher: str = "optuna"  # optuna (TPE) or random
    max_concurrent: int = 2
    workers_per_trial: int = 1
    cpus_per_trial_worker: float = 1.0
    gpus_per_trial_worker: float = 0.0
    metric: str = "val_acc"
    mode: str = "max"
    space: dict[str, Any] = Field(
        default_factory=lambda: {
            "optimizer": {"choice": ["adamw", "sgd", "adam"]},
            "lr": {"loguniform": [1e-4, 1e-2]},
            "batch_size": {"choice": [32, 64, 128]},
            "weight_decay": {"loguniform": [1e-5, 1e-1]},
        }
    )
    out: str = "tune_out"
    name: str | None = None


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def copy(self) -> Config:
        return from_dict(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_yaml())


WHAT = {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}


def _base_type(annotation: Any) -> Any:
    """int for `int | None`, dict for `dict[str, Any]`, ..."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if args and origin is not dict:
        return _base_type(args[0])
    return origin or annotation


def set_value(cfg: Config, dotted: str, value: Any, label: str | None = None) -> None:
    """Set `section.key` (e.g. `train.lr`), checked and converted by pydantic (CLI strings included: "7",
    "false", "none", a YAML mapping); unknown keys are an error, not ignored. `label`: the key as the
    user wrote it, for messages (default `dotted`)."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{dotted}: expected section.key, e.g. train.lr")
    section_name, key = parts
    if section_name not in Config.model_fields:
        raise ConfigError(f"unknown section {section_name!r} (known: {', '.join(Config.model_fields)})")
    section = getattr(cfg, section_name)
    fields = type(section).model_fields
    if key not in fields:
        raise ConfigError(f"unknown key {dotted!r} (known in {section_name}: {', '.join(fields)})")
    annotation = fields[key].annotation
    base = _base_type(annotation)
    optional = type(None) in typing.get_args(annotation)
    if isinstance(value, str):
        if optional and value.strip().lower() in ("none", "null", ""):
            value = None
        elif base is dict:
            value = yaml.safe_load(value)
    label = label or dotted
    if base is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{label}: expected an integer, got {value!r}")
    if base is not bool and isinstance(value, bool):
        raise ConfigError(f"{label}: expected {WHAT.get(base, base)}, got {value!r}")
    try:
        setattr(section, key, value)
    except ValidationError as e:
        detail = e.errors()[0]["msg"]
        raise ConfigError(f"{label}: expected {WHAT.get(base, base)}, got {value!r} ({detail})") from None


def coerce(dotted: str, value: Any, label: str | None = None) -> Any:
    """`value` as the setting `dotted` would store it (checked and converted as set_value does)."""
    cfg = Config()
    set_value(cfg, dotted, value, label)
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def fields(section: str) -> dict[str, Any]:
    """A section's settings and their annotations (KeyError for an unknown section)."""
    model = Config.model_fields[section].annotation
    return {name: f.annotation for name, f in model.model_fields.items()}


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

"""Hyperparameter search with Ray Tune over the one training loop (`deepfake.loop.run_loop`).

A trial with several workers (`tune.workers_per_trial > 1`) is a Tune function that builds and fits its own
Ray Train `TorchTrainer(train_func)`; rank 0's per-epoch metrics reach Tune through `TuneReportCallback`.
A one-worker trial runs the same loop in the trial's own process (`TuneTrialSession`), which saves starting
a Train controller and worker group per trial: on small budgets that start-up costs as much as an epoch.
Either way Tune sees every epoch, so ASHA can stop weak trials after any of them.
The data set is scanned and split once, on the driver, and handed to trials through the object store.

Inside a trial, Train's own early stopping is off (`train.patience = 0`): ASHA decides when a trial stops,
and a trial that ended itself would look "finished" rather than "stopped" to the scheduler. The trial's
epoch budget is `tune.epochs` (its LR schedule runs over that budget); `best_config.yaml` keeps the base
config's `train.epochs` and `train.patience` for the real run.

The search space is plain YAML (`tune.space`), validated here before Ray starts:
`{param: {choice: [...]}}`, `{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`, `{randint: [lo, hi]}`
(hi exclusive) or `{grid: [...]}` (every value, `samples` times; random searcher only). Bare names are
`train.*` keys (`lr`, `optimizer`); other sections use dotted keys (`model.finetune`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from deepfake.config import (
    Config,
    ConfigError,
    at_least,
    check,
    coerce,
    fields,
    from_dict,
    one_of,
    set_value,
)

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("choice", "loguniform", "uniform", "randint", "grid")
# Keys the search itself controls (or that make no sense per trial): tuning them is a config error.
RESERVED = {
    "data.path": "the data set is fixed for a search",
    "train.epochs": "the per-trial budget is tune.epochs",
    "train.patience": "ASHA decides when a trial stops",
    "train.workers": "set tune.workers_per_trial",
    "train.name": "each trial is named by its trial id",
    "train.storage_path": "trials are stored under the search's output folder",
    "train.out": "trials export nothing; best_config.yaml is the result",
}
SEARCHERS = ("optuna", "random")
SCHEDULERS = ("asha", "hyperband", "bohb", "fifo")
RENAMED_SCHEDULERS = {"asha-stop": "asha"}  # configs saved while "asha" named the removed promoting ASHA
PAUSING = ("hyperband", "bohb")  # Ray's schedulers whose paused trials must not hold a concurrency slot
EXPERIMENT_FILE = "search_config.yaml"
DRIVER_CPU = 0.01  # a multi-worker trial's function only waits on its TorchTrainer (0 CPUs is refused by Tune)


# ---------------------------------------------------------------------------------------------- space (pure)
@dataclass(frozen=True)
class ParamSpec:
    key: str  # dotted config key, e.g. train.lr
    dist: str  # one of DISTRIBUTIONS
    args: tuple  # the values (choice, grid) or (lo, hi)


def canonical_key(name: str) -> str:
    """`lr` -> `train.lr`; dotted names are kept."""
    return name if "." in name else f"train.{name}"


def _field_type(key: str) -> Any:
    section_name, _, field_name = key.partition(".")
    if section_name not in ("data", "model", "train"):
        raise ConfigError(f"tune.space: {key!r} is not a tunable setting (use a data., model. or train. key)")
    types_ = fields(section_name)
    if field_name not in types_:
        raise ConfigError(f"tune.space: unknown parameter {key!r} (known in {section_name}: {', '.join(types_)})")
    return types_[field_name]


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; other annotations unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 else tp


def _numeric_pair(key: str, dist: str, args: Any) -> tuple[float, float]:
    if (
        not isinstance(args, (list, tuple))
        or len(args) != 2
        or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    ):
        raise ConfigError(f"tune.space.{key}: {dist} expects [lo, hi] (two numbers), got {args!r}")
    lo, hi = float(args[0]), float(args[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"tune.space.{key}: {dist} bounds must be finite, got {args!r}")
    if lo >= hi:
        raise ConfigError(f"tune.space.{key}: {dist} needs lo < hi, got [{args[0]}, {args[1]}]")
    if dist == "loguniform" and lo <= 0:
        raise ConfigError(f"tune.space.{key}: loguniform bounds must be positive, got [{args[0]}, {args[1]}]")
    return lo, hi


def _check_value(key: str, value: Any) -> Any:
    """Coerce one candidate value to the field's type and reject values training would refuse later."""
    _field_type(key)  # an unknown or untunable key is named first
    value = coerce(key, value, f"tune.space.{key}")
    if key == "train.optimizer":
        from timm.optim import list_optimizers

        if str(value).lower() not in list_optimizers():
            raise ConfigError(f"tune.space.{key}: unknown optimizer {value!r} (e.g. adamw, adam, sgd)")
    if key == "train.scheduler" and str(value).lower() not in ("step", "cosine", "none"):
        raise ConfigError(f"tune.space.{key}: {value!r} is not a scheduler (step, cosine, none)")
    if key == "model.finetune" and not re.fullmatch(r"all|last:[1-9]\d*", str(value)):
        raise ConfigError(f"tune.space.{key}: {value!r} is not a policy (all, last:K)")
    return value


def parse_space(space: Any, searcher: str = "optuna") -> dict[str, ParamSpec]:
    """Validate a `tune.space` mapping; every error names the parameter and what is wrong."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"tune.space must be a non-empty mapping of parameter -> distribution, got {space!r}")
    one_of("tune.searcher", searcher, SEARCHERS)
    specs: dict[str, ParamSpec] = {}
    for name, spec in space.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tune.space: parameter names must be strings, got {name!r}")
        key = canonical_key(name)
        if key in specs:
            raise ConfigError(f"tune.space: {name!r} is given twice (as {key})")
        if key in RESERVED:
            raise ConfigError(f"tune.space: {key!r} cannot be tuned ({RESERVED[key]})")
        tp = _field_type(key)
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(
                f"tune.space.{name}: expected one distribution, e.g. {{loguniform: [1e-4, 1e-2]}} or "
                f"{{choice: [a, b]}}; got {spec!r}"
            )
        ((dist, args),) = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(
                f"tune.space.{name}: unknown distribution {dist!r} (expected one of {', '.join(DISTRIBUTIONS)})"
            )
        if dist in ("choice", "grid"):
            if not isinstance(args, (list, tuple)) or not args:
                raise ConfigError(f"tune.space.{name}: {dist} expects a non-empty list of values, got {args!r}")
            if dist == "grid" and searcher != "random":
                raise ConfigError(f"tune.space.{name}: grid needs tune.searcher=random (Optuna samples, no grids)")
            values = tuple(_check_value(key, v) for v in args)
        else:
            base_tp = _base_type(tp)
            if base_tp not in (float, int):
                raise ConfigError(f"tune.space.{name}: {dist} needs a numeric setting; {key} is not (use choice)")
            lo, hi = _numeric_pair(name, dist, args)
            if dist == "randint":
                if not (float(args[0]).is_integer() and float(args[1]).is_integer()):
                    raise ConfigError(f"tune.space.{name}: randint expects integer bounds, got {args!r}")
                if base_tp is not int:
                    raise ConfigError(f"tune.space.{name}: randint needs an integer setting; {key} is not")
                lo, hi = int(lo), int(hi)
            elif base_tp is int:
                raise ConfigError(f"tune.space.{name}: {key} is an integer: use randint or choice, not {dist}")
            values = (lo, hi)
        specs[key] = ParamSpec(key, dist, values)
    return specs


def to_tune_space(specs: dict[str, ParamSpec]) -> dict[str, Any]:
    """Ray Tune domains for the specs (Optuna converts them itself)."""
    from ray import tune

    make = {
        "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    return {key: make[s.dist](s.args) for key, s in specs.items()}


def apply_params(base: Config, params: dict[str, Any]) -> Config:
    """A new Config: the base with the sampled values set (type-checked by config.set_value)."""
    cfg = base.copy()
    for key, value in params.items():
        set_value(cfg, canonical_key(key), value)
    return cfg


def trial_config(base: Config, params: dict[str, Any], name: str, storage: str) -> Config:
    """What one trial trains: the sampled values, the search's budget and no early stopping (ASHA's job)."""
    cfg = apply_params(base, params)
    cfg.train.epochs = base.tune.epochs
    cfg.train.patience = 0
    cfg.train.workers = base.tune.workers_per_trial
    cfg.train.name = name
    cfg.train.storage_path = storage
    cfg.train.log_every = 0
    return cfg


def best_config(base: Config, params: dict[str, Any]) -> Config:
    """A complete config for `deepfake train --config`: the base run settings with the best values."""
    cfg = apply_params(base, params)
    cfg.train.name = None
    return cfg


def validate(cfg: Config) -> dict[str, ParamSpec]:
    check(cfg)  # the base settings every trial starts from
    t = cfg.tune
    specs = parse_space(t.space, t.searcher)
    at_least(
        ("tune.samples", t.samples, 1),
        ("tune.epochs", t.epochs, 1),
        ("tune.grace_period", t.grace_period, 1),
        ("tune.reduction_factor", t.reduction_factor, 2),
        ("tune.max_concurrent", t.max_concurrent, 1),
        ("tune.workers_per_trial", t.workers_per_trial, 1),
    )
    if t.grace_period > t.epochs:
        raise ConfigError(f"tune.grace_period ({t.grace_period}) exceeds the per-trial budget tune.epochs ({t.epochs})")
    one_of("tune.mode", t.mode, ("min", "max"))
    t.scheduler = RENAMED_SCHEDULERS.get(t.scheduler, t.scheduler)
    one_of("tune.scheduler", t.scheduler, SCHEDULERS)
    if t.scheduler == "bohb":
        bohb_searcher(cfg)  # its optional packages missing: refused before Ray starts
    known = ("val_acc", "val_loss", "train_acc", "train_loss")
    if t.metric not in known:
        raise ConfigError(f"tune.metric: {t.metric!r} is not reported per epoch (one of {', '.join(known)})")
    if t.cpus_per_trial_worker <= 0 or t.gpus_per_trial_worker < 0:
        raise ConfigError("tune.cpus_per_trial_worker must be > 0 and tune.gpus_per_trial_worker >= 0")
    return specs


# ---------------------------------------------------------------------------------------------- results (pure)
def summarize_trials(
    histories: dict[str, pd.DataFrame], params: dict[str, dict], status: dict[str, str], cfg: Config
) -> pd.DataFrame:
    """One row per trial: its sampled values, best val acc/loss, epochs run, whether ASHA stopped it."""
    rows = []
    for trial_id, p in params.items():
        h = histories.get(trial_id)
        h = h if h is not None and len(h) and "epoch" in h else pd.DataFrame({"epoch": []})
        h = h.drop_duplicates("epoch", keep="last")
        epochs = int(h["epoch"].max()) if len(h) else 0
        st = status.get(trial_id, "UNKNOWN")
        row = {"trial_id": trial_id, **{f"config/{k}": v for k, v in p.items()}}
        row.update(
            best_val_acc=float(h["val_acc"].max()) if "val_acc" in h and len(h) else float("nan"),
            best_val_loss=float(h["val_loss"].min()) if "val_loss" in h and len(h) else float("nan"),
            last_val_acc=float(h["val_acc"].iloc[-1]) if "val_acc" in h and len(h) else float("nan"),
            epochs_run=epochs,
            stopped_early=bool(st == "TERMINATED" and 0 < epochs < cfg.tune.epochs),
            status=st,
        )
        m = cfg.tune.metric
        if f"best_{m}" not in row:  # the search metric, when it is not one of the columns above
            vals = h[m] if m in h and len(h) else pd.Series(dtype=float)
            row[f"best_{m}"] = float(vals.min() if cfg.tune.mode == "min" else vals.max()) if len(vals) else math.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["best_val_acc", "best_val_loss"], ascending=[False, True], na_position="last")
    return df.reset_index(drop=True)


def pick_best(df: pd.DataFrame, metric: str, mode: str) -> pd.Series:
    """The trial with the best value of the search metric over its epochs (ties: lower best val loss)."""
    col = f"best_{metric}"
    ok = df[df[col].notna()]
    if ok.empty:
        raise RuntimeError("no trial reported a result: see the trial errors above")
    ok = ok.sort_values([col, "best_val_loss"], ascending=[mode == "min", True])
    return ok.iloc[0]


def plot_search(histories: dict[str, pd.DataFrame], df: pd.DataFrame, out: Path) -> list[Path]:
    """val acc per trial over epochs; best val acc against lr (log x) when lr is searched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial_id, h in histories.items():
        if h is not None and len(h) and "val_acc" in h:
            h = h.drop_duplicates("epoch", keep="last")
            ax.plot(h["epoch"], h["val_acc"], marker="o", ms=3, lw=1, label=trial_id)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("validation accuracy per trial (ASHA stops the weak ones early)")
    if len(histories) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "val_acc_per_trial.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if "config/train.lr" in df and df["best_val_acc"].notna().any():
        fig, ax = plt.subplots(figsize=(6, 4.5))
        groups = df.groupby(df["config/train.optimizer"]) if "config/train.optimizer" in df else [("all", df)]
        for name, g in groups:
            ax.scatter(g["config/train.lr"], g["best_val_acc"], label=str(name))
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("best validation accuracy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "acc_vs_lr.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------- Ray edge
def _pin_cluster_address() -> None:
    """Point Ray Train's helpers at this cluster explicitly.

    When ASHA stops a trial, Tune kills the trial actor, which kills its Train controller before that
    removes the workers' placement group; Train's detached PlacementGroupCleaner then frees it, but it
    finds the State API by auto-detection, which fails (or picks another cluster) when several Ray
    instances share the machine. The leaked CPUs then starve every later trial. RAY_ADDRESS is passed
    on to the controller (and from it to the cleaner) through Train's own list of propagated variables."""
    import ray
    from ray.train.v2._internal import constants

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    propagate = getattr(constants, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(propagate, set):
        propagate.add("RAY_ADDRESS")


def in_process(t) -> bool:
    """A one-worker trial trains in the trial's own process; several workers need a TorchTrainer."""
    return t.workers_per_trial == 1


def trial_resources(t) -> dict[str, float]:
    """What Tune reserves for the trial function itself: the whole trial when it trains in-process, a
    sliver when it only drives a TorchTrainer whose workers reserve the rest."""
    if in_process(t):
        res = {"cpu": t.cpus_per_trial_worker}
        if t.gpus_per_trial_worker > 0:
            res["gpu"] = t.gpus_per_trial_worker
        return res
    return {"cpu": DRIVER_CPU}


class TuneTrialSession:
    """Where a one-worker Tune trial runs the loop: in the trial's own process, on the GPU Tune gave it if any.

    No worker group, controller or process group to start, which is most of a short trial's cost; reports and
    checkpoints go to Tune, so ASHA sees every epoch and a restored trial resumes from its last one."""

    rank, world = 0, 1

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def prepare_loader(self, loader):
        return loader

    def prepare_model(self, model):
        return model

    def get_checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


def _trial(params: dict[str, Any], splits: dict, base: dict, train_storage: str) -> None:
    """One trial of the shared loop: in-process for one worker, else a TorchTrainer forwarding rank 0's epochs.

    A TorchTrainer run is named by the trial id, so a restored (unfinished) trial resumes its Train run from
    the last epoch checkpoint; an in-process trial resumes from its last Tune checkpoint."""
    from ray import tune

    from deepfake.loop import run_loop
    from deepfake.train import train_func, worker_runtime_env

    base_cfg = from_dict(base)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base_cfg, params, trial_id, train_storage)
    t = base_cfg.tune
    loop_config = {
        "cfg": cfg.to_dict(),
        "splits": splits,
        "run_dir": f"{train_storage}/{trial_id}",
        "threads": max(1, round(t.cpus_per_trial_worker)),
    }
    if in_process(t):
        run_loop(loop_config, TuneTrialSession())
        return

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    _pin_cluster_address()
    # The trial's driver holds DRIVER_CPU; its workers take the rest of the trial's share, so that
    # max_concurrent trials x workers x cpus_per_trial_worker CPUs fit the cluster exactly.
    per_worker: dict[str, float] = {"CPU": max(DRIVER_CPU, t.cpus_per_trial_worker - DRIVER_CPU / t.workers_per_trial)}
    if t.gpus_per_trial_worker > 0:
        per_worker["GPU"] = t.gpus_per_trial_worker
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.workers_per_trial, use_gpu=t.gpus_per_trial_worker > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=trial_id,
            storage_path=train_storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env=worker_runtime_env(),
        ),
    )
    trainer.fit()


def make_searcher(cfg: Config, specs: dict[str, ParamSpec], points=None, scheduler: str | None = None):
    """Optuna TPE behind a concurrency limit; random search when asked, or when Optuna is missing.

    `points` (benchmarks): evaluate exactly these configs, in order, with the random generator.
    `scheduler` (default tune.scheduler): bohb gets its own searcher; Ray's pausing HyperBand schedulers
    (PAUSING) get no searcher-side limit, since their paused trials would hold its slots for ever: the
    trials' CPU/GPU requests bound how many run at once."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    t = cfg.tune
    name = scheduler or t.scheduler
    if name == "bohb":
        return bohb_searcher(cfg, points)
    limit = t.max_concurrent if name not in PAUSING else 0
    if t.searcher == "optuna" and not points:
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            log.warning("optuna is not installed: falling back to random search")
        else:
            tpe = OptunaSearch(seed=cfg.train.seed)
            return ConcurrencyLimiter(tpe, max_concurrent=limit) if limit else tpe
    kwargs = {"points_to_evaluate": points} if points else {"random_state": cfg.train.seed}
    return BasicVariantGenerator(max_concurrent=limit, **kwargs)


def bohb_searcher(cfg: Config, points=None):
    """TuneBOHB, the only searcher HyperBandForBOHB works with (it calls the searcher's on_pause/on_unpause);
    it needs the optional packages ConfigSpace and hpbandster."""
    try:
        from ray.tune.search.bohb import TuneBOHB

        return TuneBOHB(seed=cfg.train.seed, points_to_evaluate=points or None)
    except (ImportError, AssertionError) as e:
        raise ConfigError(
            f"tune.scheduler bohb needs Ray's TuneBOHB searcher and its packages (pip install ConfigSpace "
            f"hpbandster): {e}"
        ) from None


def make_scheduler(cfg: Config, specs: dict[str, ParamSpec], name: str):
    """The trial scheduler `name` (tune.scheduler) over the per-trial epoch budget."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandForBOHB, HyperBandScheduler

    t = cfg.tune
    if name == "asha":
        return ASHAScheduler(
            time_attr="epoch", max_t=t.epochs, grace_period=t.grace_period, reduction_factor=t.reduction_factor
        )
    if name == "hyperband":  # Ray's synchronous pausing HyperBand
        return HyperBandScheduler(time_attr="epoch", max_t=t.epochs, reduction_factor=t.reduction_factor)
    if name == "bohb":  # Ray's HyperBand variant for BOHB: it drives TuneBOHB (make_searcher) through pauses
        return HyperBandForBOHB(time_attr="epoch", max_t=t.epochs, reduction_factor=t.reduction_factor)
    return FIFOScheduler()


def _paths(cfg: Config, out: str | Path | None) -> tuple[Path, str, Path]:
    out_dir = Path(out or cfg.tune.out).expanduser().resolve()
    name = cfg.tune.name or "search"
    return out_dir, name, out_dir / "ray" / name


def load_saved(out: str | Path) -> Config:
    """The config a search was started with (for --resume)."""
    saved = Path(out).expanduser() / EXPERIMENT_FILE
    if not saved.is_file():
        raise ConfigError(f"--resume: no search found in {Path(out).expanduser()} (missing {EXPERIMENT_FILE})")
    from deepfake.config import load

    return load(saved)


def run_search(
    cfg: Config,
    out: str | Path | None = None,
    resume: bool = False,
    address: str | None = None,
    points: list[dict[str, Any]] | None = None,
    scheduler: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) a search and write best_config.yaml, trials.csv and plots into `out`.

    `points` (benchmarks): evaluate exactly these configs, in order, with the random generator;
    `scheduler` overrides `tune.scheduler` ("fifo" runs every trial to the full budget)."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from deepfake.cluster import connect
    from deepfake.loop import prepare_splits, with_pretrained
    from deepfake.model import resolve_pretrained

    specs = validate(cfg)
    out_dir, name, exp_path = _paths(cfg, out)
    storage = out_dir / "ray"
    train_storage = str(out_dir / "trials")
    if not resume and exp_path.exists():
        raise ConfigError(f"a search already exists at {exp_path}: use --resume to continue it, or another -o/--name")

    connect(address)
    split, rep, splits = prepare_splits(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        cfg.save(out_dir / EXPERIMENT_FILE)
        split.to_csv(out_dir / "split.csv", index=False)
    log.info("search %s: %s, %d trials, %s", name, rep["splits"], cfg.tune.samples, cfg.tune.searcher)

    # trials run in their own folders: hand them an absolute pretrained path (checked here)
    trial_base = with_pretrained(cfg, resolve_pretrained(cfg.model.pretrained)).to_dict()
    trainable = tune.with_resources(
        tune.with_parameters(_trial, splits=splits, base=trial_base, train_storage=train_storage),
        trial_resources(cfg.tune),
    )
    space = to_tune_space(specs)
    start = time.time()
    if resume:
        if not tune.Tuner.can_restore(str(exp_path)):
            raise ConfigError(f"--resume: no restorable Tune experiment at {exp_path}")
        tuner = tune.Tuner.restore(
            str(exp_path), trainable=trainable, resume_unfinished=True, restart_errored=True, param_space=space
        )
    else:
        t = cfg.tune
        if points:
            cfg = cfg.copy()
            cfg.tune.samples = len(points)
        name_ = scheduler or t.scheduler
        sched = make_scheduler(cfg, specs, name_)
        searcher = make_searcher(cfg, specs, points, scheduler=name_)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=t.metric,
                mode=t.mode,
                num_samples=cfg.tune.samples,
                search_alg=searcher,
                scheduler=sched,
                # BasicVariantGenerator limits itself (Tune ignores this for it, with a warning); PAUSING: none
                max_concurrent_trials=None
                if isinstance(searcher, BasicVariantGenerator) or name_ in PAUSING
                else t.max_concurrent,
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                verbose=1,
                # in-process trials: Tune keeps their epoch checkpoints and restarts a crashed one from the last.
                # Two, not one: the experiment state a killed search resumes from can be a save behind, and name
                # the checkpoint before the newest; with one kept, that one was deleted (seen: "Could not recover
                # from checkpoint as it does not exist on storage anymore").
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                # (a TorchTrainer trial retries its own workers instead)
                failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures if in_process(t) else 0),
            ),
        )
    grid = tuner.fit()
    seconds = time.time() - start
    return write_outputs(cfg, grid, out_dir, specs, seconds)


def write_outputs(cfg: Config, grid, out_dir: Path, specs: dict[str, ParamSpec], seconds: float) -> dict[str, Any]:
    histories, params, status = {}, {}, {}
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        df = r.metrics_dataframe
        histories[trial_id] = df if df is not None else pd.DataFrame()
        params[trial_id] = {k: r.config.get(k) for k in specs}
        status[trial_id] = "ERROR" if r.error else "TERMINATED"
    df = summarize_trials(histories, params, status, cfg)
    df.to_csv(out_dir / "trials.csv", index=False)
    best = pick_best(df, cfg.tune.metric, cfg.tune.mode)
    best_params = {k: _plain(best[f"config/{k}"]) for k in specs}
    bc = best_config(cfg, best_params)
    bc.save(out_dir / "best_config.yaml")
    plots = plot_search(histories, df, out_dir)
    summary = {
        "best_trial": best["trial_id"],
        "best_params": best_params,
        "best_val_acc": float(best["best_val_acc"]),
        "best_val_loss": float(best["best_val_loss"]),
        "trials": len(df),
        "stopped_early": int(df["stopped_early"].sum()),
        "errored": int((df["status"] == "ERROR").sum()),
        "epochs_total": int(df["epochs_run"].sum()),
        "search_seconds": round(seconds, 1),
        "best_config": str(out_dir / "best_config.yaml"),
        "trials_csv": str(out_dir / "trials.csv"),
        "plots": [str(p) for p in plots],
    }
    log.info("best trial %s: %s val_acc %.4f", summary["best_trial"], best_params, summary["best_val_acc"])
    return summary


def _plain(v: Any) -> Any:
    """numpy scalars -> Python values, so YAML stays plain."""
    return v.item() if hasattr(v, "item") else v

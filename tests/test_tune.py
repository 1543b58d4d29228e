"""Hyperparameter search: space validation (pure), and real Ray Tune searches over the shared Train loop on
real images: ASHA stops a hopeless trial, best_config.yaml trains unchanged, a killed search resumes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from deepfake import config as cfgmod
from deepfake import tune as tm
from deepfake.cli import main
from deepfake.config import Config, ConfigError


# ---------------------------------------------------------------------------------------------- pure
def test_default_space_is_valid_and_maps_to_tune_domains():
    specs = tm.parse_space(Config().tune.space)
    assert set(specs) == {"train.optimizer", "train.lr", "train.batch_size", "train.weight_decay"}
    assert specs["train.lr"] == tm.ParamSpec("train.lr", "loguniform", (1e-4, 1e-2))
    from ray.tune.search.sample import Categorical, Float

    domains = tm.to_tune_space(specs)
    assert isinstance(domains["train.optimizer"], Categorical)
    assert isinstance(domains["train.lr"], Float)
    specs = tm.parse_space({"model.finetune": {"choice": ["all", "last:3"]}, "label_smoothing": {"uniform": [0, 0.2]}})
    assert set(specs) == {"model.finetune", "train.label_smoothing"}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"learning_rate": {"loguniform": [1e-4, 1e-2]}}, "unknown parameter 'train.learning_rate'"),
        ({"model.depth": {"choice": [1, 2]}}, "unknown parameter 'model.depth'"),
        ({"lr": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
        ({"lr": {"loguniform": [1e-2, 1e-4]}}, "lo < hi"),
        ({"lr": {"uniform": [0.1, 0.1]}}, "lo < hi"),
        ({"lr": {"loguniform": [0, 1e-2]}}, "must be positive"),
        ({"lr": {"loguniform": [1e-4]}}, "expects [lo, hi]"),
        ({"lr": {"loguniform": ["a", "b"]}}, "expects [lo, hi]"),
        ({"lr": 0.001}, "expected one distribution"),
        ({"lr": {"choice": [1e-3], "uniform": [0, 1]}}, "expected one distribution"),
        ({"optimizer": {"choice": []}}, "non-empty list"),
        ({"optimizer": {"choice": ["adamw", "nosuchopt"]}}, "unknown optimizer 'nosuchopt'"),
        ({"model.finetune": {"choice": ["last:x"]}}, "not a policy"),
        ({"batch_size": {"choice": [32, "big"]}}, "expected an integer"),
        ({"batch_size": {"loguniform": [16, 128]}}, "integer: use randint or choice"),
        ({"lr": {"randint": [1, 3]}}, "randint needs an integer setting"),
        ({"optimizer": {"uniform": [0, 1]}}, "needs a numeric setting"),
        ({"epochs": {"choice": [1, 2]}}, "cannot be tuned (the per-trial budget is tune.epochs)"),
        ({"tune.samples": {"choice": [1, 2]}}, "not a tunable setting"),
        ({"lr": {"grid": [1e-3, 1e-2]}}, "grid needs tune.searcher=random"),
        ({}, "non-empty mapping"),
    ],
)
def test_invalid_space_is_a_clear_config_error(space, message):
    with pytest.raises(ConfigError) as e:
        tm.parse_space(space)
    assert message in str(e.value)


def test_validate_checks_the_scheduler_settings():
    cfg = Config()
    cfg.tune.grace_period = 5
    cfg.tune.epochs = 3
    with pytest.raises(ConfigError, match="grace_period"):
        tm.validate(cfg)
    cfg = Config()
    cfg.tune.searcher = "bayes"
    with pytest.raises(ConfigError, match="'bayes' is not one of optuna, random"):
        tm.validate(cfg)


def test_every_scheduler_name_builds_rays():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandForBOHB, HyperBandScheduler

    cfg = Config()
    specs = tm.parse_space(cfg.tune.space)
    kinds = {name: type(tm.make_scheduler(cfg, specs, name)) for name in tm.SCHEDULERS}
    assert kinds == {
        "asha": ASHAScheduler,
        "hyperband": HyperBandScheduler,
        "bohb": HyperBandForBOHB,
        "fifo": FIFOScheduler,
    }
    # Ray's pausing schedulers get no searcher-side limit (a paused trial would hold its slot for ever)
    assert tm.make_searcher(cfg, specs, scheduler="hyperband").__class__.__name__ == "OptunaSearch"
    assert tm.make_searcher(cfg, specs, scheduler="asha").__class__.__name__ == "ConcurrencyLimiter"
    cfg.tune.scheduler = "asha-stop"  # the name a saved config may still carry
    tm.validate(cfg)
    assert cfg.tune.scheduler == "asha"


def test_trial_and_best_configs():
    base = Config()
    base.train.epochs, base.train.patience, base.tune.epochs = 12, 4, 3
    params = {"train.lr": 3e-3, "train.optimizer": "sgd", "model.finetune": "last:2"}
    trial = tm.trial_config(base, params, "abc_00001", "/tmp/x")
    assert (trial.train.lr, trial.train.optimizer, trial.model.finetune) == (3e-3, "sgd", "last:2")
    assert trial.train.epochs == 3 and trial.train.patience == 0  # ASHA decides, not Train's early stop
    assert trial.train.name == "abc_00001"
    best = tm.best_config(base, params)
    assert best.train.epochs == 12 and best.train.patience == 4 and best.train.lr == 3e-3
    assert base.train.lr == Config().train.lr  # the base is not modified


def test_summarize_and_pick_best():
    cfg = Config()
    cfg.tune.epochs = 3
    hist = {
        "t0": pd.DataFrame({"epoch": [1, 2, 3], "val_acc": [0.6, 0.7, 0.65], "val_loss": [0.7, 0.5, 0.6]}),
        "t1": pd.DataFrame({"epoch": [1], "val_acc": [0.5], "val_loss": [0.9]}),
        "t2": pd.DataFrame(),
    }
    params = {"t0": {"train.lr": 1e-3}, "t1": {"train.lr": 1.0}, "t2": {"train.lr": 0.1}}
    df = tm.summarize_trials(hist, params, {"t0": "TERMINATED", "t1": "TERMINATED", "t2": "ERROR"}, cfg)
    rows = df.set_index("trial_id")
    assert rows.loc["t0", "best_val_acc"] == 0.7 and rows.loc["t0", "epochs_run"] == 3
    assert not rows.loc["t0", "stopped_early"] and rows.loc["t1", "stopped_early"]
    assert not rows.loc["t2", "stopped_early"] and math.isnan(rows.loc["t2", "best_val_acc"])
    assert tm.pick_best(df, "val_acc", "max")["trial_id"] == "t0"
    assert tm.pick_best(df, "val_loss", "min")["trial_id"] == "t0"


def test_cli_rejects_a_bad_space_file_before_starting_anything(tmp_path, caplog):
    bad = tmp_path / "space.yaml"
    bad.write_text(yaml.safe_dump({"tune": {"space": {"lr": {"loguniform": [-1, 1e-2]}}}}))
    assert main(["tune", "--config", str(bad), "-o", str(tmp_path / "out")]) == 2
    assert "loguniform bounds must be positive" in caplog.text
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- real searches
def _base(data: Path, tmp_path: Path, **tune) -> Config:
    cfg = Config()
    cfg.data.path = str(data)
    cfg.data.image_size = 32
    cfg.data.val_ratio = cfg.data.test_ratio = 0.15
    cfg.train.batch_size = 16
    cfg.train.epochs = 1
    cfg.train.log_every = 0
    cfg.train.storage_path = str(tmp_path / "runs")
    cfg.train.out = str(tmp_path / "model")
    for k, v in {"samples": 1, "epochs": 2, "grace_period": 1, "reduction_factor": 2, "max_concurrent": 2}.items():
        setattr(cfg.tune, k, v)
    cfg.tune.cpus_per_trial_worker = 1.0
    for k, v in tune.items():
        setattr(cfg.tune, k, v)
    return cfg


@pytest.mark.slow
def test_asha_stops_a_hopeless_trial_and_best_config_trains_unchanged(ray_local, small_sample, tmp_path):
    # lr=5 makes the first epoch's training loss explode (thousands vs about 1), so Ray's ASHA (reduction
    # factor 2, one rung at epoch 1) stops it there: the grid's third trial reaches the rung after both sane
    # ones, below their median. The first sane trial at the rung always goes on (nothing to compare yet).
    # (Training loss, not validation accuracy: after one epoch from scratch the latter is a coin flip.)
    cfg = _base(small_sample, tmp_path, searcher="random", space={"lr": {"grid": [1e-3, 2e-3, 5.0]}})
    cfg.tune.metric, cfg.tune.mode = "train_loss", "min"
    cfg.tune.scheduler = "asha"
    cfg.model.stem_stride = 2
    cfg.train.optimizer = "adam"
    out = tmp_path / "search"
    summary = tm.run_search(cfg, out)

    df = pd.read_csv(out / "trials.csv")
    assert len(df) == 3 and set(df["status"]) == {"TERMINATED"}
    assert {"config/train.lr", "best_val_acc", "best_val_loss", "epochs_run", "stopped_early"} <= set(df.columns)
    wrecked = df[df["config/train.lr"] == 5.0].iloc[0]
    assert wrecked["stopped_early"] and wrecked["epochs_run"] == 1
    assert summary["stopped_early"] >= 1 and summary["trials"] == 3
    assert 2 in set(df[df["config/train.lr"] < 1]["epochs_run"])
    for trial_id in df[df["epochs_run"] == 2]["trial_id"]:  # each epoch reported once
        assert [r["epoch"] for r in _results(out / "ray" / "search", trial_id)] == [1, 2]
    assert (out / "val_acc_per_trial.png").stat().st_size > 1000 and (out / "acc_vs_lr.png").is_file()
    # one-worker trials train in the trial's own process: no Train run of their own, Tune keeps the checkpoints
    for trial_id in df["trial_id"]:
        assert {r["world_size"] for r in _results(out / "ray" / "search", trial_id)} == {1}
        assert any((out / "ray" / "search" / trial_id).glob("checkpoint_*"))
    assert not (out / "trials").exists()

    best = cfgmod.load(out / "best_config.yaml")
    assert best.train.lr in (1e-3, 2e-3) and summary["best_params"]["train.lr"] == best.train.lr
    assert best.train.epochs == 1 and best.train.patience == cfg.train.patience  # the base run settings
    assert best.train.optimizer == "adam" and best.data.path == str(small_sample)

    # consumed unchanged (in this process: Ray Train has tests of its own, and a Train run costs ~10 s here)
    rc = main(["train", "--config", str(out / "best_config.yaml"), "--backend", "torch"])
    assert rc == 0
    meta = json.loads((tmp_path / "model" / "config.json").read_text())["deepfake"]
    assert meta["config"]["train"]["lr"] == best.train.lr and meta["epochs_run"] == 1


def _results(exp_dir: Path, trial_id: str) -> list[dict]:
    return [json.loads(line) for line in (exp_dir / trial_id / "result.json").read_text().splitlines() if line]


@pytest.mark.slow
def test_multi_worker_trials_train_data_parallel(ray_local, small_sample, tmp_path):
    cfg = _base(small_sample, tmp_path, samples=1, epochs=1, max_concurrent=1, workers_per_trial=2)
    cfg.tune.searcher, cfg.tune.space = "random", {"lr": {"choice": [1e-3]}}
    cfg.model.stem_stride = 2
    out = tmp_path / "search"
    summary = tm.run_search(cfg, out)
    assert summary["trials"] == 1 and summary["errored"] == 0
    trial = pd.read_csv(out / "trials.csv").iloc[0]
    assert trial["status"] == "TERMINATED" and trial["epochs_run"] == 1
    # a TorchTrainer with two workers ran it: its own Train run (with a checkpoint) and world_size 2 in Tune
    assert [r["world_size"] for r in _results(out / "ray" / "search", trial["trial_id"])] == [2]
    assert any((out / "trials" / trial["trial_id"]).glob("checkpoint_*"))


def _terminated(exp_dir: Path) -> set[str]:
    """Trial ids that Tune's saved experiment state records as finished."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return set()
    done = set()
    for trial_json, _ in data.get("trial_data", []):
        t = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        if t.get("status") == "TERMINATED":
            done.add(t["trial_id"])
    return done


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(ray_local, small_sample, tmp_path):
    # two trials one after the other: the first is recorded finished while the second's actor starts
    cfg = _base(small_sample, tmp_path, samples=2, max_concurrent=1, grace_period=2, searcher="optuna")
    cfg.model.stem_stride = 2
    cfg_path = tmp_path / "search.yaml"
    cfg.save(cfg_path)
    out = tmp_path / "search"
    exp = out / "ray" / "search"
    # Tune saves its experiment state at most every 10 s by default; the kill must land after a trial is recorded
    # finished and before the last one ends (about 8 s later: its actor has to start), so save at every step
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    cmd = [sys.executable, "-m", "deepfake.cli", "tune", "--config", str(cfg_path), "-o", str(out)]
    # the search's own driver process on the session's Ray (a Ray of its own would cost its start-up); killing
    # the driver kills its trials, which Ray owns through it
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [*cmd, "--address", address], env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    t0 = time.time()
    try:
        while not _terminated(exp) and time.time() < t0 + 400 and proc.poll() is None:
            time.sleep(0.2)
        finished = _terminated(exp)
        exited = proc.poll()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the search's driver dies at once, and with it its trials
        proc.wait()
    # (it failed once in CI with no trial recorded finished and no cause in the driver's log: say what was seen)
    seen = f"after {time.time() - t0:.0f} s, driver exit code {exited}, states {sorted(p.name for p in exp.glob('*.json'))}"
    assert finished, seen + "\n" + proc.stderr.read().decode()[-3000:]
    assert not (out / "trials.csv").exists()  # it really was cut short
    before = {t: (exp / t / "result.json").read_text() for t in finished}

    assert main(["tune", "--resume", "-o", str(out)]) == 0
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == 2 and set(df["status"]) == {"TERMINATED"} and set(df["epochs_run"]) == {2}
    assert finished < set(df["trial_id"])
    for t, text in before.items():
        assert (exp / t / "result.json").read_text() == text  # finished trials were not run again
    assert cfgmod.load(out / "best_config.yaml").train.lr in set(df["config/train.lr"])


def test_bohb_without_its_packages_is_refused_up_front():
    pytest.importorskip("ray.tune.search.bohb")
    try:
        import ConfigSpace  # noqa: F401
        import hpbandster  # noqa: F401
    except ImportError:
        cfg = Config()
        cfg.tune.scheduler = "bohb"
        with pytest.raises(ConfigError, match="pip install ConfigSpace hpbandster"):
            tm.validate(cfg)
    else:
        pytest.skip("ConfigSpace and hpbandster are installed here")

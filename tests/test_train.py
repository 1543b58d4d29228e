"""Ray Train end to end on real images with a real local Ray: training, worker failure, resume."""

import json
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch

from deepfake import checkpoint as ck
from deepfake.cli import main
from deepfake.config import Config
from deepfake.train import fit

pytestmark = pytest.mark.slow


class FailOnce:
    """A run_loop callback that crashes rank 0 once at `epoch`, the first time only (a marker file says it did),
    as a worker killed mid-run would; it travels to the Ray Train workers by value."""

    def __init__(self, epoch: int, run_dir: Path):
        self.epoch, self.marker = epoch, Path(run_dir) / f".failed_once_epoch{epoch}"

    def __call__(self, epoch: int, rank: int) -> None:
        if epoch == self.epoch and rank == 0 and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
            raise RuntimeError(f"injected failure at epoch {epoch}")


class RecordThreads:
    """A run_loop callback that writes, per epoch, the OpenMP setting of the training process and the number of
    torch threads the loop runs with."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __call__(self, epoch: int, rank: int) -> None:
        import os

        with self.path.open("a") as f:
            f.write(json.dumps([epoch, rank, os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()]) + "\n")


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers need not import the tests package


def _cfg(data, tmp_path, **train) -> Config:
    cfg = Config()
    cfg.data.path = str(data)
    cfg.data.image_size = 32
    cfg.data.val_ratio = cfg.data.test_ratio = 0.15
    cfg.model.stem_stride = 2
    cfg.train.epochs = 2
    cfg.train.batch_size = 16
    cfg.train.workers = 2
    cfg.train.storage_path = str(tmp_path / "runs")
    cfg.train.out = str(tmp_path / "model")
    cfg.train.log_every = 0
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_two_workers_warm_start_from_a_relative_model_folder_and_export(ray_local, small_sample, tmp_path, monkeypatch):
    """Two Ray Train workers through the CLI, initialised from a model folder named by a relative path (the
    workers run elsewhere: the driver must resolve it), then the export: weights, card and the run's files."""
    from tests.conftest import train_small_model

    train_small_model(tmp_path / "parent", epochs=1)
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data", str(small_sample), "--pretrained", "parent", "--epochs", "2", "--workers", "2"]
    args += ["--stem-stride", "2", "--batch-size", "16", "--storage-path", "runs", "--name", "basic", "--out", "model"]
    args += ["--val-ratio", "0.15", "--test-ratio", "0.15"]
    assert main([*args, "--set", "data.image_size=32", "--set", "train.log_every=0"]) == 0
    d = tmp_path / "model"
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in d.iterdir()}
    model, meta = ck.load_model(d)
    assert meta["image_size"] == 32 and meta["classes"] == ["ai", "real"]
    assert meta["config"]["train"]["workers"] == 2 and meta["epochs_run"] == 2
    assert meta["data"]["splits"]["val"] == {"ai": 9, "real": 9}
    assert 0.0 <= meta["metrics"]["val_acc"] <= 1.0 and meta["metrics"]["val_loss"] > 0
    assert [h["epoch"] for h in meta["history"]] == [1, 2] and meta["history"][0]["world_size"] == 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    assert (tmp_path / "runs" / "basic" / "config.yaml").is_file()
    assert (tmp_path / "runs" / "basic" / "split.csv").is_file()
    assert meta["config"]["model"]["pretrained"] == "parent"  # recorded as given
    assert meta["parent"]["path"] == "parent" and meta["parent"]["arch"] == "efficientnet_b0"
    assert "initialised from `parent`" in (d / "README.md").read_text()


def test_worker_crash_restarts_then_a_failed_run_resumes_from_its_last_epoch(ray_local, small_sample, tmp_path):
    """One Ray Train run, two failures: the first (epoch 2) restarts the worker from epoch 1's checkpoint
    (max_failures=1); the second (epoch 3) exhausts the failures and the run fails. `deepfake train --resume`
    then trains epoch 3 only. (One run for both paths: each Ray Train run costs its start-up, 20 s on a slow VM.)"""
    from ray.train import TrainingFailedError

    from deepfake.train import WORKER_ENV, scaling

    run = tmp_path / "runs" / "crash"
    cfg = _cfg(small_sample, tmp_path, name="crash", epochs=3, max_failures=1, workers=1)
    threads_log = tmp_path / "threads.jsonl"
    with pytest.raises(TrainingFailedError):
        fit(cfg, export=False, callbacks=[FailOnce(2, run), FailOnce(3, run), RecordThreads(threads_log)])
    assert (run / ".failed_once_epoch2").exists() and (run / ".failed_once_epoch3").exists()  # both happened
    latest = max((p for p in run.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    before = json.loads((latest / "state.json").read_text())["history"]
    assert [h["epoch"] for h in before] == [1, 2]  # epoch 2 was trained again after the restart, then saved
    # the worker (the restarted one too) keeps Ray's own thread at one OpenMP thread (train.WORKER_ENV) while the
    # loop runs on all of the worker's CPUs
    seen = [json.loads(line) for line in threads_log.read_text().splitlines()]
    assert len(seen) >= 2 and {tuple(x[2:]) for x in seen} == {(WORKER_ENV["OMP_NUM_THREADS"], scaling(cfg)[1])}

    assert main(["train", "--resume", "crash", "--storage-path", str(tmp_path / "runs")]) == 0
    history = ck.read_metadata(tmp_path / "model")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[:2] == before  # epochs 1 and 2 were not trained again

    # epochs are seeded, so the restarted and resumed run trains exactly as an uninterrupted one, and Ray Train
    # with one worker exactly as the same loop in this process (--backend torch: no Ray start-up for the
    # reference), on as many torch threads as the Ray worker had (float sums depend on the count)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(scaling(cfg)[1]))
    try:
        clean = fit(_cfg(small_sample, tmp_path, name="clean", epochs=3, workers=1, backend="torch"), export=False)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(history, clean["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_cli_refuses_to_overwrite_a_run(ray_local, small_sample, tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    rc = main(["train", "--data", str(small_sample), "--name", "taken", "--storage-path", str(tmp_path / "runs")])
    assert rc == 2


NO_RAY = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name.split('.')[0] in ('ray', 'pytorch_grad_cam', 'starlette'):\n"
    "            raise ImportError(f'{name} is not installed here')\n"
    "sys.meta_path.insert(0, Block())\n"
    "from deepfake.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_torch_backend_trains_resumes_and_exports_without_ray(small_sample, tmp_path):
    """backend torch: the same loop in one process. A run crashes at epoch 2 (in this process), then
    `deepfake train --resume` finishes it on a machine where Ray cannot even be imported."""
    import subprocess
    import sys

    run = tmp_path / "runs" / "crash"
    cfg = _cfg(small_sample, tmp_path, name="crash", epochs=3, backend="torch", workers=1, num_to_keep=1)
    with pytest.raises(RuntimeError, match="injected failure at epoch 2"):
        fit(cfg, callbacks=[FailOnce(2, run)])
    assert [p.name for p in run.glob("checkpoint_*")] == ["checkpoint_000001"]
    assert not (tmp_path / "model").exists()

    args = ["train", "--resume", "crash", "--storage-path", str(tmp_path / "runs")]
    resumed = subprocess.run([sys.executable, "-c", NO_RAY, *args], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint after epoch 1" in resumed.stderr
    assert len(list(run.glob("checkpoint_*"))) <= 2  # the best by val loss, and the latest
    meta = ck.read_metadata(tmp_path / "model")
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3] and meta["config"]["train"]["backend"] == "torch"
    assert meta["hardware"].startswith("1 process (no Ray) on CPU (")
    best = min(meta["history"], key=lambda h: h["val_loss"])
    assert meta["best_epoch"] == best["epoch"] and meta["metrics"]["val_loss"] == best["val_loss"]
    ck.load_model(tmp_path / "model")

    # resuming changed nothing: a clean run in this process gives the same losses
    cfg = _cfg(small_sample, tmp_path, name="clean", epochs=3, backend="torch", workers=1, num_to_keep=1)
    clean = fit(cfg, export=False)
    for a, b in zip(meta["history"], clean["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_ctrl_c_exports_the_best_epoch_so_far(small_sample, tmp_path):
    """Ctrl-C (SIGINT) in a torch-backend run: exit 130, but the best finished epoch is exported with its card."""
    import signal
    import subprocess
    import sys

    args = ["train", "--backend", "torch", "--storage-path", str(tmp_path / "runs"), "--name", "stop"]
    args += ["--data", str(small_sample), "--epochs", "500", "--batch-size", "16", "--stem-stride", "2"]
    args += ["--val-ratio", "0.15", "--test-ratio", "0.15", "--out", str(tmp_path / "model")]
    args += ["--set", "data.image_size=32", "--set", "train.log_every=0"]
    proc = subprocess.Popen([sys.executable, "-c", NO_RAY, *args], stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:  # "epoch 2: {...}" is logged after epoch 1's checkpoint is in place
            seen.append(line)
            if " epoch 2: " in line:
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    log = "".join(seen) + rest
    assert proc.returncode == 130, log[-3000:]
    assert "interrupted; the best epoch so far is in" in log
    meta = ck.read_metadata(tmp_path / "model")
    assert 1 <= meta["epochs_run"] < 500 and ", interrupted after epoch" in meta["hardware"]
    assert meta["best_epoch"] == min(meta["history"], key=lambda h: h["val_loss"])["epoch"]
    ck.load_model(tmp_path / "model")


def test_torch_backend_refuses_what_it_cannot_do(small_sample, tmp_path):
    from deepfake.config import ConfigError

    with pytest.raises(ConfigError, match="one process"):
        fit(_cfg(small_sample, tmp_path, backend="torch", workers=2))
    with pytest.raises(ConfigError, match="is not one of ray, torch"):
        fit(_cfg(small_sample, tmp_path, backend="spark"))

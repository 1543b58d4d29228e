import pytest

from deepfake import config


def test_defaults_match_the_seed_recipe():
    cfg = config.Config()
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size) == (
        "adamw",
        7.6e-4,
        3.8e-4,
        128,
    )
    assert (cfg.train.scheduler, cfg.train.step_size, cfg.train.gamma, cfg.train.patience) == ("step", 5, 0.1, 3)
    assert (cfg.data.image_size, cfg.data.hflip, cfg.data.rotation) == (224, True, 10.0)
    assert cfg.model.arch == "efficientnet_b0"


def test_yaml_then_overrides_and_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.01\n  epochs: 4\nmodel:\n  stem_stride: 1\n")
    cfg = config.load(p, {"train.epochs": "7", "data.max_per_class": "none", "data.hflip": "false"})
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 7 and cfg.model.stem_stride == 1
    assert cfg.data.max_per_class is None and cfg.data.hflip is False
    cfg.save(tmp_path / "out.yaml")
    assert config.load(tmp_path / "out.yaml").to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "text, match",
    [
        ("train:\n  lrr: 0.1\n", "unknown key 'train.lrr'"),
        ("trian:\n  lr: 0.1\n", "unknown section 'trian'"),
        ("train:\n  epochs: many\n", "train.epochs: expected an integer"),
        ("train: [1, 2]\n", "must be a mapping"),
        ("train:\n  lr: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_a_clear_error(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(config.ConfigError, match=match):
        config.load(p)


def test_missing_file():
    with pytest.raises(config.ConfigError, match="not found"):
        config.load("/nonexistent/c.yaml")


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("train.epochs", 0, "train.epochs: must be >= 1, got 0"),
        ("train.lr", -1.0, "train.lr and train.gamma must be > 0"),
        ("train.optimizer", "adamx2", "unknown optimizer 'adamx2'"),
        ("train.scheduler", "onecycle", "train.scheduler: 'onecycle' is not one of step, cosine, none"),
        ("train.amp", "yes", "train.amp: 'yes' is not one of auto, bf16, fp16, off"),
        ("train.batch_size", 1, "leaves 1 image"),
        ("train.label_smoothing", 1.0, "must be below 1"),
        ("data.image_size", 4, "data.image_size: must be >= 8"),
        ("model.stem_stride", 0, "model.stem_stride: must be >= 1"),
    ],
)
def test_values_a_run_would_reject_late_are_refused_up_front(key, value, match):
    cfg = config.Config()
    config.set_value(cfg, key, value)
    with pytest.raises(config.ConfigError, match=match):
        config.check(cfg)


def test_train_cli_refuses_bad_settings_and_too_little_data_before_starting_ray(tmp_path, monkeypatch, caplog):
    """exit 2 with one clear line, never a traceback; and no Ray: these fail before it would start."""
    import logging

    import ray

    from deepfake import cluster
    from deepfake.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    # Starting or joining Ray fails now: through the one boundary, or ray.init directly (Ray's auto-init too).
    # Not by hiding the ray module: a session Ray started by an earlier test has a log thread that still imports it.
    monkeypatch.setattr(cluster, "connect", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.chdir(tmp_path)
    for args, match in (
        (["--workers", "4", "--batch-size", "4"], "4 over 4 worker(s) leaves 1 image"),
        (["--max-per-class", "3"], "the train part has 2 images, fewer than one batch (train.batch_size 128)"),
        (["--val-ratio", "0"], "too few images for a train and a validation part"),
    ):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(["train", "--image-size", "32", *args]) == 2
        assert any(match in m for m in caplog.messages), caplog.messages
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("kind, warmup", [("cosine", 0), ("cosine", 2), ("step", 0), ("none", 1), ("none", 0)])
def test_lr_schedule_is_torchs_and_follows_the_closed_form(kind, warmup):
    """build_scheduler (torch's LinearLR/CosineAnnealingLR/StepLR chained) gives, step by step, the schedule
    the configs were tuned with: linear warm-up to lr, then cosine to 0, the seed's step decay, or constant."""
    import math

    import torch

    from deepfake.loop import build_scheduler

    cfg = config.Config()
    cfg.train.scheduler, cfg.train.warmup_epochs, cfg.train.epochs = kind, warmup, 6
    cfg.train.step_size, cfg.train.gamma, cfg.train.lr = 2, 0.1, 1.0
    steps = 5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = build_scheduler(opt, cfg, steps)
    w, total = warmup * steps, cfg.train.epochs * steps
    for step in range(total):
        if step < w:
            want = (step + 1) / w if w > 1 else 1.0
        elif kind == "cosine":
            want = 0.5 * (1 + math.cos(math.pi * (step - w) / (total - w)))
        elif kind == "step":
            want = cfg.train.gamma ** ((step // steps) // cfg.train.step_size)
        else:
            want = 1.0
        assert opt.param_groups[0]["lr"] == pytest.approx(want, abs=1e-9), (kind, warmup, step)
        opt.step()
        sched.step()

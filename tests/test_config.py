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

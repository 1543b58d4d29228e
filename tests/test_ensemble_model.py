"""Ensemble model folders: members by reference, the mean of their calibrated P(ai), their own operating points,
usable wherever a model folder is (evaluate, predict rows, explain); plain timm refuses them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from deepfake import checkpoint as ck
from deepfake.calibrate import make_ensemble
from deepfake.inference import Ensemble, Predictor, load_scorer, scorer_info
from tests.conftest import SAMPLE_DIR


def sample_images(n: int = 12) -> list[Image.Image]:
    paths = sorted((SAMPLE_DIR / "FAKE").iterdir())[: n // 2] + sorted((SAMPLE_DIR / "REAL").iterdir())[: n // 2]
    return [Image.open(p).convert("RGB") for p in paths]


def test_ensemble_probability_is_the_mean_of_its_members_calibrated_probabilities(model_zoo):
    ens = load_scorer(model_zoo / "pair", device="cpu")
    assert isinstance(ens, Ensemble) and len(ens.members) == 2
    members = [Predictor.from_dir(model_zoo / m, device="cpu") for m in ("calibrated", "other")]
    images = sample_images()
    got = ens.predict_images(images)
    each = [[a["prob_ai"] for a in m.predict_images(images)] for m in members]
    np.testing.assert_allclose([a["prob_ai"] for a in got], np.mean(each, axis=0), rtol=1e-5, atol=1e-6)
    # the members' temperatures differ, so this is not the mean of raw probabilities
    assert members[0].temperature != members[1].temperature
    raw = np.mean([[a["prob_ai_raw"] for a in m.predict_images(images)] for m in members], axis=0)
    np.testing.assert_allclose([a["prob_ai_raw"] for a in got], raw, rtol=1e-5, atol=1e-6)
    # in domain only where both members' guards agree
    doms = [[a["in_domain"] for a in m.predict_images(images)] for m in members]
    assert [a["in_domain"] for a in got] == [bool(x and y) for x, y in zip(*doms)]
    assert all(a["model"].startswith("pair=ensemble(") for a in got)


def test_ensemble_folder_round_trips_with_its_own_operating_points_and_card(model_zoo, tmp_path):
    spec = ck.read_ensemble(model_zoo / "pair")
    assert spec["members"] == ["../calibrated", "../other"]  # by reference, relative: the zoo moves as one
    ops = spec["trust"]["operating_points"]
    assert set(ops) == {"fpr=0.01", "fpr=0.05", "eer"}
    ens = load_scorer(model_zoo / "pair", device="cpu", operating_point="eer")
    assert ens.op.name == "eer" and ens.op.threshold == pytest.approx(ops["eer"]["threshold"])
    first = Predictor.from_dir(model_zoo / "calibrated", device="cpu", operating_point="eer")
    assert ens.op.threshold != first.op.threshold  # its own point, not the first member's
    card = (model_zoo / "pair" / "README.md").read_text()
    assert "../calibrated" in card and "images/s" in card and "every member's guard" in card
    # moved together, the folder still resolves; moved alone, it says which member is missing
    moved = tmp_path / "elsewhere"
    shutil.copytree(model_zoo, moved)
    assert load_scorer(moved / "pair", device="cpu").version == ens.version
    shutil.copytree(model_zoo / "pair", tmp_path / "alone")
    with pytest.raises(ck.CheckpointError, match="member ../calibrated"):
        load_scorer(tmp_path / "alone")
    assert scorer_info(moved / "pair")["version"] == ens.version


def test_plain_timm_refuses_an_ensemble_folder(model_zoo):
    import timm

    assert not (model_zoo / "pair" / ck.CONFIG).exists()
    with pytest.raises(Exception):  # noqa: B017 - timm raises a hub/file error; what matters is that it loads nothing
        timm.create_model(f"local-dir:{model_zoo / 'pair'}", pretrained=True)


def test_make_ensemble_refuses_bad_members_and_existing_folders(model_zoo, tmp_path):
    with pytest.raises(ck.CheckpointError, match="exists"):
        make_ensemble(model_zoo / "pair", [model_zoo / "calibrated", model_zoo / "other"], calibrate=False)
    with pytest.raises(ck.CheckpointError, match="itself an ensemble"):
        make_ensemble(tmp_path / "nested", [model_zoo / "pair", model_zoo / "other"], calibrate=False)
    with pytest.raises(ck.CheckpointError, match="not found"):
        make_ensemble(tmp_path / "missing", [model_zoo / "calibrated", tmp_path / "nope"], calibrate=False)
    assert not (tmp_path / "nested").exists() and not (tmp_path / "missing").exists()


def test_evaluate_predict_and_explain_take_an_ensemble_folder(model_zoo, tmp_path):
    from deepfake.evaluate import evaluate, update_card
    from deepfake.explain import explain_images
    from deepfake.predict import predict_rows

    d = tmp_path / "zoo"
    shutil.copytree(model_zoo, d)
    result = evaluate(d / "pair", data=SAMPLE_DIR, split="all", out_dir=tmp_path / "ev", n_bootstrap=20, device="cpu")
    assert result["model"].startswith("pair=ensemble(") and len(result["models"]) == 2
    update_card(d / "pair", result)
    spec = json.loads((d / "pair" / ck.ENSEMBLE).read_text())["deepfake_ensemble"]
    assert spec["metrics"]["all_accuracy"] == pytest.approx(result["metrics"]["accuracy"], abs=1e-4)
    assert "all_accuracy" in (d / "pair" / "README.md").read_text()
    with pytest.raises(ck.CheckpointError, match="do not belong"):
        update_card(d / "other", result)  # an ensemble's figures never land on one member's card

    ens = load_scorer(d / "pair", device="cpu")
    files = sorted((SAMPLE_DIR / "FAKE").iterdir())[:3]
    rows = predict_rows(ens, [p.name for p in files], [p.read_bytes() for p in files], ["", "", ""])
    assert list(rows["model"]) == [ens.version] * 3
    np.testing.assert_allclose(rows["prob_ai"], [a["prob_ai"] for a in ens.predict_images(sample_images(6)[:3])])

    expl = explain_images(ens, sample_images(2))
    assert len(expl) == 2 and expl[0].cam.shape == (32, 32) and expl[0].answer["model"] == ens.version

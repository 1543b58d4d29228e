"""Evaluation of a really fine-tuned model folder on the shipped sample: splits, files, robustness, card."""

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deepfake import checkpoint as ck
from deepfake.cli import main
from deepfake.data import SAMPLE_DIR, DataError, scan, split_samples
from deepfake.evaluate import CONDITIONS, _Reader, evaluate, score_refs, update_card
from deepfake.images import decode_image
from deepfake.inference import Predictor

FIELDS = {"models", "data", "split", "split_settings", "n", "n_selected", "skipped", "metrics", "files"}


def expected_refs(model_dir, split):
    d = ck.read_metadata(model_dir)["config"]["data"]
    parts = split_samples(scan(SAMPLE_DIR, progress=False).samples, d["val_ratio"], d["test_ratio"], d["seed"])
    return set(parts[parts["split"] == split]["ref"])


def with_data_seed(src, dst, seed):
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw["deepfake"]["config"]["data"]["seed"] = seed
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.fixture(scope="module")
def val_eval(trained_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "val"
    return evaluate(trained_model_dir, split="val", robustness=True, out_dir=out, n_bootstrap=200), out


def test_val_is_the_training_runs_validation_part(val_eval, trained_model_dir):
    result, out = val_eval
    saved = json.loads((out / "metrics.json").read_text())
    assert FIELDS <= set(saved) and saved["split"] == "val"
    m = saved["metrics"]
    for key in ("accuracy", "accuracy_ci", "per_class", "f1_macro", "roc_auc", "roc_auc_ci", "average_precision"):
        assert key in m
    assert m["confusion_matrix"]["labels"] == ["ai", "real"] and m["threshold"] == 0.5
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert set(preds["filename"]) == expected_refs(trained_model_dir, "val")
    assert saved["n"] == m["n"] == len(preds) == np.sum(m["confusion_matrix"]["matrix"]) == 40
    assert saved["skipped"]["count"] == 0
    # the headline numbers are the per-file predictions, counted
    assert m["accuracy"] == pytest.approx((preds["class"] == preds["label"]).mean())
    for name in ("confusion_matrix.png", "roc.png", "reliability.png"):
        assert Image.open(out / name).format == "PNG"


def test_predictions_are_the_predictors_own(val_eval, trained_model_dir):
    """One inference path: the batched evaluation equals Predictor.predict_images on the same files."""
    _, out = val_eval
    preds = pd.read_csv(out / "predictions.csv").head(5)
    predictor = Predictor.from_dir(trained_model_dir, device="cpu")
    direct = predictor.predict_images([decode_image(open(f, "rb").read()) for f in preds["filename"]])
    assert preds["prob_ai"].tolist() == pytest.approx([d["prob_ai"] for d in direct], abs=1e-5)


def test_robustness_sweep_has_every_condition(val_eval):
    result, out = val_eval
    table = result["robustness"]
    assert list(table) == list(CONDITIONS)
    assert table["clean"]["accuracy"] == result["metrics"]["accuracy"] and table["clean"]["accuracy_delta"] == 0
    for cond, row in table.items():
        assert row["n"] == 40 and 0 <= row["accuracy"] <= 1, cond
    # the perturbations change what the model sees, so at least some scores move
    assert len({round(r["roc_auc"], 6) for r in table.values()}) > 1
    md = (out / "robustness.md").read_text()
    assert all(f"| {c} |" in md for c in CONDITIONS)
    assert pd.read_csv(out / "robustness.csv")["condition"].tolist() == list(CONDITIONS)


def test_perturbations_do_what_they_say():
    img = decode_image(open(sorted((SAMPLE_DIR / "REAL").iterdir())[0], "rb").read())
    arr = np.asarray(img, dtype=float)
    assert CONDITIONS["downscale_0.5x"](img).size == (img.width // 2, img.height // 2)
    diffs = {}
    for name in ("jpeg_q90", "jpeg_q75", "jpeg_q50", "blur_r1"):
        out = CONDITIONS[name](img)
        assert out.size == img.size and out.mode == "RGB"
        diffs[name] = np.abs(np.asarray(out, dtype=float) - arr).mean()
    assert 0 < diffs["jpeg_q90"] < diffs["jpeg_q50"] and diffs["blur_r1"] > 0


def test_split_follows_the_models_own_settings(trained_model_dir, tmp_path):
    other = with_data_seed(trained_model_dir, tmp_path / "seed7", 7)
    evaluate(other, split="val", out_dir=tmp_path / "out", n_bootstrap=0)
    refs = set(pd.read_csv(tmp_path / "out" / "predictions.csv")["filename"])
    assert refs == expected_refs(other, "val") and refs != expected_refs(trained_model_dir, "val")
    with pytest.raises(DataError, match="other split settings"):
        evaluate([trained_model_dir, other], split="val")


def test_ensemble_of_a_model_with_itself_is_the_model(trained_model_dir, tmp_path):
    single = evaluate(trained_model_dir, split="test", out_dir=tmp_path / "one", n_bootstrap=0)
    double = evaluate([trained_model_dir, trained_model_dir], split="test", out_dir=tmp_path / "two", n_bootstrap=0)
    assert double["combine"] == "mean calibrated prob_ai" and len(double["models"]) == 2
    a = pd.read_csv(tmp_path / "one" / "predictions.csv")
    b = pd.read_csv(tmp_path / "two" / "predictions.csv")
    assert a["filename"].tolist() == b["filename"].tolist()
    assert b["prob_ai"].tolist() == pytest.approx(a["prob_ai"].tolist(), abs=1e-6)
    assert b["prob_ai_1"].tolist() == b["prob_ai_2"].tolist()
    assert double["metrics"]["confusion_matrix"] == single["metrics"]["confusion_matrix"]
    assert set(a["filename"]) == expected_refs(trained_model_dir, "test")
    with pytest.raises(ck.CheckpointError, match="ensemble"):
        update_card(trained_model_dir, double)


def test_skipped_and_failing_files_are_counted(trained_model_dir, tmp_path):
    data = tmp_path / "data"
    for label, src in (("ai", "FAKE"), ("real", "REAL")):
        (data / label).mkdir(parents=True)
        for p in sorted((SAMPLE_DIR / src).iterdir())[:6]:
            shutil.copy(p, data / label / p.name)
    (data / "ai" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result = evaluate(trained_model_dir, data=data, split="all", n_bootstrap=0)
    assert result["n"] == 12 and result["skipped"]["at_scan"] == 1
    assert sum(result["skipped"]["at_scan_by_reason"].values()) == result["skipped"]["count"] == 1
    # a file that stops decoding after the scan is reported per file, not a crash of the batch
    predictor = Predictor.from_dir(trained_model_dir, device="cpu")
    good = str(next((data / "real").iterdir()))
    sc = score_refs(predictor, [good, "gone"], _Reader({"gone": b"junk"}), batch_size=2)
    assert np.isfinite(sc.prob_ai[0]) and np.isnan(sc.prob_ai[1]) and sc.errors[0] == "" and "BadImage" in sc.errors[1]


def test_update_card_keeps_the_rest_of_the_folder(val_eval, trained_model_dir, tmp_path):
    result, _ = val_eval
    d = tmp_path / "shipped"
    shutil.copytree(trained_model_dir, d)
    before = json.loads((d / "config.json").read_text())
    meta = update_card(d, result)
    after = json.loads((d / "config.json").read_text())
    assert {k: v for k, v in after.items() if k != "deepfake"} == {k: v for k, v in before.items() if k != "deepfake"}
    for key in ("arch", "classes", "image_size", "mean", "std", "config", "created"):
        assert after["deepfake"][key] == before["deepfake"][key]
    assert after["deepfake"]["metrics"]["val_accuracy"] == pytest.approx(result["metrics"]["accuracy"], abs=1e-4)
    assert after["deepfake"]["evaluations"]["val"]["n"] == 40
    assert set(after["deepfake"]["robustness"]) == set(CONDITIONS)
    card = (d / "README.md").read_text()
    assert card == ck.render_card(meta) and "val_accuracy" in card and "| jpeg_q50 |" in card
    ck.load_model(d)  # still a loadable model folder


def test_cli_evaluate(trained_model_dir, tmp_path, capsys, caplog):
    out = tmp_path / "cli"
    rc = main(["evaluate", "--model", str(trained_model_dir), "--split", "test", "-o", str(out), "--bootstrap", "50"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["split"] == "test" and (out / "metrics.json").is_file() and printed["n"] == 40
    with caplog.at_level(logging.ERROR):
        assert main(["evaluate", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2
    assert "model folder not found" in caplog.text
    assert not (tmp_path / "x").exists()
    with caplog.at_level(logging.ERROR):
        rc = main(["evaluate", "--model", str(trained_model_dir), "--data", str(tmp_path / "none"), "-o", str(out)])
    assert rc == 2 and "dataset not found" in caplog.text

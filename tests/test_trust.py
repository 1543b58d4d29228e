"""Trust in a verdict: temperature scaling, operating points, the verdict rule, the out-of-domain guard and
its storage in the model folder, and the fields every answer carries (CSV, explain)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from deepfake import checkpoint as ck
from deepfake.calibrate import calibrate, remove
from deepfake.calibration import (
    CalibrationError,
    fit_temperature,
    nll,
    parse_operating_point,
    softmax,
    threshold_at_fpr,
    verdict,
)
from deepfake.guard import GUARD_FILE, DomainGuard, GuardError
from deepfake.inference import Predictor
from deepfake.predict import predict_rows
from tests.conftest import real_photos


# ---------------------------------------------------------------------------------------------- pure rules
def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.integers(0, 2, n)
    # a model right 80% of the time that says 99.9%: logits of +-7 around the chosen class
    chosen = np.where(rng.random(n) < 0.8, y, 1 - y)
    logits = np.zeros((n, 2))
    logits[np.arange(n), chosen] = 7.0
    t = fit_temperature(logits, y)
    assert t > 2  # it must soften
    assert nll(logits, y, t) < 0.6 * nll(logits, y)
    # after scaling, the confidence of the chosen class matches its accuracy
    assert softmax(logits, t).max(1).mean() == pytest.approx(0.8, abs=0.02)
    with pytest.raises(CalibrationError, match="both classes"):
        fit_temperature(logits[y == 0], y[y == 0])


def test_operating_points_give_the_stated_false_positive_rate():
    rng = np.random.default_rng(1)
    real, ai = rng.normal(0, 1, 20000), rng.normal(2.5, 1, 20000)
    y = np.r_[np.zeros(len(real)), np.ones(len(ai))].astype(int)
    p = 1 / (1 + np.exp(-np.r_[real, ai]))
    for fpr in (0.01, 0.05):
        op = threshold_at_fpr(y, p, fpr)
        measured = float((p[y == 0] >= op["threshold"]).mean())
        assert measured <= fpr and measured == pytest.approx(fpr, abs=0.001)
        assert op["detection_rate"] == pytest.approx(float((p[y == 1] >= op["threshold"]).mean()))
    # the normal model's detection rate at FPR 1%: Phi(2.5 - 2.326) ~ 0.569
    assert threshold_at_fpr(y, p, 0.01)["detection_rate"] == pytest.approx(0.569, abs=0.02)


def test_operating_point_parsing():
    points = {"fpr=0.01": {"threshold": 0.93}, "eer": {"threshold": 0.41}}
    assert parse_operating_point(None, points).threshold == 0.5
    assert parse_operating_point("0.7", points).threshold == 0.7
    assert parse_operating_point("fpr=0.010", points).threshold == 0.93
    assert parse_operating_point("EER", points).name == "eer"
    with pytest.raises(CalibrationError, match="not recorded"):
        parse_operating_point("fpr=0.05", points)
    with pytest.raises(CalibrationError, match="calibrate"):
        parse_operating_point("eer", {})
    for bad in ("1.5", "fpr=x", "wild"):
        with pytest.raises(CalibrationError):
            parse_operating_point(bad, points)


def test_verdict_rule():
    assert verdict(0.95, True)[0] == "ai" and verdict(0.05, True)[0] == "real"
    assert verdict(0.5, True)[0] == "uncertain" and "band" in verdict(0.5, True)[1]
    v, why = verdict(0.99, False)
    assert v == "uncertain" and "unlike" in why
    v, why = verdict(0.99, None)
    assert v == "ai" and "no out-of-domain guard" in why
    # a threshold above the band widens it: 0.85 is neither real nor past the FPR-1% threshold 0.9
    assert verdict(0.85, True, threshold=0.9)[0] == "uncertain"
    assert verdict(0.91, True, threshold=0.9)[0] == "ai"
    assert verdict(0.15, True, threshold=0.1)[0] == "uncertain"


# ---------------------------------------------------------------------------------------------- the model folder
def test_calibrate_writes_guard_temperature_and_card(calibrated_model_dir):
    meta = ck.read_metadata(calibrated_model_dir)
    trust = meta["trust"]
    assert trust["temperature"] > 0 and set(trust["operating_points"]) == {"fpr=0.01", "fpr=0.05", "eer"}
    assert trust["guard"]["file"] == GUARD_FILE and (calibrated_model_dir / GUARD_FILE).is_file()
    assert trust["guard"]["envelope"]["short_min"] == trust["guard"]["envelope"]["short_max"] == 32
    after, before = trust["calibration"]["val after"], trust["calibration"]["val before"]
    assert after["nll"] <= before["nll"] + 1e-9
    card = (calibrated_model_dir / "README.md").read_text()
    assert "How far a verdict can be trusted" in card and "Out-of-domain guard" in card and "fpr=0.01" in card
    assert not list(calibrated_model_dir.glob(".*.tmp"))


def test_guard_survives_a_save_load_round_trip_bit_for_bit(calibrated_model_dir, tmp_path):
    spec = ck.read_metadata(calibrated_model_dir)["trust"]["guard"]
    guard = DomainGuard.load(calibrated_model_dir, spec)
    out = tmp_path / "copy"
    out.mkdir()
    spec2 = guard.save(out)
    assert (out / GUARD_FILE).read_bytes() == (calibrated_model_dir / GUARD_FILE).read_bytes()
    assert spec2["sha256"] == spec["sha256"]
    a, b = load_file(str(calibrated_model_dir / GUARD_FILE)), load_file(str(out / GUARD_FILE))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    again = DomainGuard.load(out, spec2)
    feats = np.random.default_rng(0).normal(size=(5, sum(guard.groups)))
    assert np.array_equal(guard.score(feats), again.score(feats))


def test_unfitted_folder_answers_in_domain_null(trained_model_dir, sample_dir):
    from PIL import Image

    assert "trust" not in ck.read_metadata(trained_model_dir)
    p = Predictor.from_dir(trained_model_dir, device="cpu")
    img = Image.open(sorted((sample_dir / "FAKE").iterdir())[0]).convert("RGB")
    (a,) = p.predict_images([img])
    assert a["in_domain"] is None and a["domain_score"] is None and "no out-of-domain guard" in a["reason"]
    assert a["prob_ai"] == a["prob_ai_raw"]  # temperature 1
    assert "no out-of-domain guard" in (trained_model_dir / "README.md").read_text()


def test_corrupt_or_missing_guard_file_is_an_error_naming_it(calibrated_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(calibrated_model_dir, d)
    raw = bytearray((d / GUARD_FILE).read_bytes())
    raw[-10] ^= 0xFF
    (d / GUARD_FILE).write_bytes(bytes(raw))
    with pytest.raises(GuardError, match=GUARD_FILE):
        Predictor.from_dir(d, device="cpu")
    (d / GUARD_FILE).unlink()
    with pytest.raises(GuardError, match="missing"):
        Predictor.from_dir(d, device="cpu")
    remove(d)  # back to an unfitted folder: loads, answers in_domain null
    assert Predictor.from_dir(d, device="cpu").guard is None


def test_calibrate_refuses_one_class_and_too_few_images(trained_model_dir, sample_dir, tmp_path):
    one = tmp_path / "one" / "ai"
    one.mkdir(parents=True)
    for p in sorted((sample_dir / "FAKE").iterdir())[:30]:
        shutil.copy(p, one / p.name)
    d = tmp_path / "m"
    shutil.copytree(trained_model_dir, d)
    with pytest.raises(CalibrationError, match="both classes"):
        calibrate(d, data=one.parent, progress=False, device="cpu")
    few = tmp_path / "few"
    for src, label in (("FAKE", "ai"), ("REAL", "real")):
        (few / label).mkdir(parents=True)
        for p in sorted((sample_dir / src).iterdir())[:25]:
            shutil.copy(p, few / label / p.name)
    with pytest.raises((GuardError, CalibrationError), match="too few|one class"):
        calibrate(d, data=few, progress=False, device="cpu")
    assert "trust" not in ck.read_metadata(d) and not (d / GUARD_FILE).exists()  # nothing half-written


# ---------------------------------------------------------------------------------------------- answers
def test_real_photos_get_no_verdict(calibrated_model_dir):
    p = Predictor.from_dir(calibrated_model_dir, device="cpu", jit=True)
    answers = p.predict_images(list(real_photos().values()))
    assert all(a["in_domain"] is False and a["verdict"] == "uncertain" for a in answers)
    assert all("size" in a["reason"] for a in answers)


def test_csv_rows_and_explanations_carry_the_guard(calibrated_model_dir, sample_dir):
    from deepfake.explain import explain_images

    photo = real_photos()["astronaut"]
    buf = io.BytesIO()
    photo.save(buf, format="JPEG")
    cifake = sorted((sample_dir / "REAL").iterdir())[0].read_bytes()
    p = Predictor.from_dir(calibrated_model_dir, device="cpu", jit=True, operating_point="fpr=0.05")
    rows = predict_rows(p, ["photo.jpg", "cifake.jpg"], [buf.getvalue(), cifake], ["", ""])
    assert list(rows["verdict"])[0] == "uncertain" and rows["in_domain"][0] is False
    assert rows["operating_point"][0] == "fpr=0.05" and isinstance(rows["domain_score"][1], float)
    assert rows["prob_ai_raw"][1] == pytest.approx(
        float(softmax(np.log([[rows["prob_ai_raw"][1], 1 - rows["prob_ai_raw"][1]]]))[0, 0])
    )
    (e,) = explain_images(p, [photo])
    assert e.verdict == "uncertain" and e.answer["in_domain"] is False
    json.dumps(e.answer)  # JSON-ready

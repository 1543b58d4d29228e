"""Batch prediction: the core without Ray, then real Ray Data runs on a folder, a .tar.gz and a manifest."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from deepfake.checkpoint import load_model, save_model
from deepfake.cli import main
from deepfake.config import ModelConfig
from deepfake.data import SAMPLE_DIR, DataError
from deepfake.images import decode_image
from deepfake.inference import Ensemble, Predictor
from deepfake.model import create_model
from deepfake.predict import (
    COLUMNS,
    finished_rows,
    list_files,
    predict,
    predict_rows,
    read_archive,
)


def make_folder(root: Path) -> dict[str, Path]:
    """12 real images at two depths, a corrupt and an empty .jpg, and files that are not images."""
    files = {}
    for i, p in enumerate(sorted((SAMPLE_DIR / "FAKE").iterdir())[:6] + sorted((SAMPLE_DIR / "REAL").iterdir())[:6]):
        rel = f"x{i:02d}.jpg" if i % 2 else f"deep/er/x{i:02d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / rel)
        files[rel] = root / rel
    good = files[next(iter(files))].read_bytes()
    (root / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(good)
    return files


# ---------------------------------------------------------------------------------------------- no Ray
def test_predict_rows_decodes_and_turns_bad_bytes_into_error_rows(trained_model_dir):
    pred = Predictor.from_dir(trained_model_dir, device="cpu")
    good = [p.read_bytes() for p in sorted((SAMPLE_DIR / "REAL").iterdir())[:3]]
    rows = predict_rows(
        pred,
        ["a", "bad", "b", "gone", "c"],
        [good[0], b"junk", good[1], None, good[2]],
        ["", "", "", "unreadable: x", ""],
    )
    assert list(rows["error"]) == ["", "not_an_image", "", "unreadable: x", ""]
    assert list(rows["class"][[1, 3]]) == ["", ""] and np.isnan(rows["prob_ai"][[1, 3]]).all()
    expected = pred.predict_images([decode_image(b) for b in good])
    assert [rows["class"][i] for i in (0, 2, 4)] == [e["label"] for e in expected]
    np.testing.assert_allclose(rows["prob_ai"][[0, 2, 4]], [e["prob_ai"] for e in expected], atol=1e-6)


def test_traced_predictor_matches_the_eager_one_at_any_batch_size(trained_model_dir):
    """jit=True (what the Serve Detector runs): the same probabilities for batch sizes other than the
    traced one, and the eager module is kept for Grad-CAM."""
    eager = Predictor.from_dir(trained_model_dir, device="cpu")
    traced = Predictor.from_dir(trained_model_dir, device="cpu", jit=True)
    assert isinstance(traced.forward, torch.jit.ScriptModule) and not isinstance(traced.model, torch.jit.ScriptModule)
    imgs = [decode_image(p.read_bytes()) for p in sorted((SAMPLE_DIR / "FAKE").iterdir())[:5]]
    for n in (1, 5):
        a, b = eager.predict_images(imgs[:n]), traced.predict_images(imgs[:n])
        assert [x["label"] for x in a] == [x["label"] for x in b]
        np.testing.assert_allclose([x["prob_ai"] for x in a], [x["prob_ai"] for x in b], atol=1e-5)


def test_ensemble_is_the_mean_probability(trained_model_dir, tmp_path):
    torch.manual_seed(0)
    _, meta = load_model(trained_model_dir)
    other = save_model(create_model(ModelConfig(arch=meta["arch"])), tmp_path / "random", {**meta, "created": "x"})
    a, b = Predictor.from_dir(trained_model_dir, device="cpu"), Predictor.from_dir(other, device="cpu")
    data = [p.read_bytes() for p in sorted((SAMPLE_DIR / "FAKE").iterdir())[:4]]
    rows = predict_rows(Ensemble([a, b]), list("wxyz"), data, [""] * 4)
    imgs = [decode_image(d) for d in data]
    mean = [(x["prob_ai"] + y["prob_ai"]) / 2 for x, y in zip(a.predict_images(imgs), b.predict_images(imgs))]
    np.testing.assert_allclose(rows["prob_ai"], mean, atol=1e-6)
    assert rows["model"][0] == f"ensemble({a.version}+{b.version})"


def test_list_files_recursive_images_only(tmp_path):
    files = make_folder(tmp_path)
    names = [n for n, _ in list_files(tmp_path)]
    assert sorted(names) == sorted([*files, "corrupt.jpg", "empty.png"])
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": ["x01.jpg", "nope.jpg"], "label": ["fake", ""]}).to_csv(manifest, index=False)
    assert list_files(manifest) == [("x01.jpg", str(tmp_path / "x01.jpg")), ("nope.jpg", str(tmp_path / "nope.jpg"))]
    with pytest.raises(DataError):
        list_files(tmp_path / "notes.txt")


def test_damaged_archive_ends_with_an_error_row(tmp_path):
    src = tmp_path / "src"
    make_folder(src)
    arc = tmp_path / "a.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        tar.add(src, arcname="data")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(arc.read_bytes()[: arc.stat().st_size // 2])
    rows = list(read_archive(str(cut), set()))
    assert rows[-1][2].startswith("archive_damaged") and all(not e for _, _, e in rows[:-1])
    full = list(read_archive(str(arc), {"data/x01.jpg"}))
    assert len(full) == 13 and "data/x01.jpg" not in {n for n, _, _ in full}


def test_finished_rows_drops_half_row_and_refuses_another_model(tmp_path):
    out = tmp_path / "p.csv"

    def row(**cells) -> str:
        return ",".join(cells.get(c, "") for c in COLUMNS)

    good = row(filename="a.jpg", **{"class": "ai"}, verdict="ai", prob_ai="0.9", model="m1")
    out.write_text(f"{','.join(COLUMNS)}\n{good}\n{row(filename='b.jpg', model='m1', error='truncated')}\nc.jp")
    assert finished_rows(out, "m1") == {"a.jpg", "b.jpg"}
    assert out.read_text().endswith("truncated\n")
    with pytest.raises(DataError, match="m1"):
        finished_rows(out, "m2")
    (tmp_path / "q.csv").write_text("path,label\nx,ai\n")
    with pytest.raises(DataError, match="not a deepfake predictions CSV"):
        finished_rows(tmp_path / "q.csv", "m1")
    assert (tmp_path / "q.csv").read_text() == "path,label\nx,ai\n"


# ---------------------------------------------------------------------------------------------- Ray Data
@pytest.fixture(scope="module")
def folder_run(trained_model_dir, ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    src = root / "images"
    files = make_folder(src)
    out = root / "predictions.csv"
    summary = predict(trained_model_dir, src, out, batch_size=4, progress=False)
    return src, files, out, summary


@pytest.mark.slow
def test_folder_with_corrupt_files_finishes_with_error_rows(folder_run):
    src, files, out, summary = folder_run
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(df.columns) == COLUMNS
    assert sorted(df["filename"]) == sorted([*files, "corrupt.jpg", "empty.png"])
    bad = df.set_index("filename").loc[["corrupt.jpg", "empty.png"]]
    assert list(bad["error"]) == ["truncated", "empty"] and set(bad["class"]) == {""} and set(bad["prob_ai"]) == {""}
    assert summary["predicted"] == len(files) and summary["errors"] == 2 and summary["already_done"] == 0
    assert (df[df["error"] == ""]["class"].isin(["ai", "real"])).all()


@pytest.mark.slow
def test_predictions_match_the_predictor(folder_run, trained_model_dir):
    src, files, out, _ = folder_run
    df = pd.read_csv(out, keep_default_na=False).set_index("filename")
    pred = Predictor.from_dir(trained_model_dir, device="cpu")
    names = sorted(files)
    expected = pred.predict_images([decode_image(files[n].read_bytes()) for n in names])
    assert list(df.loc[names, "class"]) == [e["label"] for e in expected]
    np.testing.assert_allclose(df.loc[names, "prob_ai"].astype(float), [e["prob_ai"] for e in expected], atol=1e-5)
    assert set(df["model"]) == {pred.version}


@pytest.mark.slow
def test_resume_predicts_only_the_missing_rows(folder_run, trained_model_dir, tmp_path):
    src, files, full_out, _ = folder_run
    lines = full_out.read_text().splitlines(keepends=True)
    out = tmp_path / "partial.csv"
    out.write_text("".join(lines[:6]) + lines[6][:10])  # header + 5 finished rows + a half-written row
    summary = predict(trained_model_dir, src, out, batch_size=4, progress=False)
    assert summary["already_done"] == 5 and summary["rows_written"] == len(lines) - 1 - 5
    text = out.read_text()
    assert text.startswith("".join(lines[:6]))  # finished rows untouched
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(df) == len(lines) - 1 and df["filename"].is_unique
    # nothing left: a second resume does no work and starts no Ray job
    again = predict(trained_model_dir, src, out, progress=False)
    assert again["already_done"] == len(df) and again["predicted"] == 0 and out.read_text() == text


@pytest.mark.slow
def test_tar_gz_input_streams_members(folder_run, trained_model_dir, tmp_path):
    src, files, full_out, _ = folder_run
    arc = tmp_path / "images.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        tar.add(src, arcname="cifake")
    out = tmp_path / "tar.csv"
    summary = predict(trained_model_dir, arc, out, batch_size=4, progress=False)
    df = pd.read_csv(out, keep_default_na=False).set_index("filename")
    ref = pd.read_csv(full_out, keep_default_na=False).set_index("filename")
    ref.index = "cifake/" + ref.index
    assert sorted(df.index) == sorted(ref.index) and summary["errors"] == 2
    assert (df.loc[ref.index, "class"] == ref["class"]).all()
    np.testing.assert_allclose(
        pd.to_numeric(df.loc[ref.index, "prob_ai"]).fillna(-1), pd.to_numeric(ref["prob_ai"]).fillna(-1), atol=1e-5
    )


@pytest.mark.slow
def test_cli_predict_manifest(folder_run, trained_model_dir, tmp_path, capsys, caplog):
    src, files, _, _ = folder_run
    manifest = tmp_path / "m.csv"
    paths = [str(p) for p in list(files.values())[:3]] + [str(tmp_path / "missing.jpg")]
    pd.DataFrame({"path": paths}).to_csv(manifest, index=False)
    out = tmp_path / "m_pred.csv"
    args = ["predict", str(manifest), "--model", str(trained_model_dir), "-o", str(out), "--batch-size", "2"]
    assert main(args) == 2 and not out.exists()  # absolute paths elsewhere: refused without --allow-outside
    assert "--allow-outside" in caplog.text
    rc = main([*args, "--allow-outside"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["predicted"] == 3 and summary["errors"] == 1
    df = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("filename")
    assert df.loc[str(tmp_path / "missing.jpg"), "error"].startswith("unreadable")
    assert main(["predict", str(tmp_path / "nowhere"), "--model", str(trained_model_dir), "-o", str(out)]) == 2

"""Files: nothing half-written or clobbered, CSV cells a spreadsheet cannot run, inputs with a size cap, and
manifests that stay inside their folder."""

import hashlib
import io
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest

from deepfake import checkpoint as ck
from deepfake import files
from deepfake.cli import main
from deepfake.data import SAMPLE_DIR, DataError, scan
from deepfake.predict import COLUMNS, _cell, finished_rows, list_files, predict, read_archive, read_files


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


KILL_DURING_EXPORT = """
import sys, time
from deepfake import checkpoint as ck
model, meta = ck.load_model(sys.argv[1])
meta = {**meta, "created": "2099-01-01T00:00:00+00:00"}
def slow_card(m):  # the weights and config.json are written by now; the card is the last file
    print("WRITING", flush=True)
    time.sleep(120)
ck.render_card = slow_card
ck.save_model(model, sys.argv[2], meta)
"""


def test_a_kill_during_export_leaves_the_previous_model_intact(trained_model_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(trained_model_dir, out)
    before = _digest(out)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_EXPORT, str(trained_model_dir), str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        staged = list(tmp_path.glob(".model.*.partial"))
        assert staged and (staged[0] / "model.safetensors").is_file()  # the new weights exist, beside
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert _digest(out) == before  # the old folder, bit for bit
    ck.load_model(out)
    # the next export into the same place is whole, and leaves no staging folder behind
    model, meta = ck.load_model(trained_model_dir)
    ck.save_model(model, out, {**meta, "created": "2099-01-02T00:00:00+00:00"})
    assert ck.read_metadata(out)["created"].startswith("2099-01-02")
    assert not list(tmp_path.glob(".model.*.partial")) and not list(tmp_path.glob(".model.*.old"))


def test_train_refuses_an_existing_out_without_overwrite(small_sample, trained_model_dir, tmp_path, caplog):
    out = tmp_path / "model"
    shutil.copytree(trained_model_dir, out)
    before = _digest(out)
    start = time.monotonic()
    args = ["train", "--data", str(small_sample), "--out", str(out), "--storage-path", str(tmp_path / "runs")]
    assert main(args) == 2
    assert "already exists; pass --overwrite" in caplog.text
    assert time.monotonic() - start < 30 and not (tmp_path / "runs").exists()  # refused before anything ran
    assert _digest(out) == before


def test_predict_refuses_an_unrelated_output_file_untouched(trained_model_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(sorted((SAMPLE_DIR / "FAKE").iterdir())[0], src / "a.jpg")
    notes = tmp_path / "notes.txt"
    notes.write_text("my thesis, no trailing newline")  # a half row to a resume: it would be cut
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a deepfake predictions CSV"):
            predict(trained_model_dir, src, notes, overwrite=overwrite, progress=False)
        assert notes.read_text() == "my thesis, no trailing newline"


def test_csv_cells_cannot_run_as_formulas_and_resume_reads_them_back(tmp_path):
    for text in ('=HYPERLINK("http://x")', "+1", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        cell = _cell("filename", text)
        assert cell == "'" + text and files.unsafe_cell(cell) == text
    assert _cell("filename", "cat.jpg") == "cat.jpg" and _cell("prob_ai", 0.25) == "0.25"
    out = tmp_path / "p.csv"
    row = {c: "" for c in COLUMNS} | {"filename": _cell("filename", "=evil.jpg"), "model": "m1"}
    pd.DataFrame([row], columns=COLUMNS).to_csv(out, index=False)
    assert finished_rows(out, "m1") == {"=evil.jpg"}  # a resume skips it, no duplicate row
    frame = files.safe_frame(pd.DataFrame({"filename": ["=a", "b"], "prob_ai": [0.1, 0.2]}))
    assert frame["filename"].tolist() == ["'=a", "b"] and frame["prob_ai"].tolist() == [0.1, 0.2]


def _tar_with(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_oversized_archive_members_and_files_are_refused_by_name(tmp_path, monkeypatch):
    small = sorted((SAMPLE_DIR / "FAKE").iterdir())[0].read_bytes()
    monkeypatch.setattr(files, "MAX_FILE_BYTES", len(small) + 10)
    big = small + b"\0" * 100
    arc = _tar_with(tmp_path / "d.tar.gz", {"ai/ok.jpg": small, "ai/huge.jpg": big, "real/ok2.jpg": small})
    cat = scan(arc, progress=False)
    assert len(cat.samples) == 2
    (skip,) = cat.skipped.itertuples()
    assert skip.reason == "too_large" and skip.ref.endswith("::ai/huge.jpg") and "ai/huge.jpg" in skip.detail
    rows = {name: err for name, _, err in read_archive(str(arc), set())}
    assert rows["ai/ok.jpg"] == "" and rows["ai/huge.jpg"].startswith("too_large: d.tar.gz::ai/huge.jpg")
    (tmp_path / "huge.jpg").write_bytes(big)
    ((name, data, err),) = read_files([("huge.jpg", str(tmp_path / "huge.jpg"))])
    assert data is None and err.startswith("too_large:") and "huge.jpg" in err


def test_manifest_paths_outside_its_folder_need_allow_outside(tmp_path):
    inside, outside = tmp_path / "set", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    imgs = sorted((SAMPLE_DIR / "FAKE").iterdir())[:2] + sorted((SAMPLE_DIR / "REAL").iterdir())[:2]
    for i, p in enumerate(imgs):
        shutil.copy(p, (inside if i % 2 == 0 else outside) / f"{i}.jpg")
    manifest = inside / "m.csv"
    rows = [("0.jpg", "ai"), ("../elsewhere/1.jpg", "ai"), ("2.jpg", "real"), (str(outside / "3.jpg"), "real")]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(manifest, index=False)
    for call in (lambda **kw: scan(manifest, progress=False, **kw), lambda **kw: list_files(manifest, **kw)):
        with pytest.raises(DataError, match=r"2 path\(s\) lead outside .*--allow-outside"):
            call()
    assert len(scan(manifest, progress=False, allow_outside=True).samples) == 4
    assert len(list_files(manifest, allow_outside=True)) == 4


def test_write_atomic_replaces_whole_files(tmp_path):
    p = files.write_atomic(tmp_path / "a" / "x.json", "{}")
    assert p.read_text() == "{}" and not list(p.parent.glob(".*.tmp"))
    files.write_atomic(p, b"[1]")
    assert p.read_text() == "[1]"

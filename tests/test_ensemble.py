"""Ensembles of prediction CSVs: vote, mean, ties, misaligned files, errors, bad input, CLI."""

import json
import logging

import pandas as pd
import pytest

from deepfake.cli import main
from deepfake.data import DataError
from deepfake.ensemble import combine, ensemble_files, read_predictions


def write_csv(path, rows, columns=("filename", "class", "prob_ai", "model", "error")):
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def verdict(p):
    return "ai" if p >= 0.5 else "real"


@pytest.fixture()
def three(tmp_path):
    """Three models on files a..d; per file the probabilities are chosen so vote and mean disagree on b."""
    probs = {  # file: (model 1, model 2, model 3)
        "a.jpg": (0.9, 0.8, 0.2),  # 2 ai votes -> ai; mean 0.633 -> ai
        "b.jpg": (0.55, 0.6, 0.01),  # 2 ai votes -> ai; mean 0.387 -> real
        "c.jpg": (0.1, 0.2, 0.95),  # 1 ai vote -> real; mean 0.417 -> real
        "d.jpg": (0.4, 0.45, 0.99),  # 1 ai vote -> real; mean 0.613 -> ai
    }
    paths = []
    for k in range(3):
        rows = [(f, verdict(p[k]), p[k], f"m{k}", "") for f, p in probs.items()]
        paths.append(write_csv(tmp_path / f"m{k}.csv", rows))
    return paths, probs


def test_vote_and_mean(three, tmp_path):
    paths, probs = three
    frames = [read_predictions(p) for p in paths]
    vote = combine(frames, "vote").set_index("filename")
    mean = combine(frames, "mean").set_index("filename")
    assert list(vote.columns) == ["class", "prob_ai", "votes_ai", "votes_real", "error"]
    for f, p in probs.items():
        n_ai = sum(x >= 0.5 for x in p)
        assert vote.loc[f, "votes_ai"] == n_ai and vote.loc[f, "votes_real"] == 3 - n_ai
        assert vote.loc[f, "class"] == ("ai" if n_ai >= 2 else "real")
        assert mean.loc[f, "class"] == verdict(sum(p) / 3)
        assert vote.loc[f, "prob_ai"] == mean.loc[f, "prob_ai"] == pytest.approx(sum(p) / 3, abs=1e-6)
    assert vote.loc["b.jpg", "class"] == "ai" and mean.loc["b.jpg", "class"] == "real"
    assert vote.loc["d.jpg", "class"] == "real" and mean.loc["d.jpg", "class"] == "ai"
    summary = ensemble_files(paths, tmp_path / "out" / "vote.csv")
    written = pd.read_csv(summary["out"], keep_default_na=False)
    assert list(written.columns) == ["filename", "class", "prob_ai", "votes_ai", "votes_real", "error"]
    assert written["class"].tolist() == vote["class"].tolist() and summary["rows"] == 4


def test_vote_ties_are_broken_by_the_mean_and_exact_half_is_ai(tmp_path):
    a = write_csv(
        tmp_path / "a.csv",
        [("x", "ai", 0.9, "m", ""), ("y", "ai", 0.6, "m", ""), ("z", "ai", 0.7, "m", "")],
    )
    b = write_csv(
        tmp_path / "b.csv",
        [("x", "real", 0.3, "m", ""), ("y", "real", 0.2, "m", ""), ("z", "real", 0.3, "m", "")],
    )
    out = combine([read_predictions(a), read_predictions(b)], "vote").set_index("filename")
    assert (out["votes_ai"] == 1).all() and (out["votes_real"] == 1).all()
    assert out.loc["x", "class"] == "ai"  # mean 0.6
    assert out.loc["y", "class"] == "real"  # mean 0.4
    assert out.loc["z", "prob_ai"] == pytest.approx(0.5) and out.loc["z", "class"] == "ai"  # precautionary
    mean = combine([read_predictions(a), read_predictions(b)], "mean").set_index("filename")
    assert mean.loc["z", "class"] == "ai"  # same >= 0.5 rule as one model's argmax


def test_misaligned_files_are_inner_joined_with_a_warning(tmp_path, caplog):
    a = write_csv(tmp_path / "a.csv", [(f, "ai", 0.8, "m", "") for f in ("p", "q", "r")])
    b = write_csv(tmp_path / "b.csv", [(f, "real", 0.1, "m", "") for f in ("s", "r", "q", "t")])
    with caplog.at_level(logging.WARNING, logger="deepfake.ensemble"):
        out = combine([read_predictions(a), read_predictions(b)], "mean", names=["a.csv", "b.csv"])
    assert out["filename"].tolist() == ["q", "r"]  # the first input's order
    assert out["prob_ai"].tolist() == pytest.approx([0.45, 0.45])
    text = caplog.text
    assert "a.csv: 1 of 3 rows" in text and "b.csv: 2 of 4 rows" in text
    c = write_csv(tmp_path / "c.csv", [("zzz", "ai", 0.8, "m", "")])
    with pytest.raises(DataError, match="share no filename"):
        combine([read_predictions(a), read_predictions(c)])


def test_an_error_in_any_input_gives_an_error_row(tmp_path):
    a = write_csv(tmp_path / "a.csv", [("p", "ai", 0.8, "m", ""), ("q", "", "", "m", "not_an_image: junk")])
    b = write_csv(tmp_path / "b.csv", [("p", "ai", 0.7, "m", ""), ("q", "real", 0.2, "m", "")])
    out = combine([read_predictions(a), read_predictions(b)], "vote", names=["a", "b"]).set_index("filename")
    assert out.loc["p", "error"] == "" and out.loc["p", "class"] == "ai"
    assert out.loc["q", "class"] == "" and pd.isna(out.loc["q", "prob_ai"])
    assert out.loc["q", "error"] == "a: not_an_image: junk"
    # files without an error column are accepted too
    c = write_csv(tmp_path / "c.csv", [("p", "real", 0.1), ("q", "real", 0.3)], ("filename", "class", "prob_ai"))
    assert combine([read_predictions(b), read_predictions(c)], "mean")["error"].tolist() == ["", ""]


@pytest.mark.parametrize(
    "content, message",
    [
        ("filename,prob_ai\nx,0.5\n", "missing column"),
        ("filename,class,prob_ai\nx,ai,1.5\n", "not a number in \\[0, 1\\]"),
        ("filename,class,prob_ai\nx,ai,abc\n", "not a number"),
        ("filename,class,prob_ai\nx,dog,0.3\n", "class 'dog'"),
        ("filename,class,prob_ai\nx,ai,0.3\nx,ai,0.4\n", "duplicated filename"),
        ("", "not a readable CSV"),
    ],
)
def test_bad_csv_is_a_clear_error(tmp_path, content, message):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        read_predictions(p)


def test_cli(three, tmp_path, capsys, caplog):
    paths, _ = three
    out = tmp_path / "mean.csv"
    assert main(["ensemble", *map(str, paths), "-o", str(out), "--method", "mean"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "mean" and summary["rows"] == 4 and out.is_file()
    bad = tmp_path / "bad.csv"
    bad.write_text("name,score\nx,1\n")
    with caplog.at_level(logging.ERROR):
        assert main(["ensemble", str(paths[0]), str(bad), "-o", str(tmp_path / "x.csv")]) == 2
    assert "missing column(s) ['filename', 'class', 'prob_ai']" in caplog.text
    assert main(["ensemble", str(paths[0]), str(tmp_path / "nope.csv"), "-o", str(tmp_path / "x.csv")]) == 2
    assert "prediction CSV not found" in caplog.text
    assert main(["ensemble", str(paths[0]), "-o", str(tmp_path / "x.csv")]) == 2
    assert "at least 2" in caplog.text
    assert not (tmp_path / "x.csv").exists()

"""Combine the prediction CSVs of several models (`filename,class,prob_ai[,model,error]`) into one verdict.

Rows are aligned by filename (inner join: a file missing from any input is left out, with a warning that
counts the unmatched rows per input). A row with an error in any input gets an error, and no verdict.

Methods:
- `vote` (the seed's ensemble): each model's `class` is one vote; the majority wins. A tie (an even number
  of models split evenly) is broken by the mean P(ai): above 0.5 -> ai, below -> real, exactly 0.5 -> ai.
  Calling a tied image "ai" is the precautionary choice: it flags the image for a second look instead of
  passing it as a real photograph.
- `mean`: the mean P(ai) against 0.5, where exactly 0.5 is ai, the same rule as a single model's argmax
  (ai is output 0).

Output columns: filename, class, prob_ai (the mean P(ai) with either method), votes_ai, votes_real, error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from deepfake.data import DataError
from deepfake.files import safe_frame, write_atomic
from deepfake.labels import CLASSES, canonical_label

log = logging.getLogger(__name__)

METHODS = ("vote", "mean")
REQUIRED = ("filename", "class", "prob_ai")
OUTPUT = ["filename", "class", "prob_ai", "votes_ai", "votes_real", "error"]


def read_predictions(path: str | Path) -> pd.DataFrame:
    """One prediction CSV, checked: required columns, unique filenames, known classes, P(ai) in [0, 1]
    on every row without an error. Anything else is a DataError naming the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prediction CSV not found: {p}")
    try:
        df = pd.read_csv(p, dtype={"filename": str, "class": str, "error": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{p}: not a readable CSV ({str(e).splitlines()[0][:200]})") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(
            f"{p}: missing column(s) {missing}; a prediction CSV has filename,class,prob_ai[,model,error] "
            f"(found: {', '.join(map(str, df.columns))})"
        )
    if "error" not in df.columns:
        df["error"] = ""
    df["error"] = df["error"].fillna("").astype(str)
    dup = df["filename"][df["filename"].duplicated()]
    if len(dup):
        raise DataError(f"{p}: {len(dup)} duplicated filename(s), e.g. {dup.iloc[0]!r}; cannot align rows")
    ok = df["error"] == ""
    prob = pd.to_numeric(df["prob_ai"].where(ok, None), errors="coerce")
    bad_prob = ok & (prob.isna() | (prob < 0) | (prob > 1))
    if bad_prob.any():
        i = int(np.flatnonzero(bad_prob.to_numpy())[0])
        raise DataError(f"{p}: row {i + 2}: prob_ai {df['prob_ai'].iloc[i]!r} is not a number in [0, 1]")
    cls = df["class"].map(lambda v: canonical_label(v) if isinstance(v, str) else None)
    bad_cls = ok & cls.isna()
    if bad_cls.any():
        i = int(np.flatnonzero(bad_cls.to_numpy())[0])
        raise DataError(f"{p}: row {i + 2}: class {df['class'].iloc[i]!r} is not one of {list(CLASSES)}")
    return pd.DataFrame({"filename": df["filename"], "class": cls.where(ok, ""), "prob_ai": prob, "error": df["error"]})


def align(frames: Sequence[pd.DataFrame], names: Sequence[str]) -> pd.DataFrame:
    """Inner join on filename, in the first input's row order; warns how many rows of each input matched
    nothing in the others."""
    common = set(frames[0]["filename"])
    for f in frames[1:]:
        common &= set(f["filename"])
    for f, name in zip(frames, names):
        unmatched = int((~f["filename"].isin(common)).sum())
        if unmatched:
            log.warning("%s: %d of %d rows have no match in every other input; left out", name, unmatched, len(f))
    if not common:
        raise DataError("the prediction CSVs share no filename: nothing to combine")
    out = frames[0][frames[0]["filename"].isin(common)][["filename"]].reset_index(drop=True)
    for k, f in enumerate(frames):
        part = f.rename(columns={c: f"{c}_{k}" for c in ("class", "prob_ai", "error")})
        out = out.merge(part, on="filename", how="left", validate="one_to_one")
    return out


def combine(frames: Sequence[pd.DataFrame], method: str = "vote", names: Sequence[str] | None = None) -> pd.DataFrame:
    """The ensemble verdict per aligned filename (see the module docstring for the rules)."""
    if method not in METHODS:
        raise DataError(f"unknown ensemble method {method!r}: use one of {', '.join(METHODS)}")
    if len(frames) < 2:
        raise DataError(f"an ensemble needs at least 2 prediction CSVs, got {len(frames)}")
    names = list(names or [f"input {k + 1}" for k in range(len(frames))])
    joined = align(frames, names)
    k = len(frames)
    probs = np.column_stack([joined[f"prob_ai_{i}"].to_numpy(dtype=float) for i in range(k)])
    classes = np.column_stack([joined[f"class_{i}"].to_numpy(dtype=object) for i in range(k)])
    errors = [
        "; ".join(f"{names[i]}: {row[f'error_{i}']}" for i in range(k) if row[f"error_{i}"])
        for _, row in joined.iterrows()
    ]
    failed = np.array([bool(e) for e in errors])
    votes_ai = (classes == "ai").sum(axis=1)
    votes_real = (classes == "real").sum(axis=1)
    mean_prob = probs.mean(axis=1)
    if method == "mean":
        is_ai = mean_prob >= 0.5
    else:
        is_ai = np.where(votes_ai != votes_real, votes_ai > votes_real, mean_prob >= 0.5)
    out = pd.DataFrame(
        {
            "filename": joined["filename"],
            "class": np.where(failed, "", np.where(is_ai, "ai", "real")),
            "prob_ai": np.where(failed, np.nan, np.round(mean_prob, 6)),
            "votes_ai": np.where(failed, 0, votes_ai).astype(int),
            "votes_real": np.where(failed, 0, votes_real).astype(int),
            "error": errors,
        }
    )
    return out[OUTPUT]


def ensemble_files(paths: Sequence[str | Path], out: str | Path, method: str = "vote") -> dict:
    """Read, combine and write; returns a JSON-able summary."""
    frames = [read_predictions(p) for p in paths]
    result = combine(frames, method, names=[str(p) for p in paths])
    write_atomic(out, safe_frame(result).to_csv(index=False))
    ok = result["error"] == ""
    return {
        "out": str(out),
        "method": method,
        "inputs": [str(p) for p in paths],
        "rows_per_input": [len(f) for f in frames],
        "rows": int(len(result)),
        "errors": int((~ok).sum()),
        "per_class": {c: int((result["class"] == c).sum()) for c in CLASSES},
    }

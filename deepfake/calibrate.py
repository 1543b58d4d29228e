"""`deepfake calibrate`: fit a model folder's trust settings on its own data and store them in the folder.

On the model's training data, split exactly as in training (its metadata's split settings):
- the temperature (minimum NLL on the validation part), the operating points at FPR 1% and 5% and the
  equal-error point (on calibrated P(ai), validation part), the uncertainty band;
- the out-of-domain guard (deepfake.guard): class statistics from up to `fit_images` training images, its
  standardisation and threshold from the validation part, the size envelope from both.
Then the test part, which none of this saw, measures what the fitted settings do (ECE, flagged fraction).
Everything lands in the folder: `guard.safetensors` and the metadata's "trust" key, then the card.
"""

from __future__ import annotations

import io
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from deepfake import checkpoint as ck
from deepfake.calibration import (
    DEFAULT_BAND,
    DEFAULT_FPRS,
    CalibrationError,
    fit_temperature,
    nll,
    operating_points,
    softmax,
)
from deepfake.data import SAMPLE_DIR, DataError, scan, split_samples
from deepfake.evaluate import RefOutputs, _Reader, data_settings, infer_refs
from deepfake.guard import DEFAULT_TAPS, GUARD_FILE, MIN_PER_CLASS, N_LOWLEVEL, DomainGuard, GuardError, fit_guard
from deepfake.labels import CLASSES
from deepfake.metrics import brier, expected_calibration_error

log = logging.getLogger(__name__)

DEFAULT_FIT_IMAGES = 10_000


def _subsample(df, n: int | None, seed: int = 0):
    """At most n rows, the same share of each label, chosen reproducibly."""
    if n is None or len(df) <= n:
        return df
    frac = n / len(df)
    return df.groupby("label", group_keys=False).sample(frac=frac, random_state=seed).sort_values("ref")


def envelope_size(df, read: _Reader, sample: int = 200) -> int:
    """The side of the low-level statistics' view: the median short side of (a sample of) the training images,
    rounded down to a multiple of 8 (JPEG's block), at least 8 and at most 256."""
    from PIL import Image

    refs = df["ref"].tolist()[:: max(1, len(df) // sample)][:sample]
    sides = []
    for r in refs:
        try:
            sides.append(min(Image.open(io.BytesIO(read(r))).size))
        except Exception:  # noqa: BLE001 - an unreadable file is skipped here as everywhere
            continue
    side = int(np.median(sides)) if sides else 32
    return int(min(256, max(8, side // 8 * 8)))


def _labels_idx(labels: list[str]) -> np.ndarray:
    return np.array([CLASSES.index(label) for label in labels])


def _ok(out: RefOutputs, labels: list[str], what: str) -> tuple[RefOutputs, list[str]]:
    ok = out.ok
    if not ok.all():
        log.warning("%s: %d images failed to decode and are left out", what, int((~ok).sum()))
    keep = np.flatnonzero(ok)
    return (
        RefOutputs(out.logits[keep], None if out.feats is None else out.feats[keep], [out.sizes[i] for i in keep], []),
        [labels[i] for i in keep],
    )


def calibrate(
    model_dir: str | Path,
    data: str | Path | None = None,
    fit_images: int | None = DEFAULT_FIT_IMAGES,
    band: tuple[float, float] = DEFAULT_BAND,
    fprs: tuple[float, ...] = DEFAULT_FPRS,
    taps: tuple[int, ...] | None = DEFAULT_TAPS,
    quantile: float = 0.99,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    allow_outside: bool = False,
) -> dict[str, Any]:
    """Fit and store the folder's trust settings; returns what was stored plus the test-part measurement.
    `taps=None` fits the guard on the low-level statistics alone (no deep features): for cifake-b0-cpu (32 px
    input) they only diluted it, 80% against 100% of real photos at 32 px flagged (bench/ood_guard.py)."""
    from deepfake.inference import Predictor

    if not 0 <= band[0] <= band[1] <= 1:
        raise CalibrationError(f"band {band}: need 0 <= lo <= hi <= 1")
    d = ck.resolve_model_dir(str(model_dir))
    model, meta = ck.load_model(d)
    settings = data_settings(meta)
    source = str(data) if data is not None else (settings["path"] or str(SAMPLE_DIR))
    catalog = scan(source, keep_blobs=True, progress=progress, allow_outside=allow_outside)
    if catalog.samples["label"].nunique() < 2:
        raise CalibrationError(
            f"{source}: calibration needs images of both classes (found {catalog.samples['label'].unique().tolist()})"
        )
    parts = split_samples(
        catalog.samples, settings["val_ratio"], settings["test_ratio"], settings["seed"], settings["max_per_class"]
    )
    val = parts[parts["split"] == "val"]
    if val["label"].nunique() < 2:
        raise CalibrationError(f"{source}: the validation part has {len(val)} images of one class; need both")
    train = _subsample(parts[parts["split"] == "train"], fit_images)
    test = parts[parts["split"] == "test"]
    counts = train["label"].value_counts()
    if counts.min() < MIN_PER_CLASS or len(counts) < 2 or len(val) < 2 * MIN_PER_CLASS:
        raise GuardError(  # checked before any inference: a small run learns this in a second
            f"too few images to fit the guard's covariance: {counts.to_dict()} training images and {len(val)} "
            f"validation images (need >= {MIN_PER_CLASS} per class and >= {2 * MIN_PER_CLASS} held out)"
        )
    read = _Reader(catalog.blobs)
    fresh = {k: v for k, v in meta.items() if k != "trust"}  # the raw model: temperature 1, no guard
    low_size = envelope_size(train, read)
    predictor = Predictor(model, fresh, device=device, jit=True, taps=taps, lowlevel_size=low_size)

    def run(df, what):
        out = infer_refs(predictor, df["ref"].tolist(), read, batch_size=batch_size, progress=progress, desc=what)
        return _ok(out, df["label"].tolist(), what)

    v_out, v_labels = run(val, "validation part")
    y_val = _labels_idx(v_labels)
    t = fit_temperature(v_out.logits, y_val)
    ai = CLASSES.index("ai")
    p_val = softmax(v_out.logits, t)[:, ai]
    raw_val = softmax(v_out.logits)[:, ai]
    yb = (y_val == ai).astype(int)
    ops = operating_points(yb, p_val, fprs)

    f_out, f_labels = run(train, "training images (guard)")
    group_sizes = (predictor.net.group_sizes() if taps is not None else []) + [N_LOWLEVEL]
    guard = fit_guard(
        f_out.feats,
        _labels_idx(f_labels),
        v_out.feats,
        f_out.sizes + v_out.sizes,
        taps,
        group_sizes,
        low_size,
        quantile,
    )

    trust: dict[str, Any] = {
        "temperature": t,
        "band": [float(band[0]), float(band[1])],
        "operating_points": ops,
        "calibration": {
            "val before": {
                "nll": nll(v_out.logits, y_val),
                "ece": expected_calibration_error(yb, raw_val),
                "brier": brier(yb, raw_val),
            },
            "val after": {
                "nll": nll(v_out.logits, y_val, t),
                "ece": expected_calibration_error(yb, p_val),
                "brier": brier(yb, p_val),
            },
        },
        "fitted": {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "data": source,
            "split": "val",
            "val_images": len(v_labels),
            "fit_images": len(f_labels),
        },
    }
    in_val, _, _ = guard.check(v_out.feats, v_out.sizes)
    measured = {"val flagged": f"{(~in_val).mean():.2%} of {len(in_val)}"}
    if len(test) and test["label"].nunique() == 2:
        t_out, t_labels = run(test, "test part (measurement)")
        yt = (_labels_idx(t_labels) == ai).astype(int)
        pt, rt = softmax(t_out.logits, t)[:, ai], softmax(t_out.logits)[:, ai]
        trust["calibration"]["test before"] = {
            "nll": nll(t_out.logits, _labels_idx(t_labels)),
            "ece": expected_calibration_error(yt, rt),
            "brier": brier(yt, rt),
        }
        trust["calibration"]["test after"] = {
            "nll": nll(t_out.logits, _labels_idx(t_labels), t),
            "ece": expected_calibration_error(yt, pt),
            "brier": brier(yt, pt),
        }
        in_test, _, _ = guard.check(t_out.feats, t_out.sizes)
        measured["test flagged (never fitted on)"] = f"{(~in_test).mean():.2%} of {len(in_test)}"
    guard.info["measured"] = measured
    trust["guard"] = guard.save(d)
    meta["trust"] = trust
    ck.write_metadata(d, meta)
    log.info("calibrated %s: T=%.3f, guard threshold %.3f, %s", d, t, guard.threshold, measured)
    return {"model": str(d), **trust}


def ood_parts(samples) -> dict[str, list[str]]:
    """Out-of-domain examples split in two halves by content hash (per label, so both kinds of image are in
    each half): "fit" for outlier exposure, "measure" never seen by the guard, and "all"."""
    parts = split_samples(samples, val_ratio=0.5, test_ratio=0.0, seed=0)
    return {
        "fit": parts[parts["split"] == "train"]["ref"].tolist(),
        "measure": parts[parts["split"] == "val"]["ref"].tolist(),
        "all": parts["ref"].tolist(),
    }


def remove(model_dir: str | Path) -> None:
    """Drop a folder's trust settings (the guard file too); answers then say in_domain: null."""
    d = Path(model_dir)
    meta = ck.read_metadata(d)
    meta.pop("trust", None)
    ck.write_metadata(d, meta)
    (d / GUARD_FILE).unlink(missing_ok=True)


__all__ = ["calibrate", "remove", "DomainGuard", "DataError"]

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


def _parts(settings: dict[str, Any], data: str | Path | None, progress: bool, allow_outside: bool):
    """The data (the model's own unless `data` is given) scanned and split as in training;
    both classes must be there, in the validation part too. Returns (source, catalog, parts)."""
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
    return source, catalog, parts


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
    source, catalog, parts = _parts(data_settings(meta), data, progress, allow_outside)
    val = parts[parts["split"] == "val"]
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


def calibrate_ensemble(
    model_dir: str | Path,
    data: str | Path | None = None,
    band: tuple[float, float] = DEFAULT_BAND,
    fprs: tuple[float, ...] = DEFAULT_FPRS,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    allow_outside: bool = False,
) -> dict[str, Any]:
    """An ensemble folder's own trust settings: operating points and band on the mean of its members'
    calibrated P(ai) over the validation part they share (members split with other settings are refused:
    one's validation images could be another's training images), measured on the test part. Each member
    keeps its own temperature and guard; the ensemble flags an image when any member's guard does."""
    from deepfake.evaluate import _common_settings, score_refs
    from deepfake.inference import load_scorer

    if not 0 <= band[0] <= band[1] <= 1:
        raise CalibrationError(f"band {band}: need 0 <= lo <= hi <= 1")
    d = ck.resolve_model_dir(str(model_dir))
    spec = ck.read_ensemble(d)
    metas = [ck.read_metadata(m) for m in spec["member_dirs"]]
    settings = _common_settings(metas, "val")
    if any(not m.get("trust") for m in metas):
        raise CalibrationError(f"{d}: calibrate every member first (deepfake calibrate --model MEMBER)")
    source, catalog, parts = _parts(settings, data, progress, allow_outside)
    scorer = load_scorer(d, device=device, jit=True)
    read = _Reader(catalog.blobs)
    ai = CLASSES.index("ai")

    def run(split: str):
        df = parts[parts["split"] == split]
        per = [
            score_refs(m, df["ref"].tolist(), read, batch_size=batch_size, progress=progress, desc=f"{split} {k}")
            for k, m in enumerate(scorer.members, 1)
        ]
        s = scorer.combine(per)
        ok = np.array([not e for e in s.errors])
        y = (_labels_idx(df["label"].tolist())[ok] == ai).astype(int)
        return y, s.prob_ai[ok], s.prob_ai_raw[ok], [s.in_domain[i] for i in np.flatnonzero(ok)]

    y_val, p_val, raw_val, dom_val = run("val")
    if len(set(y_val.tolist())) < 2:
        raise CalibrationError(f"{source}: the validation part needs images of both classes")
    trust: dict[str, Any] = {
        "band": [float(band[0]), float(band[1])],
        "operating_points": operating_points(y_val, p_val, fprs),
        "calibration": {
            "val, mean of raw P(ai)": {
                "ece": expected_calibration_error(y_val, raw_val),
                "brier": brier(y_val, raw_val),
            },
            "val, mean of calibrated P(ai)": {
                "ece": expected_calibration_error(y_val, p_val),
                "brier": brier(y_val, p_val),
            },
        },
        "fitted": {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "data": source,
            "split": "val",
            "val_images": len(y_val),
            "fit_images": "none (each member's guard keeps its own statistics)",
        },
        "guard_rule": "an image is in domain only where every member's guard says so (each member's own guard, "
        "fitted by `deepfake calibrate` on that member)",
        "guard_measured": {"val flagged": f"{np.mean([d is False for d in dom_val]):.2%} of {len(dom_val)}"},
    }
    test = parts[parts["split"] == "test"]
    if len(test) and test["label"].nunique() == 2:
        y_t, p_t, raw_t, dom_t = run("test")
        trust["calibration"]["test, mean of raw P(ai)"] = {
            "ece": expected_calibration_error(y_t, raw_t),
            "brier": brier(y_t, raw_t),
        }
        trust["calibration"]["test, mean of calibrated P(ai)"] = {
            "ece": expected_calibration_error(y_t, p_t),
            "brier": brier(y_t, p_t),
        }
        trust["guard_measured"]["test flagged (never fitted on)"] = (
            f"{np.mean([d is False for d in dom_t]):.2%} of {len(dom_t)}"
        )
    spec["trust"] = trust
    ck.write_ensemble(d, spec)
    log.info("calibrated ensemble %s: %s", d, {k: v["threshold"] for k, v in trust["operating_points"].items()})
    return {"model": str(d), **trust}


def make_ensemble(
    out: str | Path, members: list[str | Path], overwrite: bool = False, calibrate: bool = True, **kw: Any
) -> dict[str, Any]:
    """Write an ensemble folder at `out` naming `members` (model folders), measure its cost per image on this
    machine and, by default, fit its own operating points (`calibrate_ensemble`, keyword arguments to it)."""
    from deepfake.files import is_occupied
    from deepfake.inference import load_scorer, throughput

    if len(members) < 2:
        raise CalibrationError(f"an ensemble needs at least 2 member folders, got {len(members)}")
    if is_occupied(out) and not overwrite:
        raise ck.CheckpointError(f"{out} exists; pass --overwrite to replace it")
    dirs = [ck.resolve_model_dir(str(m)) for m in members]
    if any(ck.is_ensemble(m) for m in dirs):
        raise ck.CheckpointError("a member is itself an ensemble; name its members instead")
    ck.write_ensemble(out, ck.ensemble_spec(out, dirs), new=True)
    t = throughput(load_scorer(out, device="cpu", jit=True))
    spec = ck.read_ensemble(out)
    spec["cost"] = (
        f"{t['images_per_s']:.0f} images/s in one process ({t['ms_per_image']:.2f} ms per image, batches of "
        f"{t['batch_size']}, {t['threads']} torch threads on {ck.host_info()}): every member runs on every image"
    )
    ck.write_ensemble(out, spec)
    if calibrate:
        return calibrate_ensemble(out, **kw)
    return {"model": str(out), "members": spec["members"], "cost": spec["cost"]}


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

"""Evaluate one model folder, or an ensemble of them (mean P(ai)), on a labelled dataset.

The dataset is scanned and split with the data settings the model was trained with (its metadata
`config.data`: seed, val_ratio, test_ratio, max_per_class), so `split="val"` is exactly the training run's
validation part and `split="test"` the part it never saw; `split="all"` scores every usable image.
Inference goes through `deepfake.inference.Predictor` (the one path shared with predict and serve), batched
by a DataLoader over images decoded by `deepfake.images.decode_image`.

Robustness sweep: the same metrics after a perturbation of the decoded image, applied before the model's
own transform: JPEG re-compression at quality 90/75/50, a 0.5x downscale (bicubic, down only: the model's
resize then brings it back to its input size, so this is down-then-up with the model's interpolation) and
a Gaussian blur of radius 1 px.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from deepfake import checkpoint as ck
from deepfake.calibration import coverage_table, operating_points
from deepfake.config import DataConfig
from deepfake.data import SAMPLE_DIR, DataError, read_ref, scan, split_samples
from deepfake.files import safe_frame, write_atomic
from deepfake.guard import N_LOWLEVEL, lowlevel_images
from deepfake.images import BadImage, decode_image, original_size
from deepfake.inference import BatchScores, join_features, load_scorer, scorer_info
from deepfake.metrics import (
    brier,
    compute_metrics,
    expected_calibration_error,
    plot_reliability,
    to_binary,
    write_plots,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
SPLIT_KEYS = ("seed", "val_ratio", "test_ratio", "max_per_class")  # what decides which image lands where


# ---------------------------------------------------------------------------------------------- perturbations
def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def apply(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return decode_image(buf.getvalue())  # every decode goes through the safe decoder

    return apply


def _downscale(factor: float) -> Callable[[Image.Image], Image.Image]:
    def apply(img: Image.Image) -> Image.Image:
        size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
        return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)

    return apply


def _blur(radius: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: img.filter(ImageFilter.GaussianBlur(radius=radius))


CONDITIONS: dict[str, Callable[[Image.Image], Image.Image] | None] = {
    "clean": None,
    "jpeg_q90": _jpeg(90),
    "jpeg_q75": _jpeg(75),
    "jpeg_q50": _jpeg(50),
    "downscale_0.5x": _downscale(0.5),
    "blur_r1": _blur(1.0),
}


# ---------------------------------------------------------------------------------------------- data
def data_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The split-deciding data settings a model was trained with (defaults where its metadata has none)."""
    saved = (meta.get("config") or {}).get("data")
    defaults = DataConfig()
    if not saved:
        log.warning("model metadata has no data config; using the default split settings")
        saved = {}
    out = {k: saved.get(k, getattr(defaults, k)) for k in SPLIT_KEYS}
    out["path"] = saved.get("path")
    return out


def _common_settings(metas: Sequence[dict[str, Any]], split: str) -> dict[str, Any]:
    settings = [data_settings(m) for m in metas]
    first = {k: settings[0][k] for k in SPLIT_KEYS}
    for i, s in enumerate(settings[1:], start=2):
        other = {k: s[k] for k in SPLIT_KEYS}
        if other != first and split != "all":
            raise DataError(
                f"model {i} was trained with other split settings ({other}) than model 1 ({first}): its "
                f"{split!r} part is not the same images, and may hold images the other saw in training; "
                "evaluate with --split all on held-out data instead"
            )
    return {**first, "path": settings[0]["path"]}


class _Reader:
    """Bytes by ref: archive members kept from the scan (one pass over the archive), files read on demand."""

    def __init__(self, blobs: dict[str, bytes]):
        self.blobs = blobs

    def __call__(self, ref: str) -> bytes:
        data = self.blobs.get(ref)
        return data if data is not None else read_ref(ref)


class _EvalImages(Dataset):
    """(tensor, index, original width, height, error) per ref; a file that no longer decodes gives an error
    text instead of killing the batch."""

    def __init__(
        self,
        refs: list[str],
        read: _Reader,
        transform: Callable,
        size: int,
        condition: str = "clean",
        lowlevel_size: int | None = None,
    ):
        self.refs, self.read, self.transform, self.size, self.condition = refs, read, transform, size, condition
        self.lowlevel_size = lowlevel_size

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        n_low = N_LOWLEVEL if self.lowlevel_size else 0
        try:
            img = decode_image(self.read(self.refs[i]))
            perturb = CONDITIONS[self.condition]
            if perturb is not None:
                img = perturb(img)
            low = lowlevel_images([img], self.lowlevel_size)[0] if n_low else np.zeros(0, np.float32)
            w, h = original_size(img)
            return self.transform(img), i, w, h, low, ""
        except (BadImage, OSError, KeyError) as e:
            err = f"{type(e).__name__}: {e}"[:200]
            return torch.zeros(3, self.size, self.size), i, 0, 0, np.zeros(n_low, np.float32), err


@dataclass
class RefOutputs:
    """A model's raw outputs over a list of refs: logits (N, C) and tapped features (N, D) (NaN where the
    file failed), the original (width, height) after any perturbation, and the error text ('' when fine)."""

    logits: np.ndarray
    feats: np.ndarray | None
    sizes: list[tuple[int, int]]
    errors: list[str]

    @property
    def ok(self) -> np.ndarray:
        return np.array([not e for e in self.errors], dtype=bool)


def infer_refs(
    predictor,
    refs: list[str],
    read: _Reader,
    condition: str = "clean",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    desc: str | None = None,
) -> RefOutputs:
    """One batched pass of `predictor` over `refs` (decoded, perturbed by `condition`, transformed)."""
    ds = _EvalImages(refs, read, predictor.transform, predictor.image_size, condition, predictor.lowlevel_size)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    logits = np.full((len(refs), len(predictor.classes)), np.nan, dtype=np.float32)
    feats = None
    sizes = [(0, 0)] * len(refs)
    errors = [""] * len(refs)
    with tqdm(total=len(refs), unit="img", desc=desc or condition, disable=not progress, mininterval=2) as bar:
        for x, idx, w, h, low, errs in loader:
            idx = idx.numpy()
            lg, ft = predictor.forward_batch(predictor.place(x))
            ft = join_features(ft, low.numpy() if low.shape[1] else None)
            if ft is not None and feats is None:
                feats = np.full((len(refs), ft.shape[1]), np.nan, dtype=np.float32)
            for j, (i, err) in enumerate(zip(idx, errs)):
                if err:
                    errors[i] = err
                    continue
                logits[i] = lg[j]
                if ft is not None:
                    feats[i] = ft[j]
                sizes[i] = (int(w[j]), int(h[j]))
            bar.update(len(idx))
    return RefOutputs(logits, feats, sizes, errors)


def score_refs(predictor, refs: list[str], read: _Reader, condition: str = "clean", **kw) -> BatchScores:
    """Per ref: calibrated and raw P(ai) (NaN where the file failed), the guard's answer, the error text."""
    out = infer_refs(predictor, refs, read, condition, **kw)
    ok = out.ok
    prob, raw = np.full(len(refs), np.nan), np.full(len(refs), np.nan)
    dom: list[bool | None] = [None] * len(refs)
    score: list[float | None] = [None] * len(refs)
    reasons = [""] * len(refs)
    if ok.any():
        s = predictor.scores(
            out.logits[ok], None if out.feats is None else out.feats[ok], [out.sizes[i] for i in np.flatnonzero(ok)]
        )
        prob[ok], raw[ok] = s.prob_ai, s.prob_ai_raw
        for i, d, sc, why in zip(np.flatnonzero(ok), s.in_domain, s.domain_score, s.reasons):
            dom[i], score[i], reasons[i] = d, sc, why
    return BatchScores(prob, raw, dom, score, reasons, out.errors)


# ---------------------------------------------------------------------------------------------- evaluation
def _select(samples: pd.DataFrame, settings: dict[str, Any], split: str) -> pd.DataFrame:
    if split == "all":
        return samples[["ref", "label"]].reset_index(drop=True)
    parts = split_samples(
        samples, settings["val_ratio"], settings["test_ratio"], settings["seed"], settings["max_per_class"]
    )
    out = parts[parts["split"] == split][["ref", "label"]].reset_index(drop=True)
    if out.empty:
        raise DataError(f"the {split!r} part is empty with the model's split settings {settings}")
    return out


def _robustness_markdown(table: dict[str, dict[str, Any]]) -> str:
    def fmt(v: Any, pct: bool = False) -> str:
        if v is None:
            return "n/a"
        return f"{100 * v:.2f}%" if pct else f"{v:.4f}"

    lines = [
        "| condition | n | accuracy | Δ accuracy | ROC-AUC | F1 macro | ECE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cond, r in table.items():
        delta = f"{100 * r['accuracy_delta']:+.2f} pt" if r.get("accuracy_delta") is not None else "n/a"
        lines.append(
            f"| {cond} | {r['n']} | {fmt(r['accuracy'], True)} | {delta} | {fmt(r['roc_auc'])} | "
            f"{fmt(r['f1_macro'])} | {fmt(r['ece'])} |"
        )
    return "\n".join(lines) + "\n"


def evaluate(
    model_dirs: str | Path | Sequence[str | Path],
    data: str | Path | None = None,
    split: str = "val",
    robustness: bool = False,
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 0,
    threshold: float | str | None = None,
    n_bootstrap: int = 1000,
    progress: bool = False,
    allow_outside: bool = False,
) -> dict[str, Any]:
    """Metrics of a model (or the mean-probability ensemble of several) on `split` of `data` (default: the
    data the first model was trained on). Writes metrics.json, predictions.csv and the plots to `out_dir`
    (and robustness.csv/.md with `robustness=True`); returns the same summary as metrics.json."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    dirs = [Path(model_dirs)] if isinstance(model_dirs, (str, Path)) else [Path(d) for d in model_dirs]
    if not dirs:
        raise ck.CheckpointError("no model folder given")
    metas = scorer_info(dirs)["metas"]  # a missing or foreign folder fails here, before any scan
    settings = _common_settings(metas, split)
    source = str(data) if data is not None else (settings["path"] or str(SAMPLE_DIR))
    catalog = scan(source, keep_blobs=True, progress=progress, allow_outside=allow_outside)
    chosen = _select(catalog.samples, settings, split)
    refs, labels = chosen["ref"].tolist(), chosen["label"].tolist()
    read = _Reader(catalog.blobs)
    scorer = load_scorer(dirs, device=device, jit=True, operating_point=threshold)  # traced on CPU: faster
    predictors = scorer.members
    op = scorer.op
    log.info("evaluating %s on %d images (%s part of %s)", scorer.version, len(refs), split, source)

    conditions = list(CONDITIONS) if robustness else ["clean"]
    per_condition: dict[str, BatchScores] = {}
    members: list[BatchScores] = []
    for k, cond in enumerate(conditions, 1):
        per_model = [
            score_refs(
                pred,
                refs,
                read,
                cond,
                batch_size=batch_size,
                num_workers=num_workers,
                progress=progress,
                desc=f"{cond} ({k}/{len(conditions)})"
                + (f" model {m}/{len(predictors)}" if len(predictors) > 1 else ""),
            )
            for m, pred in enumerate(predictors, 1)
        ]
        per_condition[cond] = scorer.combine(per_model)
        members = members or per_model  # the clean condition's, for the per-model columns

    clean = per_condition["clean"]
    ok = np.array([not e for e in clean.errors])
    if not ok.any():
        raise DataError(f"none of the {len(refs)} selected images could be decoded at evaluation time")
    y_ok = [label for label, good in zip(labels, ok) if good]
    metrics = compute_metrics(y_ok, clean.prob_ai[ok], threshold=op.threshold, n_bootstrap=n_bootstrap)
    metrics["operating_point"] = op.name
    trust = trust_report(scorer, y_ok, clean, ok, op.threshold)

    failed = [e for e in clean.errors if e]
    skipped = {
        "count": int(len(catalog.skipped) + len(failed)),
        "at_scan": int(len(catalog.skipped)),
        "at_scan_by_reason": {k: int(v) for k, v in sorted(Counter(catalog.skipped["reason"]).items())},
        "at_evaluation": len(failed),
        "note": "files skipped at scan time have no content hash, so no split: they are counted for the whole dataset",
    }
    result: dict[str, Any] = {
        "models": [{"path": p.meta.get("path"), "version": p.version} for p in predictors],
        "model": scorer.version,
        "combine": "mean calibrated prob_ai" if len(predictors) > 1 else None,
        "data": source,
        "layout": catalog.layout,
        "split": split,
        "split_settings": {k: settings[k] for k in SPLIT_KEYS},
        "trained_on": settings["path"] or str(SAMPLE_DIR),
        "n": int(ok.sum()),
        "n_selected": len(refs),
        "skipped": skipped,
        "metrics": metrics,
        **trust,
    }

    if robustness:
        table: dict[str, dict[str, Any]] = {}
        for cond, sc in per_condition.items():
            good = np.array([not e for e in sc.errors])
            y_good = [label for label, g in zip(labels, good) if g]
            m = compute_metrics(y_good, sc.prob_ai[good], threshold=op.threshold, n_bootstrap=0)
            table[cond] = {k: m[k] for k in ("n", "accuracy", "roc_auc", "f1_macro", "ece")}
            table[cond]["accuracy_delta"] = m["accuracy"] - metrics["accuracy"]
            cov = coverage_table(to_binary(y_good), sc.prob_ai[good], _domain(sc, good), op.threshold, scorer.band)
            table[cond].update({"coverage": cov["coverage"], "accuracy_answered": cov["accuracy_answered"]})
        result["robustness"] = table

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["files"] = _write_outputs(out, result, refs, labels, clean, scorer, members)
        result["files"].update(write_plots(y_ok, clean.prob_ai[ok], out, metrics))
        result["files"]["reliability_uncalibrated"] = str(
            plot_reliability(
                y_ok, clean.prob_ai_raw[ok], out / "reliability_uncalibrated.png", title="Before calibration"
            )
        )
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _domain(sc: BatchScores, good: np.ndarray) -> list[bool | None]:
    return [d for d, g in zip(sc.in_domain, good) if g]


def trust_report(scorer, y_ok: list[str], clean: BatchScores, ok: np.ndarray, threshold: float) -> dict[str, Any]:
    """Calibration before/after, operating points on this data, coverage and the guard's flag rate."""
    y = to_binary(y_ok)
    p, raw = clean.prob_ai[ok], clean.prob_ai_raw[ok]
    dom = _domain(clean, ok)
    both = len(set(y.tolist())) == 2
    out: dict[str, Any] = {
        "calibration": {
            "temperature": [pr.temperature for pr in scorer.members],
            "before": {"ece": expected_calibration_error(y, raw), "brier": brier(y, raw)},
            "after": {"ece": expected_calibration_error(y, p), "brier": brier(y, p)},
        },
        "operating_points": operating_points(y, p) if both else None,
        "coverage": coverage_table(y, p, dom, threshold, scorer.band),
    }
    if all(d is not None for d in dom):
        flagged = np.array([not d for d in dom])
        out["guard"] = {"flagged": int(flagged.sum()), "flagged_fraction": float(flagged.mean())}
    else:
        out["guard"] = None
    return out


def _write_outputs(out, result, refs, labels, clean: BatchScores, scorer, members: list[BatchScores]) -> dict[str, str]:
    answers = [
        scorer.answer(p, r, d, sc) if not e else {}
        for p, r, d, sc, e in zip(clean.prob_ai, clean.prob_ai_raw, clean.in_domain, clean.domain_score, clean.errors)
    ]
    preds = pd.DataFrame(
        {
            "filename": refs,
            "label": labels,
            "class": [a.get("label", "") for a in answers],
            "verdict": [a.get("verdict", "") for a in answers],
            "prob_ai": [a.get("prob_ai") for a in answers],
            "prob_ai_raw": [a.get("prob_ai_raw") for a in answers],
            "in_domain": [a.get("in_domain") for a in answers],
            "domain_score": [a.get("domain_score") for a in answers],
            "model": scorer.version,
            "error": clean.errors,
        }
    )
    if len(members) > 1:
        for k, m in enumerate(members):
            preds[f"prob_ai_{k + 1}"] = [None if e else float(p) for p, e in zip(m.prob_ai, clean.errors)]
    files = {"metrics": str(out / "metrics.json"), "predictions": str(out / "predictions.csv")}
    write_atomic(out / "predictions.csv", safe_frame(preds).to_csv(index=False))
    if "robustness" in result:
        table = pd.DataFrame.from_dict(result["robustness"], orient="index").rename_axis("condition")
        table.to_csv(out / "robustness.csv")
        (out / "robustness.md").write_text(_robustness_markdown(result["robustness"]))
        files.update({"robustness_csv": str(out / "robustness.csv"), "robustness_md": str(out / "robustness.md")})
    return files


# ---------------------------------------------------------------------------------------------- model card
def update_card(
    model_dir: str | Path, metrics: dict[str, Any], robustness: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Record an evaluation in a model folder: the full result under metadata "evaluation", headline figures
    (prefixed with the split) in "metrics", accuracy per condition in "robustness"; then regenerate the card.
    `metrics` is what `evaluate` returned (or a bare `compute_metrics` dict). config.json keeps every other
    field as it was. Returns the new metadata."""
    d = Path(model_dir)
    ensemble = ck.is_ensemble(d)
    meta = ck.read_ensemble(d) if ensemble else ck.read_metadata(d)
    result = metrics if isinstance(metrics.get("metrics"), dict) else {"metrics": metrics}
    n_models = len(result.get("models", [])) or (len(meta["members"]) if ensemble else 1)
    if n_models != (len(meta["members"]) if ensemble else 1):
        raise ck.CheckpointError(
            f"these metrics are of {n_models} model(s) (an ensemble's): they do not belong on {d}'s card"
        )
    m = result["metrics"]
    robustness = robustness if robustness is not None else result.get("robustness")
    split = result.get("split", "eval")
    prefix = f"{split}_"

    def r4(v: Any) -> Any:
        return round(float(v), 4) if isinstance(v, float) else v

    flat = {
        "accuracy": m["accuracy"],
        "accuracy_ci95_low": m["accuracy_ci"][0] if m.get("ci_level") == 0.95 else None,
        "accuracy_ci95_high": m["accuracy_ci"][1] if m.get("ci_level") == 0.95 else None,
        "roc_auc": m.get("roc_auc"),
        "roc_auc_ci95_low": (m.get("roc_auc_ci") or [None])[0] if m.get("ci_level") == 0.95 else None,
        "roc_auc_ci95_high": (m.get("roc_auc_ci") or [None, None])[1] if m.get("ci_level") == 0.95 else None,
        "average_precision": m.get("average_precision"),
        "f1_macro": m.get("f1_macro"),
        "ece": m.get("ece"),
        "images": m["n"],
    }
    meta.setdefault("metrics", {})
    meta["metrics"].update({prefix + k: r4(v) for k, v in flat.items() if v is not None})
    evaluation = {k: v for k, v in result.items() if k not in ("files",)}
    if robustness:
        evaluation["robustness"] = robustness
        meta["robustness"] = {cond: r4(row["accuracy"]) for cond, row in robustness.items()}
    meta.setdefault("evaluations", {})[split] = evaluation
    if split != "val" and (meta.get("limitations") is None or meta.get("limitations_generated")):
        where = f"`{result['data']}`" if result.get("data") else "the data named above"
        part = "every usable image" if split == "all" else f"the {split} part, split as in training"
        meta["limitations"] = (
            f"Metrics prefixed `{prefix}` were measured on {m['n']} images ({part}) of {where}; the "
            "others on the training run's validation part. Not evidence about images from other sources, sizes "
            "or generators."
        )
        meta["limitations_generated"] = True

    ck.write_ensemble(d, meta) if ensemble else ck.write_metadata(d, meta)
    log.info("recorded the %s evaluation in %s", split, d)
    return meta

"""How far a probability can be trusted: temperature scaling, operating points and the verdict rule.

Pure functions (numpy, scipy, scikit-learn; no torch, no Ray), shared by `calibrate` (which fits them on a
model's validation part), `Predictor` (which applies them to every answer), `evaluate` and the server.

- Temperature scaling (Guo et al., ICML 2017): one scalar T divides the logits, fitted by minimising the
  negative log-likelihood on held-out data. It never changes the ranking, so accuracy and ROC-AUC stay;
  only the confidence moves to match the observed frequencies.
- Operating points: the threshold on calibrated P(ai) that flags a chosen fraction of real images (the
  false-positive rate, FPR, measured on real images), with the detection rate it gives, and the equal-error
  point, where the FPR equals the miss rate.
- The verdict: `ai`, `real` or `uncertain`. `uncertain` when the input is out of domain, or when P(ai) lies
  inside the uncertainty band [lo, hi] widened to contain the operating threshold: "real" needs
  P(ai) < min(lo, t), "ai" needs P(ai) >= max(hi, t). So an operating point at FPR 1% never yields more
  than 1% "ai" verdicts on in-domain real images, and a threshold outside the band cannot turn a coin flip
  into a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.metrics import roc_curve

VERDICTS = ("ai", "real", "uncertain")
DEFAULT_BAND = (0.2, 0.8)  # calibrated P(ai) in this band: the model is wrong often enough to say so
DEFAULT_FPRS = (0.01, 0.05)


class CalibrationError(ValueError):
    """Data or a setting that cannot give a calibration; the message says why."""


# ---------------------------------------------------------------------------------------------- temperature
def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of class indices `y` under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return float(-log_softmax(z, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 that minimises the NLL of `y` (class indices) under softmax(logits / T).

    A 1-D bounded search over log T (the NLL is smooth and unimodal in it); T in [0.05, 20]."""
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(y) or len(y) == 0:
        raise CalibrationError(f"need logits (N, C) and N labels, got {logits.shape} and {len(y)}")
    if len(np.unique(y)) < 2:
        raise CalibrationError("temperature scaling needs both classes in the data")
    res = minimize_scalar(
        lambda s: nll(logits, y, math.exp(s)), bounds=(math.log(0.05), math.log(20)), method="bounded"
    )
    return float(math.exp(res.x))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


# ---------------------------------------------------------------------------------------------- operating points
def threshold_at_fpr(y: np.ndarray, p: np.ndarray, fpr: float) -> dict[str, float]:
    """The lowest threshold t such that at most `fpr` of the real images (y == 0) have P(ai) >= t, with the
    FPR and detection rate (recall on ai) it gives on this data."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if not 0 <= fpr < 1:
        raise CalibrationError(f"fpr must be within [0, 1), got {fpr}")
    if len(np.unique(y)) < 2:
        raise CalibrationError("operating points need both classes in the data")
    fprs, tprs, thr = roc_curve(y, p, drop_intermediate=False)
    ok = np.flatnonzero(fprs <= fpr)
    i = ok[-1]  # the largest FPR within budget: roc_curve lists thresholds in decreasing order
    t = float(min(thr[i], 1.0))
    return {"fpr": float(fprs[i]), "threshold": t, "detection_rate": float(tprs[i]), "target_fpr": float(fpr)}


def equal_error_point(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """The threshold where the FPR on real images equals the miss rate on ai images."""
    fprs, tprs, thr = roc_curve(np.asarray(y), np.asarray(p, dtype=np.float64), drop_intermediate=False)
    fnr = 1 - tprs
    i = int(np.argmin(np.abs(fprs - fnr)))
    return {"threshold": float(min(thr[i], 1.0)), "fpr": float(fprs[i]), "fnr": float(fnr[i])}


def operating_points(y: np.ndarray, p: np.ndarray, fprs: Sequence[float] = DEFAULT_FPRS) -> dict[str, Any]:
    """{"fpr=0.01": {...}, "fpr=0.05": {...}, "eer": {...}} on calibrated P(ai); y: 1 = ai, 0 = real."""
    out: dict[str, Any] = {f"fpr={f:g}": threshold_at_fpr(y, p, f) for f in fprs}
    out["eer"] = equal_error_point(y, p)
    return out


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold on calibrated P(ai) and where it came from ("0.5", "fpr=0.01", "eer", "0.73")."""

    threshold: float = 0.5
    name: str = "0.5"


def parse_operating_point(spec: str | float | None, points: dict[str, Any] | None) -> OperatingPoint:
    """`None`/"default" -> 0.5; a number in [0, 1] -> that threshold; "fpr=F" or "eer" -> the model's
    recorded point (F must be one the model recorded: a threshold for another FPR needs data to fit)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "default")):
        return OperatingPoint()
    if isinstance(spec, (int, float)):
        value = float(spec)
    else:
        s = spec.strip().lower().replace(" ", "")
        try:
            value = float(s.removeprefix("threshold="))
        except ValueError:
            key = s if s == "eer" else None
            if s.startswith("fpr="):
                try:
                    key = f"fpr={float(s[4:]):g}"
                except ValueError:
                    key = None
            if key is None:
                raise CalibrationError(
                    f"operating point {spec!r}: use a threshold in [0, 1], fpr=F (e.g. fpr=0.01) or eer"
                ) from None
            known = points or {}
            if key not in known:
                have = ", ".join(sorted(known)) or "none: run deepfake calibrate first"
                raise CalibrationError(
                    f"operating point {spec!r} is not recorded for this model (it has: {have})"
                ) from None
            return OperatingPoint(float(known[key]["threshold"]), key)
    if not 0 <= value <= 1:
        raise CalibrationError(f"threshold {value} is outside [0, 1]")
    return OperatingPoint(value, f"{value:g}")


# ---------------------------------------------------------------------------------------------- verdict
def verdict(
    prob_ai: float, in_domain: bool | None, threshold: float = 0.5, band: Sequence[float] = DEFAULT_BAND
) -> tuple[str, str]:
    """(`ai` | `real` | `uncertain`, reason in plain words); see the module docstring for the rule.
    `in_domain=None` (no guard fitted) gives a verdict with a reason that says the guard is missing."""
    lo, hi = float(band[0]), float(band[1])
    if in_domain is False:
        return "uncertain", "the image is unlike the images the model was trained on, so it gives no verdict"
    notes = []
    if prob_ai >= max(hi, threshold):
        label = "ai"
    elif prob_ai < min(lo, threshold):
        label = "real"
    else:
        label = "uncertain"
        notes.append(
            f"P(ai) = {prob_ai:.2f} lies in the model's uncertainty band "
            f"({min(lo, threshold):.2f} to {max(hi, threshold):.2f}): too close to call"
        )
    if in_domain is None:
        notes.append("no out-of-domain guard is fitted for this model: the answer assumes a familiar image")
    return label, "; ".join(notes)


def coverage_table(
    y: np.ndarray, p: np.ndarray, in_domain: np.ndarray | None, threshold: float, band: Sequence[float]
) -> dict[str, Any]:
    """How many images get a verdict (coverage) and how accurate the answered part is, beside plain
    accuracy at the threshold on every image. `in_domain` may hold None (no guard): counted as in domain."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    dom = [None] * len(y) if in_domain is None else list(in_domain)
    labels = np.array([verdict(float(pi), d, threshold, band)[0] for pi, d in zip(p, dom)])
    answered = labels != "uncertain"
    correct = (labels == np.where(y == 1, "ai", "real")) & answered
    n_ans = int(answered.sum())
    out_of_domain = int(sum(1 for d in dom if d is False))
    return {
        "n": int(len(y)),
        "answered": n_ans,
        "coverage": n_ans / len(y) if len(y) else None,
        "accuracy_answered": float(correct.sum() / n_ans) if n_ans else None,
        "uncertain": int(len(y) - n_ans),
        "out_of_domain": out_of_domain,
        "in_band": int(len(y) - n_ans - out_of_domain),
        "verdicts": {v: int((labels == v).sum()) for v in VERDICTS},
        "threshold": float(threshold),
        "band": [float(band[0]), float(band[1])],
    }

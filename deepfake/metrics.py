"""Classification metrics for the two-class detector, from true labels and P(ai) alone.

Pure functions (numpy, scipy, scikit-learn, matplotlib Agg; no torch, no Ray), so evaluation, ensembles and
tests compute every number the same way. The positive class is "ai". A prediction is "ai" when
`prob_ai >= threshold`; at 0.5 this is exactly the Predictor's argmax verdict ("ai" is output 0, so a tie
goes to "ai").

Calibration: the expected calibration error (ECE) is measured on P(ai) itself, with `n_bins` equal-width
bins over [0, 1]: ECE = sum over bins of (n_bin / n) * |fraction of ai in the bin - mean P(ai) in the bin|.
Bins are right-closed, (lo, hi], the first one [0, hi], the same rule as `sklearn.calibration.
calibration_curve(strategy="uniform")`, so the reliability diagram draws exactly the bins the ECE sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata
from sklearn import metrics as skm

from deepfake.labels import CLASSES, POSITIVE


def to_binary(y_true: Sequence[Any]) -> np.ndarray:
    """Class names (case-insensitive) or class indices (in CLASSES order) -> 1 for ai, 0 for real."""
    out = np.empty(len(y_true), dtype=np.int64)
    for i, v in enumerate(y_true):
        if isinstance(v, str):
            name = v.strip().lower()
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= int(v) < len(CLASSES):
            name = CLASSES[int(v)]
        else:
            name = None
        if name not in CLASSES:
            raise ValueError(f"y_true[{i}] = {v!r}: expected one of {list(CLASSES)} or an index 0..{len(CLASSES) - 1}")
        out[i] = int(name == POSITIVE)
    return out


def _check(y_true: Sequence[Any], prob_ai: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = to_binary(list(y_true))
    p = np.asarray(prob_ai, dtype=np.float64).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
    if len(y) == 0:
        raise ValueError("no predictions to score")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("prob_ai must be finite and within [0, 1]")
    return y, p


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion: stays inside [0, 1] and behaves at 0 % / 100 % and small n."""
    if n <= 0:
        return (0.0, 1.0)
    z = float(norm.ppf(0.5 + level / 2))
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def auc_by_ranks(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row of (B, n) arrays via the Mann-Whitney rank sum (ties count one half, as in
    sklearn's roc_auc_score); NaN for a row holding one class only."""
    y = np.atleast_2d(y)
    p = np.atleast_2d(p)
    ranks = rankdata(p, axis=1)
    n1 = y.sum(axis=1).astype(np.float64)
    n0 = y.shape[1] - n1
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = ((ranks * y).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    auc[(n1 == 0) | (n0 == 0)] = np.nan
    return auc


def bootstrap_auc_interval(
    y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Percentile bootstrap interval of ROC-AUC (resampling images with replacement, fixed seed, so a
    rerun gives the same interval). Resamples that happen to hold one class only are dropped and counted."""
    rng = np.random.default_rng(seed)
    n = len(y)
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))  # bound memory to a few (B, n) arrays of ~32 MB
    aucs = []
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(b, n))
        aucs.append(auc_by_ranks(y[idx], p[idx]))
        done += b
    all_aucs = np.concatenate(aucs) if aucs else np.array([])
    valid = all_aucs[np.isfinite(all_aucs)]
    alpha = (1 - level) / 2
    interval = [float(np.quantile(valid, alpha)), float(np.quantile(valid, 1 - alpha))] if len(valid) else None
    return {"interval": interval, "resamples": int(n_boot), "valid_resamples": int(len(valid)), "seed": int(seed)}


def calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins of P(ai) with count, mean P(ai) and observed fraction of ai, from scikit-learn's
    `calibration_curve(strategy="uniform")` (it returns the non-empty bins only; the counts, which it does not
    return, come from its own edge rule); empty bins are listed with count 0."""
    from sklearn.calibration import calibration_curve

    y, p = np.asarray(y, dtype=np.int64), np.asarray(p, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], p, side="left"), minlength=n_bins)
    frac, mean = calibration_curve(y, p, n_bins=n_bins, strategy="uniform", pos_label=1) if len(y) else ([], [])
    filled = iter(zip(frac, mean))
    out = []
    for b in range(n_bins):
        f, m = next(filled) if counts[b] else (None, None)
        out.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": int(counts[b]),
                "mean_prob_ai": None if m is None else float(m),
                "fraction_ai": None if f is None else float(f),
            }
        )
    return out


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    n = len(y)
    return float(
        sum(
            b["count"] / n * abs(b["fraction_ai"] - b["mean_prob_ai"])
            for b in calibration_bins(y, p, n_bins)
            if b["count"]
        )
    )


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of P(ai) against the 0/1 truth."""
    return float(skm.brier_score_loss(y, p, pos_label=1))


def _f(x: Any) -> float:
    return float(x)


def compute_metrics(
    y_true: Sequence[Any],
    prob_ai: Sequence[float],
    threshold: float = 0.5,
    n_bins: int = 10,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Every figure evaluation reports, JSON-ready. With one class in y_true, ROC-AUC and average precision
    are undefined: they are None and `notes` says why (no crash)."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be within [0, 1], got {threshold}")
    y, p = _check(y_true, prob_ai)
    pred = (p >= threshold).astype(np.int64)
    names = np.array(["real", "ai"])  # index by the binary value
    y_names, pred_names = names[y], names[pred]
    labels = list(CLASSES)
    prec, rec, f1, support = skm.precision_recall_fscore_support(y_names, pred_names, labels=labels, zero_division=0)
    cm = skm.confusion_matrix(y_names, pred_names, labels=labels)
    n = len(y)
    correct = int((pred == y).sum())
    notes: list[str] = []
    out: dict[str, Any] = {
        "n": int(n),
        "support": {c: int(s) for c, s in zip(labels, support)},
        "positive_class": POSITIVE,
        "threshold": float(threshold),
        "accuracy": correct / n,
        "accuracy_ci": list(wilson_interval(correct, n, level)),
        "ci_level": level,
        "per_class": {
            c: {"precision": _f(prec[i]), "recall": _f(rec[i]), "f1": _f(f1[i]), "support": int(support[i])}
            for i, c in enumerate(labels)
        },
        "precision_macro": _f(np.mean(prec)),
        "recall_macro": _f(np.mean(rec)),
        "f1_macro": _f(np.mean(f1)),
        "confusion_matrix": {
            "labels": labels,
            "rows": "true class",
            "columns": "predicted class",
            "matrix": cm.astype(int).tolist(),
        },
        "brier": _f(skm.brier_score_loss(y, p, pos_label=1)),
        "ece": expected_calibration_error(y, p, n_bins),
        "ece_bins": n_bins,
        "calibration": calibration_bins(y, p, n_bins),
    }
    present = sorted({CLASSES[0] if v else CLASSES[1] for v in y})
    if len(present) < 2:
        notes.append(
            f"only one class ({present[0]}) in y_true: ROC-AUC and average precision are undefined; "
            "recall of the missing class is reported as 0"
        )
        out.update({"roc_auc": None, "roc_auc_ci": None, "average_precision": None, "roc_auc_bootstrap": None})
    else:
        boot = bootstrap_auc_interval(y, p, n_bootstrap, seed, level) if n_bootstrap > 0 else None
        out.update(
            {
                "roc_auc": _f(skm.roc_auc_score(y, p)),
                "roc_auc_ci": boot.pop("interval") if boot else None,
                "roc_auc_bootstrap": boot,
                "average_precision": _f(skm.average_precision_score(y, p)),
            }
        )
    out["notes"] = notes
    return out


# ---------------------------------------------------------------------------------------------- plots
def _figure(size: tuple[float, float] = (4.5, 4.0)):
    # A bare Figure renders through Agg without pyplot: no global state, no display needed, thread-safe.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    return fig, fig.add_subplot(1, 1, 1)


def plot_confusion_matrix(metrics: dict[str, Any], path: str | Path, title: str = "Confusion matrix") -> Path:
    cm = np.asarray(metrics["confusion_matrix"]["matrix"])
    labels = metrics["confusion_matrix"]["labels"]
    fig, ax = _figure()
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, cm.max()))
    row_sum = cm.sum(axis=1, keepdims=True)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            share = cm[i, j] / row_sum[i, 0] if row_sum[i, 0] else 0.0
            colour = "white" if cm[i, j] > cm.max() / 2 else "black"
            ax.text(j, i, f"{cm[i, j]}\n{share:.1%}", ha="center", va="center", color=colour)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (n={cm.sum()}, threshold {metrics['threshold']:g})")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def plot_roc(y_true: Sequence[Any], prob_ai: Sequence[float], path: str | Path, title: str = "ROC") -> Path:
    y, p = _check(y_true, prob_ai)
    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    if len(set(y.tolist())) < 2:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class present", ha="center", va="center")
    else:
        fpr, tpr, _ = skm.roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"AUC = {skm.roc_auc_score(y, p):.4f}")
        ax.legend(loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (real called ai)")
    ax.set_ylabel("true positive rate (ai caught)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def plot_reliability(
    y_true: Sequence[Any], prob_ai: Sequence[float], path: str | Path, n_bins: int = 10, title: str = "Reliability"
) -> Path:
    """Observed fraction of ai against mean P(ai) per bin (the ECE's bins), with a histogram of P(ai)."""
    y, p = _check(y_true, prob_ai)
    bins = [b for b in calibration_bins(y, p, n_bins) if b["count"]]
    fig, ax = _figure((4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    ax.plot([b["mean_prob_ai"] for b in bins], [b["fraction_ai"] for b in bins], "o-", lw=2, label="model")
    ax2 = ax.twinx()
    ax2.hist(p, bins=np.linspace(0, 1, n_bins + 1), alpha=0.2, color="tab:blue")
    ax2.set_ylabel("images")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted P(ai)")
    ax.set_ylabel("observed fraction ai")
    ax.set_title(f"{title} (ECE {expected_calibration_error(y, p, n_bins):.4f}, {n_bins} bins)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def write_plots(
    y_true: Sequence[Any], prob_ai: Sequence[float], out_dir: str | Path, metrics: dict[str, Any] | None = None
) -> dict[str, str]:
    """confusion_matrix.png, roc.png and reliability.png in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = metrics or compute_metrics(y_true, prob_ai, n_bootstrap=0)
    return {
        "confusion_matrix": str(plot_confusion_matrix(m, out / "confusion_matrix.png")),
        "roc": str(plot_roc(y_true, prob_ai, out / "roc.png")),
        "reliability": str(plot_reliability(y_true, prob_ai, out / "reliability.png", n_bins=m.get("ece_bins", 10))),
    }

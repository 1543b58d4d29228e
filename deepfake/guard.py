"""The out-of-domain guard: does an input look like the images the model was trained on?

A classifier trained on 32x32 CIFAKE answers "ai, 0.95" for a web photo it has never seen anything like.
The guard sees each input twice, both cheaply:
- the input envelope: the original width, height and aspect ratio against the range seen in training
  (a 512 px photo is outside a 32 px training set whatever its pixels say);
- a feature-space score from the same forward pass that gives the verdict: pooled activations of several
  depths of the network (`TappedNet`), scored by their Mahalanobis distance to the nearest class mean under
  a shared, shrunk covariance (Lee et al., NeurIPS 2018; scikit-learn's Ledoit-Wolf estimator), per depth,
  each depth's distance standardised on held-out in-domain images and the standardised scores summed.
The threshold is the score's `quantile` on in-domain validation images (about 1% flagged). The score is
reported relative to that threshold: `domain_score` 1.0 is the threshold, above it the input is out of domain.

Fitted state: arrays in `guard.safetensors` beside the weights (never pickle), settings in the model's
metadata under "trust"."guard"; the metadata keeps the file's SHA-256, so a changed or corrupt file is an
error that names it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import nn

log = logging.getLogger(__name__)

GUARD_FILE = "guard.safetensors"
DEFAULT_TAPS = (2, 4, 6)  # blocks whose pooled output joins the penultimate features (EfficientNet has 7)
MIN_PER_CLASS = 20  # fewer images per class cannot give a usable covariance, even shrunk
SIZE_SLACK = 1.25  # sizes within this factor of the training range count as inside the envelope
ASPECT_SLACK = 1.1


class GuardError(ValueError):
    """A guard that cannot be fitted or read; the message names the reason or the file."""


# ---------------------------------------------------------------------------------------------- features
class TappedNet(nn.Module):
    """The classifier's own forward, also returning pooled features of several depths: (logits, features).

    For timm's EfficientNet family (conv_stem, bn1, blocks, conv_head, bn2, global_pool, classifier), the
    same ops in the same order as `model(x)` in eval mode, so the logits are identical and the guard costs
    one mean per tapped block. Features: [mean-pooled block `taps[0]`, ..., penultimate pooled features]."""

    def __init__(self, model: nn.Module, taps: Sequence[int] = DEFAULT_TAPS):
        super().__init__()
        for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier"):
            if not hasattr(model, name):
                raise GuardError(f"the out-of-domain guard needs an EfficientNet-style model (no {name!r})")
        if any(t < 0 or t >= len(model.blocks) for t in taps):
            raise GuardError(f"guard taps {list(taps)} outside the model's {len(model.blocks)} blocks")
        self.model = model
        self.taps = tuple(int(t) for t in taps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.bn1(m.conv_stem(x))
        pooled = []
        for i, block in enumerate(m.blocks):
            x = block(x)
            if i in self.taps:
                pooled.append(x.float().mean((2, 3)))
        f = m.global_pool(m.bn2(m.conv_head(x)))
        pooled.append(f.float())
        return m.classifier(f), torch.cat(pooled, 1)

    def group_sizes(self) -> list[int]:
        """Width of each feature group, in the order of the concatenated features."""
        chans = []
        for i, block in enumerate(self.model.blocks):
            if i in self.taps:
                chans.append(_out_channels(block))
        chans.append(int(self.model.num_features))
        return chans


def _out_channels(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)


# ---------------------------------------------------------------------------------------------- the guard
@dataclass
class DomainGuard:
    """Fitted guard: per feature group, class means + a shared precision matrix; standardisation of each
    group's distance; the envelope of training sizes; the threshold on the summed standardised score."""

    taps: tuple[int, ...]
    groups: list[int]  # feature widths per group
    arrays: dict[str, np.ndarray]  # mean_{g} (C, D_g), precision_{g} (D_g, D_g), zloc/zscale (G,)
    threshold: float
    envelope: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # how it was fitted, for the card

    # -------------------------------------------------------------------- scoring
    def distances(self, feats: np.ndarray) -> np.ndarray:
        """(N, G) Mahalanobis distance (squared) of each group to its nearest class mean."""
        feats = np.asarray(feats, dtype=np.float64)
        out = np.empty((len(feats), len(self.groups)))
        start = 0
        for g, width in enumerate(self.groups):
            x = feats[:, start : start + width]
            start += width
            mu, prec = self.arrays[f"mean_{g}"], self.arrays[f"precision_{g}"]
            d = np.stack([np.einsum("nd,de,ne->n", x - m, prec, x - m) for m in mu], 1)
            out[:, g] = d.min(1)
        return out

    def raw_score(self, feats: np.ndarray) -> np.ndarray:
        z = (np.log(self.distances(feats)) - self.arrays["zloc"]) / self.arrays["zscale"]
        return z.sum(1)

    def score(self, feats: np.ndarray) -> np.ndarray:
        """The domain score relative to the threshold: > 1 means out of domain."""
        return self.raw_score(feats) / self.threshold

    def in_envelope(self, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """Whether each original (width, height) lies in the training range of sizes and aspect ratios."""
        e = self.envelope
        out = []
        for w, h in sizes:
            short, long_ = min(w, h), max(w, h)
            ok = e["short_min"] / SIZE_SLACK <= short <= e["short_max"] * SIZE_SLACK
            ok = ok and long_ <= e["long_max"] * SIZE_SLACK
            ok = ok and (long_ / max(short, 1)) <= e["aspect_max"] * ASPECT_SLACK
            out.append(bool(ok))
        return np.array(out, dtype=bool)

    def check(
        self, feats: np.ndarray, sizes: Sequence[tuple[int, int]] | None
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(in_domain bool (N,), domain_score (N,), reason per image ('' when in domain))."""
        score = self.score(feats)
        env = self.in_envelope(sizes) if sizes is not None else np.ones(len(score), dtype=bool)
        reasons = []
        for i, (s, ok) in enumerate(zip(score, env)):
            why = []
            if not ok:
                w, h = sizes[i]
                why.append(
                    f"its size ({w}x{h}) is outside the training images' sizes ({describe_envelope(self.envelope)})"
                )
            if s > 1:
                why.append(f"its content is unlike the training images (domain score {s:.2f} > 1)")
            reasons.append("; ".join(why))
        return env & (score <= 1), score, reasons

    # -------------------------------------------------------------------- storage
    def save(self, model_dir: str | Path) -> dict[str, Any]:
        """Write guard.safetensors (atomically) and return the JSON part for the metadata."""
        from safetensors.numpy import save_file

        d = Path(model_dir)
        tmp = d / f".{GUARD_FILE}.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}, str(tmp))
        tmp.replace(d / GUARD_FILE)
        return {
            "file": GUARD_FILE,
            "sha256": _sha256(d / GUARD_FILE),
            "taps": list(self.taps),
            "groups": list(self.groups),
            "threshold": float(self.threshold),
            "envelope": self.envelope,
            **self.info,
        }

    @classmethod
    def load(cls, model_dir: str | Path, spec: dict[str, Any]) -> DomainGuard:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(model_dir) / spec.get("file", GUARD_FILE)
        if not path.is_file():
            raise GuardError(f"{path}: the guard file named in config.json is missing")
        if spec.get("sha256") and _sha256(path) != spec["sha256"]:
            raise GuardError(f"{path}: corrupt or changed guard file (SHA-256 differs from config.json)")
        try:
            arrays = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise GuardError(f"{path}: unreadable guard file ({e})") from None
        groups = [int(g) for g in spec["groups"]]
        need = {"zloc", "zscale"} | {f"{k}_{g}" for g in range(len(groups)) for k in ("mean", "precision")}
        if missing := need - set(arrays):
            raise GuardError(f"{path}: guard file lacks {sorted(missing)}")
        info = {k: v for k, v in spec.items() if k not in ("file", "sha256", "taps", "groups", "threshold", "envelope")}
        return cls(tuple(spec["taps"]), groups, arrays, float(spec["threshold"]), spec["envelope"], info)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe_envelope(e: dict[str, Any]) -> str:
    lo, hi = e["short_min"], e["short_max"]
    return (
        f"{lo} px"
        if lo == hi and e["long_max"] == hi
        else f"short side {lo}-{hi} px, long side up to {e['long_max']} px"
    )


# ---------------------------------------------------------------------------------------------- fitting
def fit_envelope(sizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """The training images' range of sizes (0.5% and 99.5% quantiles, so a few odd files do not widen it)."""
    a = np.asarray(sizes, dtype=np.float64)
    short, long_ = a.min(1), a.max(1)
    return {
        "short_min": int(np.quantile(short, 0.005)),
        "short_max": int(np.ceil(np.quantile(short, 0.995))),
        "long_max": int(np.ceil(np.quantile(long_, 0.995))),
        "aspect_max": float(np.quantile(long_ / short, 0.995)),
        "images": len(a),
    }


def fit_guard(
    fit_feats: np.ndarray,
    fit_labels: np.ndarray,
    val_feats: np.ndarray,
    sizes: Sequence[tuple[int, int]],
    taps: Sequence[int],
    groups: Sequence[int],
    quantile: float = 0.99,
) -> DomainGuard:
    """Class means and a shared Ledoit-Wolf covariance per feature group from `fit_feats` (training images),
    the standardisation and the threshold from `val_feats` (held-out in-domain images)."""
    fit_feats = np.asarray(fit_feats, dtype=np.float64)
    y = np.asarray(fit_labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise GuardError(f"the guard needs images of both classes; got only {classes.tolist()}")
    if counts.min() < MIN_PER_CLASS or len(val_feats) < 2 * MIN_PER_CLASS:
        raise GuardError(
            f"too few images to fit the guard's covariance: {dict(zip(classes.tolist(), counts.tolist()))} "
            f"for fitting and {len(val_feats)} held out (need >= {MIN_PER_CLASS} per class and "
            f">= {2 * MIN_PER_CLASS} held out)"
        )
    if sum(groups) != fit_feats.shape[1]:
        raise GuardError(f"feature groups {list(groups)} do not add up to {fit_feats.shape[1]} features")
    arrays: dict[str, np.ndarray] = {}
    start = 0
    for g, width in enumerate(groups):
        x = fit_feats[:, start : start + width]
        start += width
        means = np.stack([x[y == c].mean(0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        lw = LedoitWolf(assume_centered=True).fit(centred)
        arrays[f"mean_{g}"] = means
        arrays[f"precision_{g}"] = lw.precision_
    probe = DomainGuard(tuple(taps), list(groups), arrays, 1.0, {})
    logd = np.log(probe.distances(val_feats))
    arrays["zloc"] = np.median(logd, 0)
    arrays["zscale"] = np.maximum(np.quantile(logd, 0.84, axis=0) - arrays["zloc"], 1e-6)
    raw = probe.raw_score(val_feats)
    threshold = float(np.quantile(raw, quantile))
    if not threshold > 0:
        raise GuardError(f"degenerate guard: the in-domain score's {quantile:.0%} quantile is {threshold:.3g}")
    return DomainGuard(
        tuple(int(t) for t in taps),
        [int(g) for g in groups],
        arrays,
        threshold,
        fit_envelope(sizes),
        {
            "method": "class-conditional Mahalanobis (shared Ledoit-Wolf covariance) per depth, standardised, summed",
            "fit_images": int(len(fit_feats)),
            "threshold_images": int(len(val_feats)),
            "quantile": float(quantile),
        },
    )

"""The out-of-domain guard: does an input look like the images the model was trained on?

A classifier trained on 32x32 CIFAKE answers "ai, 0.95" for a web photo it has never seen anything like.
The guard sees each input twice, both cheaply:
- the input envelope: the original width, height and aspect ratio against the range seen in training
  (a 512 px photo is outside a 32 px training set whatever its pixels say);
- feature groups, each scored by its Mahalanobis distance to the nearest class mean under a shared, shrunk
  covariance (Lee et al., NeurIPS 2018; scikit-learn's Ledoit-Wolf estimator):
  - pooled activations of several depths of the network, from the same forward pass that gives the verdict
    (`TappedNet`): they tell a web photo at its own size from a CIFAKE image;
  - 18 low-level statistics of the image at the training images' size (`lowlevel`: JPEG 8x8 blockiness and
    quantisation residue, Laplacian energy and kurtosis, colour moments, saturation, clipping): a web photo
    downscaled to 32 px passes any size check and looks typical to the deep features (measured: ROC-AUC
    0.5-0.7), but it lacks the resampling and JPEG traces every CIFAKE image carries (ROC-AUC 1.0);
  each group's log distance is standardised on held-out in-domain images, and the largest one is the score.
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
from PIL import Image
from sklearn.covariance import LedoitWolf
from torch import nn

from deepfake.files import write_atomic

log = logging.getLogger(__name__)

GUARD_FILE = "guard.safetensors"
N_LOWLEVEL = 18  # lowlevel()'s statistics per image
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


# ---------------------------------------------------------------------------------------------- low-level
# IJG's standard luminance table at quality 75, natural order: the lattice that JPEG-at-75 DCT coefficients
# sit on (CIFAKE's images are such JPEGs); the distance to it is one of the statistics.
Q75_LUMA = np.array(
    [8, 6, 5, 8, 12, 20, 26, 31, 6, 6, 7, 10, 13, 29, 30, 28, 7, 7, 8, 12, 20, 29, 35, 28, 7, 9, 11, 15, 26, 44, 40, 31,
     9, 11, 19, 28, 34, 55, 52, 39, 12, 18, 28, 32, 41, 52, 57, 46, 25, 32, 39, 44, 52, 61, 60, 51, 36, 46, 48, 49,
     56, 50, 52, 50],
    dtype=np.float32,
).reshape(8, 8)  # fmt: skip


def _dct_matrix(n: int = 8) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


_DCT = _dct_matrix()


def lowlevel_view(img: Image.Image, size: int) -> np.ndarray:
    """The image as the training images were: as it is when already size x size (so its own JPEG grid and
    pixels are kept), else short side to `size` (bicubic, antialiased) and a centre crop; uint8 (size, size, 3)."""
    if img.size != (size, size):
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img.convert("RGB"))


def lowlevel(u8: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 18) float32 statistics of each image's pixels (S >= 8; the JPEG statistics
    use the largest multiple of 8 that fits). Pure numpy; every mean runs over a contiguous, flattened array
    (numpy's multi-axis and fancy-indexed reductions cost 2-3x more here)."""
    x = u8.astype(np.float32)
    num = len(x)

    def mean(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a).reshape(num, -1).mean(1)

    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    eps = 1e-3
    n = (y.shape[1] // 8) * 8
    dx, dy = np.abs(np.diff(y, axis=2)), np.abs(np.diff(y, axis=1))

    def blockiness(d: np.ndarray, axis: int) -> np.ndarray:
        """log(mean difference across 8x8 block boundaries / mean difference elsewhere)."""
        edge = d[:, :, 7 : n - 1 : 8] if axis == 2 else d[:, 7 : n - 1 : 8, :]
        if edge.size == 0:
            return np.zeros(num, np.float32)
        total, e = (
            d.reshape(num, -1).sum(1),
            edge.reshape(num, -1).sum(1) if edge.flags.c_contiguous else mean(edge) * (edge.size // num),
        )
        inner = (total - e) / (d[0].size - edge[0].size)
        return np.log((e / edge[0].size + eps) / (inner + eps))

    blk_h, blk_v = blockiness(dx, 2), blockiness(dy, 1)

    def lap(c: np.ndarray) -> np.ndarray:
        return 4 * c[:, 1:-1, 1:-1] - c[:, :-2, 1:-1] - c[:, 2:, 1:-1] - c[:, 1:-1, :-2] - c[:, 1:-1, 2:]

    ly = lap(y)
    lapm = mean(np.abs(ly))
    grad = 0.5 * (mean(dx) + mean(dy))
    chroma = mean(np.abs(lap(cb))) + mean(np.abs(lap(cr)))
    ly2 = ly * ly
    m2, m4 = mean(ly2), mean(ly2 * ly2)
    k = n // 8  # JPEG quantisation residue: DCT coefficients of the 8x8 luma blocks against the q75 lattice
    blocks = (y[:, :n, :n] - 128.0).reshape(-1, k, 8, k, 8).transpose(0, 1, 3, 2, 4)
    coef = (_DCT @ blocks @ _DCT.T) / Q75_LUMA  # 2-D DCT of every block, as two batched matmuls
    err = np.abs(coef - np.round(coef)).reshape(num, k * k, 64)
    err_sum = err.sum(1)  # (N, 64): per coefficient, summed over blocks
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    planes = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(num, 3, -1)
    feats = [
        blk_h,
        blk_v,
        np.log1p(lapm),
        np.log1p(y.reshape(num, -1).std(1)),
        np.log((lapm + 1) / (grad + 1)),
        np.log((chroma + 1) / (lapm + 1)),
        np.log((m4 + eps) / (m2**2 + eps)),
        err_sum[:, _AC].sum(1) / (k * k * len(_AC)),
        err_sum[:, _LOW_AC].sum(1) / (k * k * len(_LOW_AC)),
        *(planes.mean(2) / 255).T,
        *(planes.std(2) / 255).T,
        mean((mx - mn) / (mx + 1.0)),
        mean((u8 <= 1) | (u8 >= 254)),
        np.log1p(grad),
    ]
    return np.stack(feats, 1).astype(np.float32)


_AC = np.arange(1, 64)  # every DCT coefficient but DC, in an 8x8 block's row-major order
_LOW_AC = np.array([1, 2, 8, 9, 10, 16, 17, 18])  # the 3x3 lowest frequencies but DC


def lowlevel_images(images: Sequence[Image.Image], size: int) -> np.ndarray:
    return lowlevel(np.stack([lowlevel_view(im, size) for im in images]))


# ---------------------------------------------------------------------------------------------- the guard
@dataclass
class DomainGuard:
    """Fitted guard: per feature group, class means + a shared precision matrix; standardisation of each
    group's distance; the envelope of training sizes; the threshold on the summed standardised score."""

    taps: tuple[int, ...] | None  # tapped blocks (the penultimate layer too); None: low-level statistics only
    groups: list[int]  # feature widths per group: the tapped blocks, the penultimate layer, the low-level stats
    lowlevel_size: int  # side of the view `lowlevel` reads (the training images' size)
    arrays: dict[str, np.ndarray]  # mean_{g} (C, D_g), precision_{g} (D_g, D_g), zloc/zscale (G,)
    threshold: float
    envelope: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # how it was fitted, for the card

    # -------------------------------------------------------------------- scoring
    def distances(self, feats: np.ndarray) -> np.ndarray:
        """(N, G) Mahalanobis distance (squared) of each group to its nearest class mean."""
        feats = np.asarray(feats, dtype=np.float32)  # float32 like the stored arrays: no per-call upcast
        out = np.empty((len(feats), len(self.groups)))
        start = 0
        for g, width in enumerate(self.groups):
            x = (feats[:, start : start + width] - self.arrays[f"loc_{g}"]) / self.arrays[f"scale_{g}"]
            start += width
            mu, prec = self.arrays[f"mean_{g}"], self.arrays[f"precision_{g}"]
            # (x-m)P(x-m) = xPx - 2 xPm + mPm: one (N, D) x (D, D) product for every class
            xp = x @ prec
            d = (xp * x).sum(1)[:, None] - 2 * xp @ mu.T + self._mpm(g)[None, :]
            out[:, g] = np.maximum(d.min(1), 1e-6)  # float32 cancellation must not reach log(<= 0)
        return out

    def _mpm(self, g: int) -> np.ndarray:
        """m P m per class mean of group g (constant: computed once)."""
        cache = self.__dict__.setdefault("_mpm_cache", {})
        if g not in cache:
            mu, prec = self.arrays[f"mean_{g}"].astype(np.float64), self.arrays[f"precision_{g}"].astype(np.float64)
            cache[g] = np.einsum("cd,de,ce->c", mu, prec, mu).astype(np.float32)
        return cache[g]

    def raw_score(self, feats: np.ndarray) -> np.ndarray:
        """The largest standardised log distance over the groups: unfamiliar in any respect is unfamiliar."""
        z = (np.log(self.distances(feats)) - self.arrays["zloc"]) / self.arrays["zscale"]
        return z.max(1)

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
        from safetensors.numpy import save

        d = Path(model_dir)
        write_atomic(d / GUARD_FILE, save({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}))
        return {
            "file": GUARD_FILE,
            "sha256": _sha256(d / GUARD_FILE),
            "taps": None if self.taps is None else list(self.taps),
            "groups": list(self.groups),
            "lowlevel_size": int(self.lowlevel_size),
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
        need = {"zloc", "zscale"} | {
            f"{k}_{g}" for g in range(len(groups)) for k in ("loc", "scale", "mean", "precision")
        }
        if missing := need - set(arrays):
            raise GuardError(f"{path}: guard file lacks {sorted(missing)}")
        known = ("file", "sha256", "taps", "groups", "lowlevel_size", "threshold", "envelope")
        info = {k: v for k, v in spec.items() if k not in known}
        return cls(
            None if spec["taps"] is None else tuple(spec["taps"]),
            groups,
            int(spec["lowlevel_size"]),
            arrays,
            float(spec["threshold"]),
            spec["envelope"],
            info,
        )


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
    taps: Sequence[int] | None,
    groups: Sequence[int],
    lowlevel_size: int,
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
        # standardised first: Ledoit-Wolf shrinks towards a multiple of the identity, which only suits
        # features of one scale (the low-level statistics span four orders of magnitude)
        loc, scale = x.mean(0), np.maximum(x.std(0), 1e-6)
        x = (x - loc) / scale
        arrays[f"loc_{g}"], arrays[f"scale_{g}"] = loc, scale
        means = np.stack([x[y == c].mean(0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        lw = LedoitWolf(assume_centered=True, store_precision=False).fit(centred)
        arrays[f"mean_{g}"] = means
        arrays[f"precision_{g}"] = np.linalg.inv(lw.covariance_)  # shrunk: well conditioned, and 5x faster than pinvh
    # stored as float32 (half the file; a distance needs no more), and the threshold is set with these arrays
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    taps = None if taps is None else tuple(int(t) for t in taps)
    probe = DomainGuard(taps, list(groups), lowlevel_size, arrays, 1.0, {})
    logd = np.log(probe.distances(val_feats))
    arrays["zloc"] = np.median(logd, 0).astype(np.float32)
    arrays["zscale"] = np.maximum(np.quantile(logd, 0.84, axis=0) - arrays["zloc"], 1e-6).astype(np.float32)
    raw = probe.raw_score(val_feats)
    threshold = float(np.quantile(raw, quantile))
    if not threshold > 0:
        raise GuardError(f"degenerate guard: the in-domain score's {quantile:.0%} quantile is {threshold:.3g}")
    return DomainGuard(
        taps,
        [int(g) for g in groups],
        int(lowlevel_size),
        arrays,
        threshold,
        fit_envelope(sizes),
        {
            "method": "class-conditional Mahalanobis distance (shared Ledoit-Wolf covariance) per feature group "
            + ("(pooled activations of several depths, 18 low-level image statistics)" if taps is not None else "")
            + ", standardised; the largest",
            "fit_images": int(len(fit_feats)),
            "threshold_images": int(len(val_feats)),
            "quantile": float(quantile),
        },
    )

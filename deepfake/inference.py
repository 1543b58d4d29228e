"""Inference on a trained model folder: the one preprocessing + forward path that predict, evaluate,
explain and the server all use, so a verdict never depends on which entry point produced it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from deepfake.calibration import DEFAULT_BAND, parse_operating_point, softmax, verdict
from deepfake.checkpoint import load_model
from deepfake.guard import DomainGuard, TappedNet, lowlevel_images
from deepfake.images import original_size
from deepfake.model import autocast, input_to_device, pick_device, to_device
from deepfake.transforms import build_transform, eval_geometry


class Scorer:
    """What turns images into answers: one model (`Predictor`) or several averaged (`Ensemble`). Both give
    `members` (the Predictors to run), `combine` (their BatchScores into one) and `answer`, with the scorer's
    own operating point `op`, uncertainty `band` and `version`."""

    members: list[Predictor]
    op: Any
    band: tuple[float, float]
    version: str
    classes: list[str]

    def combine(self, per_member: Sequence[BatchScores]) -> BatchScores:
        return combine_scores(per_member)

    @property
    def image_size(self) -> int:
        return max(m.image_size for m in self.members)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def predict_images(self, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
        return self.answers(score_images(self.members, images, self.combine))

    def answers(self, s: BatchScores) -> list[dict[str, Any]]:
        return [
            self.answer(p, r, d, sc, why)
            for p, r, d, sc, why in zip(s.prob_ai, s.prob_ai_raw, s.in_domain, s.domain_score, s.reasons)
        ]

    def answer(
        self, prob_ai: float, prob_ai_raw: float, in_domain: bool | None, domain_score: float | None, why: str = ""
    ) -> dict[str, Any]:
        """One answer: the thresholded `label`, the `verdict` (ai, real or uncertain) with its `reason`, the
        calibrated and raw P(ai), the guard's `in_domain` and `domain_score`, and the model and threshold."""
        v, reason = verdict(float(prob_ai), in_domain, self.op.threshold, self.band)
        if in_domain is False and why:
            reason = f"{reason}: {why}"
        return {
            "label": "ai" if prob_ai >= self.op.threshold else "real",
            "verdict": v,
            "reason": reason,
            "prob_ai": float(prob_ai),
            "prob_ai_raw": float(prob_ai_raw),
            "in_domain": in_domain,
            "domain_score": None if domain_score is None else round(float(domain_score), 4),
            "threshold": self.op.threshold,
            "operating_point": self.op.name,
            "model": self.version,
        }


class Predictor(Scorer):
    """A loaded model plus its own eval transform (size, interpolation, mean/std from its metadata) and its
    trust settings (`meta["trust"]`, written by `deepfake calibrate`): the temperature applied to every
    P(ai), the operating points, the uncertainty band and the out-of-domain guard. A folder without them
    still predicts: temperature 1, threshold 0.5, `in_domain` None."""

    def __init__(
        self,
        model: nn.Module,
        meta: dict[str, Any],
        device: str | torch.device = "auto",
        amp: str = "auto",
        channels_last: bool = True,
        jit: bool = False,
        operating_point: str | float | None = None,
        guard: DomainGuard | None = None,
        taps: Sequence[int] | None = None,
        lowlevel_size: int | None = None,
    ):
        self._device = pick_device(device) if str(device) in ("auto", "true", "false") else torch.device(device)
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.ai_index = self.classes.index("ai")
        self._image_size = int(meta["image_size"])
        self.amp = amp
        self.channels_last = channels_last
        self.model = to_device(model, self.device, channels_last).eval()
        interpolation = meta.get("interpolation", "bicubic")
        self.transform = build_transform(
            self.image_size, tuple(meta["mean"]), tuple(meta["std"]), train=False, interpolation=interpolation
        )
        # the transform's first steps, resize + centre crop: the image as this model reads it (`view`)
        self.geometry = eval_geometry(self.image_size, interpolation)
        self.version = model_version(meta)
        trust = meta.get("trust") or {}
        self.temperature = float(trust.get("temperature", 1.0))
        self.band = tuple(trust.get("band", DEFAULT_BAND))
        self.operating_points: dict[str, Any] = trust.get("operating_points") or {}
        self.op = parse_operating_point(operating_point, self.operating_points)
        self.guard = guard
        # features of these blocks (and the penultimate layer) come with the logits: the guard's, or `taps` to
        # fit a new guard (calibrate); None: no deep features
        self.taps = guard.taps if guard is not None else (None if taps is None else tuple(taps))
        # side of the image view the guard's low-level statistics read (None: no such statistics)
        self.lowlevel_size = guard.lowlevel_size if guard is not None else lowlevel_size
        # self.net gives (logits, features); self.model stays the eager classifier (Grad-CAM hooks it)
        self.net: nn.Module = TappedNet(self.model, self.taps) if self.taps is not None else _LogitsOnly(self.model)
        self.forward: nn.Module = self.net
        if jit and self.device.type == "cpu":
            self.forward = jit_module(self.net, self.image_size, channels_last)

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | torch.device = "auto", **kw) -> Predictor:
        model, meta = load_model(model_dir)
        meta = {**meta, "path": str(model_dir)}
        return cls(model, meta, device=device, guard=load_guard(model_dir, meta), **kw)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> normalised batch on the model's device."""
        return self.place(torch.stack([self.transform(img) for img in images]))

    def view(self, image: Image.Image) -> np.ndarray:
        """The image as this model reads it, uint8 (S, S, 3): `transform` of it gives what `transform` of the
        image gives (Pillow leaves an image already at size as it is), for a few kilobytes."""
        return np.asarray(self.geometry(image), dtype=np.uint8)

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """A transformed batch on the model's device, in the model's memory format."""
        return input_to_device(x, self.device, self.channels_last)

    @torch.inference_mode()
    def forward_batch(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw logits (N, C) and the tapped features (N, D), or None without taps; float32 on the CPU."""
        with autocast(self.device, self.amp):
            logits, feats = self.forward(x)
        return logits.float().cpu().numpy(), (feats.float().cpu().numpy() if self.taps is not None else None)

    def predict_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities (N, C), float32 on the CPU."""
        logits, _ = self.forward_batch(x)
        return torch.from_numpy(softmax(logits, self.temperature).astype(np.float32))

    def lowlevel(self, images: Sequence[Image.Image]) -> np.ndarray | None:
        """The guard's low-level statistics of each image, or None when it reads none."""
        return lowlevel_images(images, self.lowlevel_size) if self.lowlevel_size else None

    def score_batch(
        self, x: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None, low: np.ndarray | None = None
    ) -> BatchScores:
        """Everything a verdict needs for a transformed batch; `sizes` are the original (width, height) and
        `low` the images' low-level statistics (`lowlevel`)."""
        if self.lowlevel_size and low is None:
            raise ValueError("this model's guard reads low-level statistics: pass low=predictor.lowlevel(images)")
        logits, feats = self.forward_batch(x)
        return self.scores(logits, join_features(feats, low), sizes)

    def scores(
        self, logits: np.ndarray, feats: np.ndarray | None, sizes: Sequence[tuple[int, int]] | None
    ) -> BatchScores:
        """Calibrated and raw P(ai), and the guard's answer, from a forward pass's outputs (`feats`: the
        tapped features joined with the low-level statistics)."""
        probs = softmax(logits, self.temperature)[:, self.ai_index]
        raw = softmax(logits)[:, self.ai_index]
        if self.guard is None:
            n = len(logits)
            return BatchScores(probs, raw, [None] * n, [None] * n, [""] * n)
        in_domain, score, reasons = self.guard.check(feats, sizes)
        return BatchScores(probs, raw, [bool(v) for v in in_domain], [float(v) for v in score], reasons)

    @property
    def members(self) -> list[Predictor]:
        return [self]

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def device(self) -> torch.device:
        return self._device

    def combine(self, per_member: Sequence[BatchScores]) -> BatchScores:
        return per_member[0]


class Ensemble(Scorer):
    """Several models as one: the mean of the members' calibrated P(ai), in domain only where every member's
    guard says so, answered with the ensemble's own operating points and band when it has them (an ensemble
    folder calibrated by `deepfake calibrate`), else with the first member's (several --model flags)."""

    def __init__(
        self,
        members: Sequence[Predictor],
        spec: dict[str, Any] | None = None,
        operating_point: str | float | None = None,
        name: str | None = None,
    ):
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = common_classes([(m.version, m.classes) for m in members])
        self._members = list(members)
        self.spec = spec or {}
        self.classes = first
        trust = self.spec.get("trust") or {}
        if trust.get("operating_points"):
            self.operating_points: dict[str, Any] = trust["operating_points"]
            self.band = tuple(trust.get("band", DEFAULT_BAND))
        else:
            self.operating_points = members[0].operating_points
            self.band = members[0].band
        self.op = parse_operating_point(operating_point, self.operating_points)
        names = [m.version for m in members]
        self.version = f"{name}=ensemble(" + "+".join(names) + ")" if name else ensemble_version(names)
        self.meta = {**self.spec, "classes": first, "path": self.spec.get("path")}
        self.temperature = 1.0  # each member's own temperature is applied before the mean

    @property
    def members(self) -> list[Predictor]:
        return self._members

    @property
    def guard(self) -> Any:
        return None if any(m.guard is None for m in self._members) else [m.guard for m in self._members]


@dataclass
class BatchScores:
    """Per image: calibrated and raw P(ai), the guard's answer (None without a guard) and why; `errors` holds
    a file's failure ('' when fine; its P(ai) is NaN) where the images came from files (evaluation)."""

    prob_ai: np.ndarray
    prob_ai_raw: np.ndarray
    in_domain: list[bool | None]
    domain_score: list[float | None]
    reasons: list[str]
    errors: list[str] = field(default_factory=list)


def combine_scores(per_model: Sequence[BatchScores]) -> BatchScores:
    """An ensemble's scores: the mean of the members' calibrated (and raw) P(ai); in domain only where every
    member says so (None if any member has no guard); the largest domain score; the first error of any."""
    if len(per_model) == 1:
        return per_model[0]
    doms = zip(*(s.in_domain for s in per_model))
    scores = zip(*(s.domain_score for s in per_model))
    return BatchScores(
        np.mean([s.prob_ai for s in per_model], axis=0),
        np.mean([s.prob_ai_raw for s in per_model], axis=0),
        [None if None in d else all(d) for d in doms],
        [None if None in sc else max(sc) for sc in scores],
        ["; ".join(dict.fromkeys(r for r in rs if r)) for rs in zip(*(s.reasons for s in per_model))],
        [next((e for e in es if e), "") for es in zip(*(s.errors for s in per_model))],
    )


class _LogitsOnly(nn.Module):
    """The plain classifier with TappedNet's output shape (logits, empty features), so one path serves both."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, logits.new_zeros((x.shape[0], 0))


def score_images(predictors: Sequence[Predictor], images: Sequence[Image.Image], combine: Any = None) -> BatchScores:
    """One model's scores, or an ensemble's (`combine_scores`, or the given `combine`)."""
    sizes = [original_size(img) for img in images]  # the guard's size envelope: the file's, not the decode's
    per = [p.score_batch(p.preprocess(images), sizes, p.lowlevel(images)) for p in predictors]
    return (combine or combine_scores)(per)


def join_features(feats: np.ndarray | None, low: np.ndarray | None) -> np.ndarray | None:
    if feats is None or low is None:
        return feats if low is None else low
    return np.hstack([feats, low])


def load_guard(model_dir: str | Path, meta: dict[str, Any]) -> DomainGuard | None:
    """The folder's fitted guard, or None when it has none (answers then say in_domain: null)."""
    spec = (meta.get("trust") or {}).get("guard")
    return DomainGuard.load(model_dir, spec) if spec else None


def jit_module(model: nn.Module, image_size: int, channels_last: bool = True) -> nn.Module:
    """The model traced and frozen (BatchNorm folded) for CPU inference, or `model` itself if that fails.

    Why: an eager forward takes the GIL for every one of its ~250 ops, so next to a busy event loop (a Serve
    replica under load) it waits on the GIL over and over: 84 against 16 ms per image at 64 px with one
    Python thread spinning beside it. The traced graph runs in C++ without the GIL (12.6 ms/img beside the
    same thread, 11.9 alone). torch.jit is deprecated in favour of torch.compile/export, which need a C++
    toolchain at run time; until one of those runs without it, this is the portable way."""
    import logging
    import warnings

    x = input_to_device(torch.zeros(2, 3, image_size, image_size), torch.device("cpu"), channels_last)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=Warning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            return torch.jit.freeze(torch.jit.trace(model.eval(), x, check_trace=False))
    except Exception as e:  # noqa: BLE001 - an untraceable model still predicts, only slower under load
        logging.getLogger(__name__).warning("could not trace the model (%s); using it eagerly", e)
        return model


def model_version(meta: dict[str, Any]) -> str:
    """A short, stable model identifier for outputs: arch, creation time and run name."""
    run = (meta.get("config") or {}).get("train", {}).get("name") or ""
    created = str(meta.get("created", "")).replace(":", "").replace("-", "")[:15]
    return "-".join(p for p in (meta.get("arch", "model"), run, created) if p)


def ensemble_version(predictors: Sequence[Predictor] | Sequence[str]) -> str:
    """The identifier of one model, or of an ensemble: its members' in order."""
    names = [p if isinstance(p, str) else p.version for p in predictors]
    return names[0] if len(names) == 1 else "ensemble(" + "+".join(names) + ")"


def load_scorer(
    model_dirs: str | Path | Sequence[str | Path],
    device: str | torch.device = "auto",
    operating_point: str | float | None = None,
    **kw: Any,
) -> Predictor | Ensemble:
    """What a model argument names, loaded: one model folder (a Predictor), an ensemble folder (its members
    and its own trust settings) or several folders (an ad-hoc ensemble with the first one's operating point)."""
    from deepfake.checkpoint import CheckpointError, is_ensemble, read_ensemble

    dirs = [model_dirs] if isinstance(model_dirs, (str, Path)) else list(model_dirs)
    if not dirs:
        raise CheckpointError("no model folder given")
    if len(dirs) == 1 and is_ensemble(dirs[0]):
        spec = read_ensemble(dirs[0])
        members = [Predictor.from_dir(d, device=device, **kw) for d in spec["member_dirs"]]
        try:
            return Ensemble(members, spec, operating_point, name=Path(spec["path"]).name)
        except ValueError as e:
            raise CheckpointError(f"{dirs[0]}: {e}") from None
    if any(is_ensemble(d) for d in dirs):
        raise CheckpointError("an ensemble folder cannot be combined with other --model folders; make one ensemble")
    predictors = [Predictor.from_dir(d, device=device, operating_point=operating_point, **kw) for d in dirs]
    if len(predictors) == 1:
        return predictors[0]
    try:
        return Ensemble(predictors, None, operating_point)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def common_classes(named: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """The class list that every model shares (name, classes), or CheckpointError naming the one that differs:
    probabilities of differently ordered classes cannot be averaged."""
    from deepfake.checkpoint import CheckpointError

    first = list(named[0][1])
    for name, classes in named[1:]:
        if list(classes) != first:
            raise CheckpointError(f"{name}: classes {list(classes)} differ from {first}; cannot average them")
    return first


def scorer_info(model_dirs: str | Path | Sequence[str | Path]) -> dict[str, Any]:
    """What `load_scorer` would build, read from the folders' metadata alone (no weights), so a command fails
    fast and knows the version it will write before starting Ray: `version`, `operating_points`, member `metas`."""
    from deepfake.checkpoint import CheckpointError, is_ensemble, read_ensemble, read_metadata

    dirs = [model_dirs] if isinstance(model_dirs, (str, Path)) else list(model_dirs)
    if not dirs:
        raise CheckpointError("no model folder given")
    if len(dirs) == 1 and is_ensemble(dirs[0]):
        spec = read_ensemble(dirs[0])
        metas = [read_metadata(d) for d in spec["member_dirs"]]
        names = "+".join(model_version(m) for m in metas)
        ops = (spec.get("trust") or {}).get("operating_points") or (metas[0].get("trust") or {}).get("operating_points")
        return {"version": f"{Path(spec['path']).name}=ensemble({names})", "operating_points": ops, "metas": metas}
    if any(is_ensemble(d) for d in dirs):
        raise CheckpointError("an ensemble folder cannot be combined with other --model folders; make one ensemble")
    metas = [read_metadata(d) for d in dirs]
    first = common_classes([(str(d), meta["classes"]) for d, meta in zip(dirs, metas)])
    if "ai" not in first:
        raise CheckpointError(f"{dirs[0]}: the model has no 'ai' class ({first})")
    return {
        "version": ensemble_version([model_version(m) for m in metas]),
        "operating_points": (metas[0].get("trust") or {}).get("operating_points"),
        "metas": metas,
    }


def throughput(scorer: Scorer, images: int = 512, batch_size: int = 64, side: int = 32) -> dict[str, Any]:
    """In-process images/s of a scorer on CIFAKE-sized inputs (decoded RGB images of `side` px, everything a
    verdict needs: resize, normalise, forward(s), guard, answer), after one warm-up batch."""
    import time

    rng = np.random.default_rng(0)
    batch = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(batch_size)]
    scorer.predict_images(batch)
    n, t0 = 0, time.perf_counter()
    while n < images:
        scorer.predict_images(batch)
        n += batch_size
    dt = time.perf_counter() - t0
    return {
        "images_per_s": n / dt,
        "ms_per_image": 1000 * dt / n,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "images": n,
    }

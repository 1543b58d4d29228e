"""Grad-CAM explanations: which parts of an image pushed the detector towards a class.

One batched forward + backward per `batch_size` images (pytorch_grad_cam.GradCAM), on a private copy of
the predictor's model: Grad-CAM hooks the model it is given and needs gradients, so the copy keeps it out
of the way of inference running in the same process (the server). Heatmaps come back at each input
image's own size, mapped through the model's resize + centre crop; the parts the crop cut away are 0.
"""

from __future__ import annotations

import copy
import io
import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from tqdm import tqdm

from deepfake.config import ConfigError
from deepfake.inference import Predictor, Scorer

log = logging.getLogger(__name__)

# A 1x1 feature map (B0's conv_head at 32 px) gives a constant, meaningless CAM: Grad-CAM then falls back
# to the deepest stage whose map has at least this many cells per side.
MIN_CAM_SIDE = 4
CONTACT_SHEET_MAX = 64  # overlays shown on one contact sheet; every image still gets its own files


@dataclass
class Explanation:
    label: str  # class at the operating threshold
    prob_ai: float  # calibrated
    target: str  # class the CAM explains
    cam: np.ndarray  # float32 (H, W) in [0, 1] at the original image's size
    overlay: Image.Image  # RGB heatmap overlay at the original image size
    answer: dict = field(default_factory=dict)  # the Predictor's full answer: verdict, reason, in_domain, ...

    @property
    def verdict(self) -> str:
        return self.answer.get("verdict", self.label)


@dataclass
class _CamModel:
    model: nn.Module
    layer: nn.Module
    layer_name: str
    feature_size: tuple[int, int]
    lock: threading.Lock


_CAM_MODELS: weakref.WeakKeyDictionary[Predictor, _CamModel] = weakref.WeakKeyDictionary()
_CAM_MODELS_LOCK = threading.Lock()


def _candidate_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Deepest first: timm's conv_head, then its stages (blocks), else every Conv2d from the end."""
    names = {id(m): n for n, m in model.named_modules()}
    out: list[nn.Module] = []
    head = getattr(model, "conv_head", None)
    if isinstance(head, nn.Conv2d):
        out.append(head)
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks):
        out += list(reversed(list(blocks)))
    if not out:
        out = [m for m in model.modules() if isinstance(m, nn.Conv2d)][::-1]
    if not out:
        raise ValueError(f"{type(model).__name__} has no convolutional layer for Grad-CAM")
    return [(names.get(id(m), "?"), m) for m in out]


def pick_target_layer(model: nn.Module, image_size: int, min_side: int = MIN_CAM_SIDE) -> tuple[str, nn.Module, tuple]:
    """The last convolutional stage whose feature map at `image_size` is at least `min_side` wide
    (conv_head at 224 px); the deepest one when none is. Returns (name, module, (h, w))."""
    candidates = _candidate_layers(model)
    sizes: dict[int, tuple[int, int]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _i, o: sizes.__setitem__(id(mod), tuple(o.shape[-2:])))
        for _, m in candidates
    ]
    param = next(model.parameters())
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
    for name, m in candidates:
        if min(sizes.get(id(m), (0, 0))) >= min_side:
            return name, m, sizes[id(m)]
    name, m = candidates[0]
    return name, m, sizes.get(id(m), (0, 0))


def cam_model(predictor: Predictor) -> _CamModel:
    """The predictor's private Grad-CAM copy (made once): only the target layer keeps trainable weights,
    so backward stops there instead of running down to the input."""
    with _CAM_MODELS_LOCK:
        cached = _CAM_MODELS.get(predictor)
        if cached is not None:
            return cached
        model = copy.deepcopy(predictor.model).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        name, layer, size = pick_target_layer(model, predictor.image_size)
        for p in layer.parameters():
            p.requires_grad_(True)
        log.debug("Grad-CAM layer %s (%sx%s at %s px)", name, *size, predictor.image_size)
        cached = _CamModel(model, layer, name, size, threading.Lock())
        _CAM_MODELS[predictor] = cached
        return cached


def map_cam_to_image(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """Undo the eval transform (shorter side resized, centre square cropped): the CAM covers the central
    min(W, H) square of the original image; the cropped-away margins get 0."""
    side = min(width, height)
    square = cv2.resize(np.asarray(cam, dtype=np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((height, width), dtype=np.float32)
    top, left = int(round((height - side) / 2)), int(round((width - side) / 2))
    out[top : top + side, left : left + side] = square
    return np.clip(out, 0.0, 1.0)


def overlay_image(image: Image.Image, cam: np.ndarray, image_weight: float = 0.5) -> Image.Image:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, cam, use_rgb=True, image_weight=image_weight))


def overlay_png(image: Image.Image, cam: np.ndarray) -> bytes:
    """PNG of `image` under its heatmap; `cam` at the model's input size (`view_cams`) or the image's."""
    full = cam if cam.shape == (image.height, image.width) else map_cam_to_image(cam, image.width, image.height)
    buf = io.BytesIO()
    overlay_image(image, full).save(buf, format="PNG")
    return buf.getvalue()


def _target_index(classes: Sequence[str], target: str | None) -> int | None:
    if target is None:
        return None
    if target not in classes:
        raise ConfigError(f"target {target!r} is not a class of this model (classes: {list(classes)})")
    return list(classes).index(target)


def model_views(scorer: Scorer, image: Image.Image) -> list[np.ndarray]:
    """The image as each member of `scorer` reads it (`Predictor.view`): all Grad-CAM needs of it, so the
    server ships these few kilobytes to its Explainer, never the decoded image."""
    return [m.view(image) for m in scorer.members]


def view_cams(scorer: Scorer, views: Sequence[Sequence[np.ndarray]], targets: Sequence[str]) -> list[np.ndarray]:
    """Grad-CAM of each image, given as its `model_views`, for its target class: float32 (S, S) in [0, 1] at
    the largest member's input size; an ensemble's map is the mean of its members' maps. One batched forward +
    backward per member."""
    if len(views) != len(targets):
        raise ValueError(f"{len(views)} images but {len(targets)} targets")
    if not views:
        return []
    side = scorer.image_size
    maps = [np.zeros((side, side), np.float32) for _ in views]
    wanted = [ClassifierOutputTarget(_target_index(scorer.classes, t)) for t in targets]
    # Grad-CAM needs autograd even when a caller runs under inference_mode/no_grad.
    with torch.inference_mode(False), torch.enable_grad():
        for k, member in enumerate(scorer.members):
            cm = cam_model(member)
            with cm.lock, GradCAM(model=cm.model, target_layers=[cm.layer]) as cam:
                x = member.preprocess([Image.fromarray(v[k]) for v in views]).clone()  # a normal tensor
                cams = cam(input_tensor=x, targets=wanted)
                cam.outputs = None  # drop the autograd graph now, not at the next batch
            for m, c in zip(maps, cams):
                if c.shape != (side, side):
                    c = cv2.resize(np.asarray(c, np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
                m += c
    return [np.clip(m / len(scorer.members), 0.0, 1.0) for m in maps]


def explain_images(
    predictor: Scorer,
    images: list[Image.Image],
    target: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[Explanation]:
    """Grad-CAM for each RGB image, explaining `target` (a class name) or, by default, the class of the
    scorer's answer (its label at the operating threshold): the verdict with its guard (one forward), then
    `view_cams` per batch of `batch_size` images, each map brought back to its image's own size."""
    if not images:
        return []
    if target is not None:
        _target_index(predictor.classes, target)  # a bad class name fails before any work
    out: list[Explanation] = []
    with tqdm(total=len(images), unit="img", desc="explain", disable=not progress, mininterval=2) as bar:
        for start in range(0, len(images), max(1, batch_size)):
            chunk = images[start : start + max(1, batch_size)]
            answers = predictor.predict_images(chunk)
            targets = [target or a["label"] for a in answers]
            cams = view_cams(predictor, [model_views(predictor, img) for img in chunk], targets)
            for img, cam, a, t in zip(chunk, cams, answers, targets):
                full = map_cam_to_image(cam, img.width, img.height)
                out.append(
                    Explanation(
                        label=a["label"],
                        prob_ai=a["prob_ai"],
                        target=t,
                        cam=full,
                        overlay=overlay_image(img, full),
                        answer=a,
                    )
                )
            bar.update(len(chunk))
    return out


def unique_stems(names: Sequence[str]) -> list[str]:
    """File stems for output names; repeated stems get _1, _2, ... so nothing is overwritten."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        stem = Path(n).stem or "image"
        k = seen.get(stem, 0)
        seen[stem] = k + 1
        out.append(stem if k == 0 else f"{stem}_{k}")
    return out


def write_explanations(expls: Sequence[Explanation], names: Sequence[str], out_dir: str | Path) -> dict:
    """Per image `<stem>_overlay.png` + `<stem>_cam.npy`, and `contact_sheet.png` (overlays with captions)."""
    if len(expls) != len(names):
        raise ValueError(f"{len(expls)} explanations but {len(names)} names")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for e, stem, name in zip(expls, unique_stems(names), names):
        e.overlay.save(out / f"{stem}_overlay.png")
        np.save(out / f"{stem}_cam.npy", e.cam.astype(np.float32))
        rows.append(
            {"name": str(name), "stem": stem, **e.answer, "label": e.label, "prob_ai": e.prob_ai, "target": e.target}
        )
    sheet = write_contact_sheet(expls, [r["stem"] for r in rows], out / "contact_sheet.png") if expls else None
    return {"out_dir": str(out), "images": rows, "contact_sheet": str(sheet) if sheet else None}


def write_contact_sheet(expls: Sequence[Explanation], stems: Sequence[str], path: Path, cols: int = 6) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = list(zip(expls, stems))[:CONTACT_SHEET_MAX]
    if len(expls) > CONTACT_SHEET_MAX:
        log.info("contact sheet shows the first %d of %d images", CONTACT_SHEET_MAX, len(expls))
    cols = min(cols, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (e, stem) in zip(axes.flat, shown):
        ax.imshow(e.overlay)
        ax.set_title(f"{stem[:18]}\n{e.verdict} p(ai)={e.prob_ai:.2f}", fontsize=7)
    fig.suptitle("Grad-CAM (red: evidence for the explained class)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

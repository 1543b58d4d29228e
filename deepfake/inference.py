"""Inference on a trained model folder: the one preprocessing + forward path that predict, evaluate,
explain and the server all use, so a verdict never depends on which entry point produced it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from deepfake.checkpoint import load_model
from deepfake.model import autocast, input_to_device, pick_device, to_device
from deepfake.transforms import build_transform


class Predictor:
    """A loaded model plus its own eval transform (size, interpolation, mean/std from its metadata)."""

    def __init__(
        self,
        model: nn.Module,
        meta: dict[str, Any],
        device: str | torch.device = "auto",
        amp: str = "auto",
        channels_last: bool = True,
        jit: bool = False,
    ):
        self.device = pick_device(device) if str(device) in ("auto", "true", "false") else torch.device(device)
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.ai_index = self.classes.index("ai")
        self.image_size = int(meta["image_size"])
        self.amp = amp
        self.channels_last = channels_last
        self.model = to_device(model, self.device, channels_last).eval()
        self.transform = build_transform(
            self.image_size,
            tuple(meta["mean"]),
            tuple(meta["std"]),
            train=False,
            interpolation=meta.get("interpolation", "bicubic"),
        )
        self.version = model_version(meta)
        # predict_tensor's module; self.model stays the eager one (Grad-CAM hooks it)
        self.forward: nn.Module = self.model
        if jit and self.device.type == "cpu":
            self.forward = jit_module(self.model, self.image_size, channels_last)

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | torch.device = "auto", **kw) -> Predictor:
        model, meta = load_model(model_dir)
        meta = {**meta, "path": str(model_dir)}
        return cls(model, meta, device=device, **kw)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> normalised batch on the model's device."""
        return self.place(torch.stack([self.transform(img) for img in images]))

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """A transformed batch on the model's device, in the model's memory format."""
        return input_to_device(x, self.device, self.channels_last)

    @torch.inference_mode()
    def predict_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C), float32 on the CPU."""
        with autocast(self.device, self.amp):
            logits = self.forward(x)
        return logits.float().softmax(1).cpu()

    def predict_images(self, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
        probs = self.predict_tensor(self.preprocess(images)).numpy()
        return [self.verdict(p) for p in probs]

    def verdict(self, probs: np.ndarray) -> dict[str, Any]:
        """{label, prob_ai, model}: label is the argmax class (threshold 0.5 for two classes)."""
        return {
            "label": self.classes[int(np.argmax(probs))],
            "prob_ai": float(probs[self.ai_index]),
            "model": self.version,
        }


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

"""Image transforms: the seed's recipe (resize, flip, rotation 10°, normalise) with sizes and statistics
taken from the model's own data config, never copied by hand."""

from __future__ import annotations

import random
from collections.abc import Callable

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


class RandomDownUp:
    """Downscale by a random factor, then back to the original size, with a random resampling filter: the
    detail a resized web image has lost (the 0.5x-downscale robustness row), at the image's own size."""

    FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS, Image.Resampling.BOX)

    def __init__(self, scale: tuple[float, float] = (0.4, 0.9)):
        self.scale = scale

    def __call__(self, img: Image.Image) -> Image.Image:
        f = random.uniform(*self.scale)
        w, h = img.size
        small = img.resize((max(1, round(w * f)), max(1, round(h * f))), random.choice(self.FILTERS))
        return small.resize((w, h), random.choice(self.FILTERS))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"


class RandomCropBack:
    """A random crop of a share of the image's area, resized back to the image's size (a cropped, zoomed
    picture)."""

    def __init__(self, scale: tuple[float, float] = (0.6, 1.0)):
        self.scale = scale

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        side = random.uniform(*self.scale) ** 0.5
        cw, ch = max(1, round(w * side)), max(1, round(h * side))
        x, y = random.randint(0, w - cw), random.randint(0, h - ch)
        return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"


def degradations(p: float) -> Callable:
    """With probability `p`, one of: down-and-up resampling, Gaussian blur, JPEG re-encoding (quality
    30-95), a random crop of 60-100% of the image; the rest of the time the image as it is."""
    return T.RandomApply(
        [
            T.RandomChoice(
                [
                    RandomDownUp((0.4, 0.9)),
                    v2.GaussianBlur(kernel_size=5, sigma=(0.3, 1.3)),
                    v2.JPEG(quality=(30, 95)),
                    RandomCropBack((0.6, 1.0)),
                ]
            )
        ],
        p=p,
    )


def eval_geometry(image_size: int, interpolation: str = "bicubic") -> Callable:
    """PIL RGB -> the square PIL image the model reads: the shorter side resized to `image_size` (aspect ratio
    kept, so photos are not squashed), then the centre square cropped."""
    interp = _INTERPOLATION.get(interpolation, T.InterpolationMode.BICUBIC)
    return T.Compose([T.Resize(image_size, interpolation=interp, antialias=True), T.CenterCrop(image_size)])


def build_transform(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    train: bool,
    interpolation: str = "bicubic",
    hflip: bool = True,
    rotation: float = 10.0,
    crop_padding: int = 0,
    degrade: float = 0.0,
) -> Callable:
    """PIL RGB -> normalised tensor. Eval is deterministic (`eval_geometry`, then the tensor); train adds
    degradations before it and shift, flip and rotation after it."""
    ops: list = []
    if train and degrade > 0:  # on the image as stored, before the model's resize, as a degraded input arrives
        ops.append(degradations(degrade))
    ops += eval_geometry(image_size, interpolation).transforms
    if train:
        if crop_padding:
            ops.append(T.RandomCrop(image_size, padding=crop_padding, padding_mode="reflect"))
        if hflip:
            ops.append(T.RandomHorizontalFlip())
        if rotation:
            ops.append(T.RandomRotation(rotation, interpolation=T.InterpolationMode.BILINEAR))
    ops += [T.ToTensor(), T.Normalize(mean=mean, std=std)]
    return T.Compose(ops)

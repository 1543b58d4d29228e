"""Image transforms: the seed's recipe (resize, flip, rotation 10°, normalise) with sizes and statistics
taken from the model's own data config, never copied by hand."""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def build_transform(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    train: bool,
    interpolation: str = "bicubic",
    hflip: bool = True,
    rotation: float = 10.0,
    crop_padding: int = 0,
) -> Callable:
    """PIL RGB -> normalised tensor. Eval is deterministic; train adds shift, flip and rotation.

    Resize keeps the aspect ratio and a centre crop makes it square, so square inputs (CIFAKE) are
    resized exactly as the seed did and other photos are not squashed."""
    interp = _INTERPOLATION.get(interpolation, T.InterpolationMode.BICUBIC)
    ops: list = [T.Resize(image_size, interpolation=interp, antialias=True), T.CenterCrop(image_size)]
    if train:
        if crop_padding:
            ops.append(T.RandomCrop(image_size, padding=crop_padding, padding_mode="reflect"))
        if hflip:
            ops.append(T.RandomHorizontalFlip())
        if rotation:
            ops.append(T.RandomRotation(rotation, interpolation=T.InterpolationMode.BILINEAR))
    ops += [T.ToTensor(), T.Normalize(mean=mean, std=std)]
    return T.Compose(ops)

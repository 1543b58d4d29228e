"""Safe image decoding shared by training, prediction and the server.

Every decoder in the product goes through `decode_image`, so a file is judged the same way everywhere:
bad bytes raise `BadImage` with a reason (never a black stand-in), odd-but-valid modes become 8-bit RGB.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The formats accepted anywhere (Pillow's JPEG reader also takes the multi-picture JPEGs, MPO, that phones
# and cameras write). Pillow knows dozens more (EPS through Ghostscript, PSD, ICO, ...); none is a photo
# format worth the attack surface.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Above this many pixels an image is refused as a likely decompression bomb. PIL's own limit (89 Mpx)
# only warns below twice its value; we refuse at the limit itself.
MAX_PIXELS = 40_000_000

# A large JPEG is decoded straight at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's `draft`) down to
# this short side: the models read at most 128 px and the guard 32, so a 24 Mpx photo costs about what a
# 0.4 Mpx one does instead of a full decode. Any other large image is box-reduced to it after decoding, so what
# a decoded image holds (and what the server ships between its processes) stays small. The header's size is
# kept (`original_size`): the answer, the guard's size envelope and the request budget speak of the file.
DRAFT_MIN_SIDE = 256
ORIGINAL_SIZE = "deepfake_original_size"


class BadImage(ValueError):
    """Bytes that are not a usable image; `reason` is a short, stable tag for reports and HTTP errors."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without clipping 16-bit data or keeping hidden alpha garbage."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(((arr - lo) * scale).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent areas -> white
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, min_side: int | None = DRAFT_MIN_SIDE) -> Image.Image:
    """Decode bytes to an upright RGB image or raise BadImage(reason). An image whose short side is at least
    twice `min_side` comes back reduced by an integer factor, a JPEG decoded so (see DRAFT_MIN_SIDE);
    `original_size` gives the file's size."""
    if not data:
        raise BadImage("empty", "zero bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise BadImage("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        other = _identify(data)
        if other:
            raise BadImage("unsupported_format", f"{other} is not accepted (use {', '.join(FORMATS)})") from None
        raise BadImage("not_an_image", "unrecognised image format") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for junk headers
        raise BadImage(_classify(e, "not_an_image"), str(e)) from None
    if img.width * img.height > max_pixels:
        raise BadImage("decompression_bomb", f"{img.width}x{img.height} exceeds {max_pixels} pixels")
    full = img.size
    try:
        if min_side and img.format in ("JPEG", "MPO") and min(full) >= 2 * min_side:
            img.draft("RGB", (min_side, min_side))
        img.load()
        out = _to_rgb(ImageOps.exif_transpose(img))
        turned = out.size != img.size  # EXIF turned it a quarter: width and height swap
        factor = min(out.size) // min_side if min_side else 1
        if factor >= 2:
            out = out.reduce(factor)  # box filter over factor x factor blocks: cheap, and no aliasing
        out.info[ORIGINAL_SIZE] = (full[1], full[0]) if turned else full
        return out
    except Image.DecompressionBombError as e:
        raise BadImage("decompression_bomb", str(e)) from None
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, ValueError... from the decoders
        raise BadImage(_classify(e, "corrupt"), str(e)) from None


def original_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the file as it is (upright), though `decode_image` may have decoded it smaller."""
    return tuple(img.info.get(ORIGINAL_SIZE, img.size))


def pixel_count(data: bytes) -> int:
    """Width x height from the header alone (nothing is decoded); 0 when it is not an accepted image."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            return img.width * img.height
    except Exception:  # noqa: BLE001 - decode_image will say why
        return 0


def _identify(data: bytes) -> str | None:
    """The format Pillow would read `data` as, from its header alone (nothing is decoded), or None."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:  # noqa: BLE001 - not an image at all
        return None


def _classify(e: Exception, default: str) -> str:
    msg = str(e).lower()
    return "truncated" if ("truncated" in msg or "broken data stream" in msg) else default


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

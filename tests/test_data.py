import io
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deepfake.data import DataError, report, scan, split_samples
from deepfake.images import BadImage, decode_image
from tests.conftest import jpeg_bytes, write_images


def _labels(catalog):
    return dict(catalog.samples["label"].value_counts())


# ------------------------------------------------------------------------------------------ layouts
def test_ai_real_folder(tmp_path):
    write_images(tmp_path / "ai", 3)
    write_images(tmp_path / "real", 4, seed0=100)
    cat = scan(tmp_path, progress=False)
    assert cat.layout == "folder" and _labels(cat) == {"ai": 3, "real": 4}


def test_cifake_layout_nested_and_case_insensitive(tmp_path):
    write_images(tmp_path / "train" / "FAKE" / "sub dir", 2)
    write_images(tmp_path / "train" / "REAL", 3, seed0=50)
    write_images(tmp_path / "unlabelled", 5, seed0=90)  # not under a label folder: ignored
    cat = scan(tmp_path, progress=False)
    assert _labels(cat) == {"ai": 2, "real": 3}
    assert any("sub dir" in r and "(1).jpg" in r for r in cat.samples["ref"])


def test_csv_manifest_with_synonyms_and_relative_paths(tmp_path):
    files = write_images(tmp_path / "imgs", 4)
    pd.DataFrame({"path": [f"imgs/{p.name}" for p in files], "label": ["Fake", "REAL", "ai", "real"]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    cat = scan(tmp_path / "m.csv", progress=False)
    assert cat.layout == "manifest" and _labels(cat) == {"ai": 2, "real": 2}


def test_csv_manifest_errors(tmp_path):
    (tmp_path / "a.csv").write_text("file,kind\nx.jpg,ai\n")
    with pytest.raises(DataError, match="path,label"):
        scan(tmp_path / "a.csv", progress=False)
    (tmp_path / "b.csv").write_text("path,label\nx.jpg,maybe\n")
    with pytest.raises(DataError, match="unknown labels"):
        scan(tmp_path / "b.csv", progress=False)


def test_manifest_missing_file_is_skipped_not_fatal(tmp_path):
    write_images(tmp_path, 2)
    (tmp_path / "m.csv").write_text("path,label\nimg 0 (1).jpg,ai\nimg 1 (1).jpg,real\ngone.jpg,ai\n")
    cat = scan(tmp_path / "m.csv", progress=False)
    assert len(cat.samples) == 2 and list(cat.skipped["reason"]) == ["unreadable"]


def test_tar_gz_read_in_place(tmp_path):
    src = tmp_path / "src"
    write_images(src / "cifake" / "train" / "FAKE", 3)
    write_images(src / "cifake" / "train" / "REAL", 2, seed0=10)
    archive = tmp_path / "d.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifake", arcname="cifake")
    cat = scan(archive, progress=False)
    assert cat.layout == "archive" and _labels(cat) == {"ai": 3, "real": 2}
    assert all("::cifake/train/" in r for r in cat.samples["ref"])
    assert not (tmp_path / "cifake").exists()  # nothing extracted


def test_missing_and_empty_dataset(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan(tmp_path / "nope", progress=False)
    (tmp_path / "ai").mkdir()
    with pytest.raises(DataError, match="no usable labelled images"):
        scan(tmp_path, progress=False)


# ------------------------------------------------------------------------------------------ bad images
def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # 81 Mpx of zeros: a few KB on disk
    return buf.getvalue()


def test_bad_image_matrix_is_skipped_counted_and_reported(tmp_path):
    good = write_images(tmp_path / "ai", 2)
    write_images(tmp_path / "real", 2, seed0=7)
    bad = {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg_bytes(3, size=64)[:300], "truncated"),
        "notes.txt": (b"this is not an image at all\n" * 10, "not_an_image"),
        "fake.png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not_an_image"),
        "bomb.png": (_bomb_png(), "decompression_bomb"),
    }
    for name, (data, _) in bad.items():
        (tmp_path / "ai" / name).write_bytes(data)
    cat = scan(tmp_path, progress=False)
    assert len(cat.samples) == 4
    reasons = {r.split("/")[-1]: reason for r, reason in zip(cat.skipped["ref"], cat.skipped["reason"])}
    assert reasons == {name: reason for name, (_, reason) in bad.items()}
    rep = report(cat)
    assert rep["skipped"] == 5 and rep["skipped_by_reason"]["not_an_image"] == 2
    assert {row["ref"].split("/")[-1] for row in rep["skipped_files"]} == set(bad)
    assert str(good[0]) in set(cat.samples["ref"])


@pytest.mark.parametrize("reason, data", [("empty", b""), ("not_an_image", b"<html>")])
def test_decode_raises_with_reason(reason, data):
    with pytest.raises(BadImage) as e:
        decode_image(data)
    assert e.value.reason == reason


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA", "PPM", "EPS"])
def test_formats_outside_the_allow_list_are_refused_by_name(fmt):
    data = _encode(Image.new("RGB", (16, 16), (200, 30, 30)), fmt)
    with pytest.raises(BadImage) as e:
        decode_image(data)
    assert e.value.reason == "unsupported_format" and fmt in str(e.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_allowed_formats_decode(fmt):
    assert decode_image(_encode(Image.new("RGB", (16, 16), (200, 30, 30)), fmt)).size == (16, 16)


# ------------------------------------------------------------------------------------------ odd modes
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_grayscale_palette_cmyk_become_rgb():
    gray = decode_image(_encode(Image.new("L", (8, 8), 77), "PNG"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    pal = Image.new("RGB", (8, 8), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert decode_image(_encode(pal, "PNG")).getpixel((1, 1)) == (200, 10, 10)
    cmyk = decode_image(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    r, g, b = cmyk.getpixel((2, 2))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_rgba_transparent_goes_white_not_black():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    img.putpixel((0, 0), (10, 20, 30, 255))
    out = decode_image(_encode(img, "PNG"))
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((5, 5)) == (255, 255, 255)


def test_16bit_png_is_scaled_not_clipped():
    arr = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    out = decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert out.mode == "RGB" and 120 <= out.getpixel((0, 0))[0] <= 135


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_a_large_jpeg_decodes_reduced_and_keeps_its_size():
    """A 2400x1800 photo-like JPEG is decoded at 1/4 scale (short side 450 >= 256: the models read <= 128 px),
    its upright original size kept; rotated by EXIF, that size turns too; a large PNG is reduced after decoding;
    small images stay whole."""
    from skimage import data

    from deepfake.images import DRAFT_MIN_SIDE, original_size

    photo = Image.fromarray(data.astronaut()).resize((2400, 1800), Image.Resampling.BICUBIC)
    jpeg = _encode(photo, "JPEG")
    out = decode_image(jpeg)
    assert out.size == (600, 450) and DRAFT_MIN_SIDE <= min(out.size) < 2 * DRAFT_MIN_SIDE
    assert original_size(out) == (2400, 1800)
    whole = decode_image(jpeg, min_side=None)
    assert whole.size == (2400, 1800) and original_size(whole) == (2400, 1800)
    # the same picture either way, at the models' scale
    a = np.asarray(out.resize((64, 64), Image.Resampling.BICUBIC), dtype=np.float32)
    b = np.asarray(whole.resize((64, 64), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(a - b).mean() < 4.0
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    turned = decode_image(_encode(photo, "JPEG", exif=exif.tobytes()))
    assert turned.size == (450, 600) and original_size(turned) == (1800, 2400)
    png = decode_image(_encode(photo, "PNG"))  # decoded whole, then box-reduced by 1800 // 256 = 7
    assert png.size == (343, 258) and original_size(png) == (2400, 1800)
    c = np.asarray(png.resize((64, 64), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(c - b).mean() < 4.0
    small = decode_image(_encode(photo.resize((500, 375)), "JPEG"))  # short side < 2 x 256: whole
    assert small.size == (500, 375) and original_size(small) == (500, 375)


# ------------------------------------------------------------------------------------------ split
def _toy_samples(n_per_class=50, dup_groups=5):
    rows = []
    for label in ("ai", "real"):
        for i in range(n_per_class):
            sha = f"{label}-{i}"
            rows.append((f"/{label}/{i}.jpg", label, sha, 100))
            if i < dup_groups:
                rows += [(f"/{label}/{i}-copy{k}.jpg", label, sha, 100) for k in range(2)]
    return pd.DataFrame(rows, columns=["ref", "label", "sha256", "bytes"])


def test_split_is_deterministic_and_order_independent():
    s = _toy_samples()
    a = split_samples(s, 0.2, 0.1, seed=3)
    b = split_samples(s.sample(frac=1, random_state=1), 0.2, 0.1, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = split_samples(s, 0.2, 0.1, seed=4)
    assert not a["split"].equals(c.set_index("ref").loc[a["ref"], "split"].reset_index(drop=True))


def test_split_keeps_duplicates_together_and_stratifies():
    s = _toy_samples()
    out = split_samples(s, 0.2, 0.1, seed=0)
    assert (out.groupby("sha256")["split"].nunique() == 1).all()
    counts = out.groupby(["split", "label"])["sha256"].nunique().unstack()
    assert counts.loc["val", "ai"] == counts.loc["val", "real"] == 10
    assert counts.loc["test", "ai"] == counts.loc["test", "real"] == 5
    assert len(out) == len(s)


def test_split_cap_and_bad_ratios():
    out = split_samples(_toy_samples(dup_groups=0), 0.1, 0.1, max_per_class=20)
    assert out["label"].value_counts().to_dict() == {"ai": 20, "real": 20}
    with pytest.raises(DataError, match="ratios"):
        split_samples(_toy_samples(), 0.6, 0.5)


def test_real_duplicates_from_files_stay_together(tmp_path):
    write_images(tmp_path / "ai", 30)
    write_images(tmp_path / "real", 30, seed0=1000)
    for i in range(5):  # byte-identical copies under other names
        (tmp_path / "ai" / f"copy {i}.jpg").write_bytes((tmp_path / "ai" / f"img {i} (1).jpg").read_bytes())
    cat = scan(tmp_path, progress=False)
    out = split_samples(cat.samples, 0.3, 0.3)
    rep = report(cat, out)
    assert rep["duplicate_groups"] == 5 and rep["duplicate_images"] == 10
    assert (out.groupby("sha256")["split"].nunique() == 1).all()


def test_random_shift_moves_pixels_without_resampling_them():
    import torch

    from deepfake.transforms import build_transform

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    tf = build_transform(32, (0, 0, 0), (1, 1, 1), train=True, hflip=False, rotation=0, crop_padding=4)
    values = set(np.unique(np.asarray(img)).tolist())
    torch.manual_seed(0)
    outs = [tf(img) for _ in range(8)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # it does shift
    for o in outs:  # every output pixel is an input pixel: reflect padding, no interpolation
        assert set(np.unique((o * 255).round().to(torch.uint8).numpy()).tolist()) <= values
    plain = build_transform(32, (0, 0, 0), (1, 1, 1), train=False, crop_padding=4)
    assert torch.equal(plain(img), plain(img))  # evaluation never shifts


def test_degradations_lower_detail_and_keep_the_size():
    """The robustness augmentation: each kind changes the image, keeps its size, and eval never applies it."""
    import random

    import torch

    from deepfake.transforms import RandomCropBack, RandomDownUp, build_transform, degradations

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    arr = np.asarray(img, dtype=np.float64)

    def detail(a: np.ndarray) -> float:  # high-frequency energy: mean absolute difference of neighbours
        return float(np.abs(np.diff(a, axis=1)).mean())

    random.seed(0)
    for kind in (RandomDownUp((0.5, 0.5)), RandomCropBack((0.6, 0.6))):
        out = kind(img)
        assert out.size == img.size and detail(np.asarray(out, dtype=np.float64)) < 0.8 * detail(arr)
    outs = [degradations(1.0)(img) for _ in range(40)]
    assert all(o.size == img.size for o in outs)
    assert all(not np.array_equal(np.asarray(o), np.asarray(img)) for o in outs)
    tf = build_transform(64, (0, 0, 0), (1, 1, 1), train=False, degrade=1.0)
    assert torch.equal(tf(img), tf(img))  # evaluation never degrades

"""Shared fixtures: real images made on the fly, the shipped sample, one local Ray for the session."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Ray 2.60 turns token auth on by default; tests start their own clusters and CLIs, so keep them in step.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s, and a run's end takes a few polls to notice: 14 s for a
# 2-epoch run on the small sample against 10 s at 0.2 s (measured 2026-12-03). Tests start a dozen such runs;
# a user's run, minutes long, keeps Ray's default (polling less often leaves the training threads more CPU).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network: the hub path must fail fast

from deepfake.data import SAMPLE_DIR  # noqa: E402


def jpeg_bytes(seed: int = 0, size: int = 32, mode: str = "RGB", quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_images(folder: Path, n: int, seed0: int = 0, name: str = "img {i} (1).jpg") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / name.format(i=i)
        p.write_bytes(jpeg_bytes(seed0 + i))
        out.append(p)
    return out


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct ports free now, drawn from 20000-32767: above Ray's worker ports (10002-19999) and below the
    kernel's ephemeral range (32768-60999), where the many processes Ray starts take their own ports, so a port
    chosen here is not taken by one of them before the server under test binds it."""
    import random
    import socket

    chosen: list[int] = []
    for port in random.sample(range(20000, 32768), 400):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == n:
            return chosen
    raise RuntimeError(f"no {n} free ports in 20000-32767")


def tcp_listeners() -> dict[int, tuple[str, int]]:
    """Every listening TCP socket on the machine: socket inode -> (local address, port), from /proc/net/tcp and
    tcp6 (0.0.0.0 and :: included; an IPv4-mapped IPv6 address is given as IPv4)."""
    import ipaddress

    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            addr, hexport = fields[1].split(":")
            raw = bytes.fromhex(addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            ip = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
            ip = getattr(ip, "ipv4_mapped", None) or ip
            found[int(fields[9])] = (str(ip), int(hexport, 16))
    return found


def listeners_of(pids) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets these processes listen on (their fds that are listening sockets)."""
    table, found = tcp_listeners(), set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in table:
                found.add(table[int(target[8:-1])])
    return found


def is_loopback(address: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(address).is_loopback


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture()
def small_sample(tmp_path: Path) -> Path:
    """A copy of 60 + 60 shipped CIFAKE images: real pictures, small enough for a quick Ray Train run."""
    dst = tmp_path / "data"
    for label in ("REAL", "FAKE"):
        (dst / label).mkdir(parents=True)
        for p in sorted((SAMPLE_DIR / label).iterdir())[:60]:
            shutil.copy(p, dst / label / p.name)
    return dst


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole session (worker start-up is the slow part)."""
    import ray

    from deepfake.cluster import connect, disconnect

    connect("local", num_cpus=2)
    yield ray
    disconnect()


def train_small_model(out_dir: Path, epochs: int = 3, image_size: int = 32, seed: int = 0) -> Path:
    """A genuinely fine-tuned model folder, trained in-process (no Ray) on the shipped sample in seconds."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from deepfake import checkpoint as ck
    from deepfake.config import Config
    from deepfake.data import scan, split_samples
    from deepfake.labels import CLASSES
    from deepfake.loop import build_optimizer, make_datasets, train_one_epoch
    from deepfake.model import create_model, data_config

    torch.manual_seed(seed)
    cfg = Config()
    cfg.data.image_size = image_size
    cfg.train.lr = 2e-3
    cat = scan(SAMPLE_DIR, progress=False)
    split = split_samples(cat.samples, 0.1, 0.1)
    splits = {n: (g["ref"].tolist(), g["label"].tolist()) for n, g in split.groupby("split")}
    ds = make_datasets(cfg, splits)
    model = create_model(cfg.model)
    opt = build_optimizer(model, cfg)
    loader = DataLoader(ds["train"], batch_size=32, shuffle=True, drop_last=True)
    for epoch in range(epochs):
        train_one_epoch(model, loader, opt, None, nn.CrossEntropyLoss(), torch.device("cpu"), "off", epoch=epoch)
    dc = data_config(cfg.model.arch)
    meta = ck.build_metadata(
        cfg.model, image_size, dc["mean"], dc["std"], dc["interpolation"], CLASSES, config=cfg.to_dict(), metrics={}
    )
    return ck.save_model(model.eval(), out_dir, meta)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory) -> Path:
    """Session-wide fine-tuned model folder for evaluate / predict / explain / serve tests."""
    return train_small_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def calibrated_model_dir(trained_model_dir, tmp_path_factory) -> Path:
    """The session's model with its trust settings fitted on the shipped sample (temperature, operating
    points, out-of-domain guard), as `deepfake calibrate` writes them."""
    from deepfake.calibrate import calibrate

    d = tmp_path_factory.mktemp("calibrated") / "tiny"
    shutil.copytree(trained_model_dir, d)
    calibrate(d, progress=False, device="cpu")
    return d


def real_photos(size: int | None = None) -> dict[str, Image.Image]:
    """Real photographs that scikit-image ships in its package (300-512 px), optionally downscaled."""
    from skimage import data

    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera"):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        out[name] = img.resize((size, size), Image.Resampling.BICUBIC) if size else img
    return out


@pytest.fixture(scope="session")
def model_zoo(calibrated_model_dir, tmp_path_factory) -> Path:
    """A models folder as a server sees one: `calibrated` (the session's calibrated model), `other` (a second,
    differently trained and calibrated model) and `pair`, an ensemble folder of the two with its own
    operating points (deepfake make-ensemble)."""
    from deepfake.calibrate import calibrate, make_ensemble

    zoo = tmp_path_factory.mktemp("zoo")
    shutil.copytree(calibrated_model_dir, zoo / "calibrated")
    train_small_model(zoo / "other", epochs=1, seed=1)
    calibrate(zoo / "other", progress=False, device="cpu")
    make_ensemble(zoo / "pair", [zoo / "calibrated", zoo / "other"], progress=False, device="cpu")
    return zoo


def timm_probabilities(folder: Path, images: list[Image.Image]):
    """P(output 0) of each image as plain timm gives it: the folder through timm's `local-dir:` loader and
    timm's own data config, nothing of deepfake's."""
    import timm
    import torch

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    tf = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    with torch.no_grad():
        return torch.softmax(model(torch.stack([tf(im) for im in images])), 1)[:, 0].numpy()

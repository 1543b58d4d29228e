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

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=None, logging_level="WARNING")
    yield ray
    ray.shutdown()

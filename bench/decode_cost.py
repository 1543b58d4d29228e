"""What a large image costs to decode, with and without the reduced decode (`deepfake.images.decode_image`:
JPEG draft at 1/2-1/8 scale, other formats box-reduced after decoding), beside a CIFAKE-sized one.

    .venv/bin/python bench/decode_cost.py --out bench/results/decode_cost.json

Prints JSON: per image kind, milliseconds per decode (median of --repeats) and the decoded size, whole and
reduced; how much a process's peak resident memory (VmHWM, reset first) grows to decode the 24 Mpx JPEG each
way (Linux).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from report import emit  # noqa: E402 - bench/report.py, next to this script

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deepfake.images import decode_image  # noqa: E402

PEAK = (
    "import sys; sys.path.insert(0, {repo!r}); from deepfake.images import decode_image; "
    "data = open({path!r}, 'rb').read(); kb = lambda k: int(next(x for x in open('/proc/self/status') "
    "if x.startswith(k)).split()[1]); open('/proc/self/clear_refs', 'w').write('5'); before = kb('VmRSS'); "
    "img = decode_image(data, min_side={side}); print(kb('VmHWM') - before)"
)


def photo(width: int, height: int) -> Image.Image:
    """A photograph (scikit-image's astronaut) scaled to the size asked for."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def timed(data: bytes, min_side: int | None, repeats: int) -> dict:
    times, img = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        img = decode_image(data, min_side=min_side)
        times.append(time.perf_counter() - t0)
    return {"ms": round(1000 * float(np.median(times)), 2), "decoded": list(img.size)}


def peak_rss_mb(path: Path, min_side: int | None) -> float:
    code = PEAK.format(repo=str(REPO), path=str(path), side=min_side)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return round(int(out.strip()) / 1024, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args()
    kinds = {
        "cifake_32px_jpeg": encode(photo(32, 32), "JPEG"),
        "photo_0.4mpx_jpeg": encode(photo(750, 500), "JPEG"),
        "photo_12mpx_jpeg": encode(photo(4000, 3000), "JPEG"),
        "photo_24mpx_jpeg": encode(photo(6000, 4000), "JPEG"),
        "photo_12mpx_png": encode(photo(4000, 3000), "PNG"),
    }
    report: dict = {"repeats": args.repeats, "images": {}}
    for name, data in kinds.items():
        report["images"][name] = {
            "bytes": len(data),
            "whole": timed(data, None, args.repeats),
            "reduced": timed(data, 256, args.repeats),
        }
    big = Path("/tmp/decode_cost_24mpx.jpg")
    big.write_bytes(kinds["photo_24mpx_jpeg"])
    report["peak_rss_growth_mb_24mpx_jpeg"] = {"whole": peak_rss_mb(big, None), "reduced": peak_rss_mb(big, 256)}
    small = report["images"]["photo_0.4mpx_jpeg"]["reduced"]["ms"]
    report["reduced_24mpx_over_0.4mpx"] = round(report["images"]["photo_24mpx_jpeg"]["reduced"]["ms"] / small, 2)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What reading provenance adds per request: `read_provenance` on a 4000x3000 JPEG with no metadata, the same
with generator EXIF + XMP, and the same signed with a C2PA manifest (a throw-away test CA), in-process.

    .venv/bin/python bench/provenance_cost.py [--repeats 50] [--out bench/results/provenance_cost.json]

Prints one JSON document: median and p90 milliseconds per file. Goal: <= 2 ms median for a file without any.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from report import emit  # noqa: E402 - bench/report.py, next to this script

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def big_jpeg(**save) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)  # upsampled noise: a photo-sized, photo-like file
    img = Image.fromarray(small).resize((4000, 3000), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def timed(fn, repeats: int) -> dict:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": round(statistics.median(ts), 3), "p90_ms": round(float(np.percentile(ts, 90)), 3)}


def main() -> int:
    from deepfake.provenance import read_provenance
    from tests.test_provenance import XMP_AI, _exif_software, sign, test_ca

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out")
    args = ap.parse_args()
    plain = big_jpeg()
    meta = big_jpeg(exif=_exif_software("Adobe Firefly"), xmp=XMP_AI.encode())
    _, chain, key = test_ca()
    signed = sign(plain, "image/jpeg", chain, key)
    result = {"image": "4000x3000 JPEG q90", "bytes": len(plain)}
    for name, data in (("no_metadata", plain), ("exif_xmp", meta), ("c2pa_signed", signed)):
        rec = read_provenance(data)
        result[name] = {"provenance": rec["provenance"], **timed(lambda d=data: read_provenance(d), args.repeats)}
    result["goal"] = "no_metadata median <= 2 ms"
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the out-of-domain guard and calibration add per image, in-process and through the server.

In-process: the same model folder, the same images and batches, measured interleaved (so a slow moment of
the machine hits both): the plain forward pass (raw softmax, no guard) against the trusted one (tapped
features, guard score, size envelope, temperature, verdict). Through the server: `bench/serve_load.py`
runs the app twice on the same machine, once on a copy of the folder without its trust settings and once
with them, and the req/s and latencies are compared.

    .venv/bin/python bench/trust_cost.py --model models/cifake-b0                 # in-process only
    .venv/bin/python bench/trust_cost.py --model models/cifake-b0 --server        # + two serve_load runs

Prints one JSON document (and writes it with --out). Goal: the guard + calibration cost <= 10% of the
forward pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import emit  # noqa: E402 - bench/report.py, next to this script

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("trust_cost")


def load_images(folder: Path, n: int):
    from deepfake.images import IMAGE_SUFFIXES, decode_image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    return [decode_image(p.read_bytes()) for p in files]


def inprocess(model: str, images, batch: int, repeats: int, threads: int | None) -> dict:
    import torch

    from deepfake.checkpoint import load_model
    from deepfake.inference import Predictor, load_guard

    if threads:
        torch.set_num_threads(threads)
    m, meta = load_model(model)
    if not (meta.get("trust") or {}).get("guard"):
        raise SystemExit(f"{model} has no guard: run deepfake calibrate first")
    plain = Predictor(m, {k: v for k, v in meta.items() if k != "trust"}, device="cpu", jit=True)
    trusted = Predictor(m, meta, device="cpu", jit=True, guard=load_guard(model, meta))
    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]

    def plain_pass(b):  # the forward pass and its softmax: what an answer cost before
        return plain.predict_tensor(plain.preprocess(b))

    def trusted_pass(b):
        return trusted.predict_images(b)

    def forward_only(p):  # the model alone on a transformed batch, no preprocessing
        xs = [p.preprocess(b) for b in batches]
        return lambda: [p.forward_batch(x) for x in xs]

    for fn in (plain_pass, trusted_pass):
        fn(batches[0])
    times = {"plain": [], "trusted": [], "forward_plain": [], "forward_tapped": []}
    fwd_plain, fwd_tapped = forward_only(plain), forward_only(trusted)
    for _ in range(repeats):
        for name, fn in (
            ("plain", lambda: [plain_pass(b) for b in batches]),
            ("trusted", lambda: [trusted_pass(b) for b in batches]),
            ("forward_plain", fwd_plain),
            ("forward_tapped", fwd_tapped),
        ):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    n = len(batches) * batch
    ms = {k: 1000 * float(np.median(v)) / n for k, v in times.items()}
    # the guard's own work alone: low-level statistics of the images, then the scoring (numpy)
    from deepfake.inference import join_features

    _, feats = trusted.forward_batch(trusted.preprocess(batches[0]))
    sizes = [im.size for im in batches[0]]
    t0 = time.perf_counter()
    for _ in range(20):
        low = trusted.lowlevel(batches[0])
    low_ms = 1000 * (time.perf_counter() - t0) / 20 / batch
    joined = join_features(feats, low)
    t0 = time.perf_counter()
    for _ in range(20):
        trusted.guard.check(joined, sizes)
    score_ms = 1000 * (time.perf_counter() - t0) / 20 / batch
    return {
        "images": n,
        "batch": batch,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "ms_per_image": {k: round(v, 3) for k, v in ms.items()},
        "guard_lowlevel_ms_per_image": round(low_ms, 4),
        "guard_scoring_ms_per_image": round(score_ms, 4),
        "overhead_end_to_end": round(ms["trusted"] / ms["plain"] - 1, 4),
        "overhead_forward_taps": round(ms["forward_tapped"] / ms["forward_plain"] - 1, 4),
        "overhead_vs_forward": round((ms["trusted"] - ms["plain"]) / ms["forward_plain"], 4),
        "goal": "overhead_vs_forward <= 0.10",
    }


def server(model: str, clients: str, duration: float) -> dict:
    """Two serve_load runs: the folder without its trust settings, then with them."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "bare"
        shutil.copytree(model, bare)
        from deepfake.calibrate import remove

        remove(bare)
        for name, folder in (("without", bare), ("with", Path(model))):
            res = Path(tmp) / f"{name}.json"
            cmd = [
                sys.executable,
                str(REPO / "bench" / "serve_load.py"),
                "--model",
                str(folder),
                "--clients",
                clients,
                "--duration",
                str(duration),
                "--healthz-seconds",
                "0",
                "--inproc-seconds",
                "2",
                "--out",
                str(res),
            ]
            log.info("serve_load %s trust: %s", name, " ".join(cmd))
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ})
            doc = json.loads(res.read_text())
            out[name] = [
                {
                    "clients": r["clients"],
                    "req_per_s": r["req_per_s"],
                    **r["latency_ms"],
                    "errors": r["errors_by_status"],
                }
                for r in doc.get("runs", [])
            ]
    pairs = list(zip(out["without"], out["with"]))
    out["req_per_s_ratio"] = [round(b["req_per_s"] / a["req_per_s"], 3) for a, b in pairs if a.get("req_per_s")]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "cifake-b0"))
    ap.add_argument("--images", default=str(REPO / "deepfake" / "sample"))
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--server", action="store_true", help="also compare two serve_load runs")
    ap.add_argument("--clients", default="64")
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = {
        "model": args.model,
        "inprocess": inprocess(
            args.model, load_images(Path(args.images), args.n), args.batch, args.repeats, args.threads
        ),
    }
    if args.server:
        result["server"] = server(args.model, args.clients, args.duration)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

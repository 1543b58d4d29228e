"""Grad-CAM throughput: the batched `explain_images` path against the seed's per-image loop (a new
GradCAM per image, batch 1, gradients through the whole network) and against plain inference, on the
same images at the model's input size.

    .venv/bin/python bench/explain_throughput.py --model models/x --size 224   # a model folder
    .venv/bin/python bench/explain_throughput.py --quick                     # tiny trained 32 px + random 224 px

At 32 px the per-call overhead dominates everything; the 224 px run (random weights: speed does not depend
on them) is the fair comparison.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import emit  # noqa: E402 - bench/report.py, next to this script

from deepfake.data import SAMPLE_DIR  # noqa: E402
from deepfake.explain import cam_model, explain_images, map_cam_to_image, overlay_image  # noqa: E402
from deepfake.images import decode_image  # noqa: E402
from deepfake.inference import Predictor  # noqa: E402


def images(n: int, size: int):
    files = sorted((SAMPLE_DIR / "FAKE").iterdir()) + sorted((SAMPLE_DIR / "REAL").iterdir())
    return [decode_image(p.read_bytes()).resize((size, size)) for p in files[:n]]


def seed_loop(predictor: Predictor, imgs) -> None:
    """The seed notebook's way: one GradCAM (hooks on, hooks off) per image, batch 1, full backward."""
    from pytorch_grad_cam import GradCAM

    model = copy.deepcopy(predictor.model).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    layer = dict(model.named_modules())[cam_model(predictor).layer_name]  # same layer as ours: same output
    for img in imgs:
        x = predictor.preprocess([img]).clone()
        with GradCAM(model=model, target_layers=[layer]) as cam:
            heat = cam(input_tensor=x, targets=None)[0]
        overlay_image(img, map_cam_to_image(heat, img.width, img.height))


def timed(fn, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return round(n / best, 1)


def measure(predictor: Predictor, n: int, batch: int, repeats: int) -> dict:
    imgs = images(n, predictor.image_size)
    explain_images(predictor, imgs[:2])  # builds the cached Grad-CAM copy; warms up
    predictor.predict_images(imgs[:2])
    out = {
        "image_size": predictor.image_size,
        "images": n,
        "batch_size": batch,
        "grad_cam_layer": cam_model(predictor).layer_name,
        "feature_map": list(cam_model(predictor).feature_size),
        "batched_explain_img_s": timed(lambda: explain_images(predictor, imgs, batch_size=batch), n, repeats),
        "explain_batch1_img_s": timed(lambda: explain_images(predictor, imgs, batch_size=1), n, repeats),
        "seed_per_image_loop_img_s": timed(lambda: seed_loop(predictor, imgs), n, repeats),
        "plain_inference_img_s": timed(
            lambda: [predictor.predict_images(imgs[i : i + batch]) for i in range(0, n, batch)], n, repeats
        ),
    }
    out["speedup_vs_seed_loop"] = round(out["batched_explain_img_s"] / out["seed_per_image_loop_img_s"], 2)
    out["cost_vs_inference"] = round(out["plain_inference_img_s"] / out["batched_explain_img_s"], 2)
    return out


def random_predictor(size: int) -> Predictor:
    from deepfake.checkpoint import build_metadata
    from deepfake.config import ModelConfig
    from deepfake.labels import CLASSES
    from deepfake.model import create_model, data_config

    torch.manual_seed(0)
    cfg = ModelConfig()
    dc = data_config(cfg.arch)
    meta = build_metadata(cfg, size, dc["mean"], dc["std"], dc["interpolation"], CLASSES)
    return Predictor(create_model(cfg), meta, device="auto")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: train a tiny 32 px one on the shipped sample)")
    ap.add_argument("--n", type=int, default=64, help="images per measurement")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--size", type=int, default=224, help="input size of the random-weight comparison")
    ap.add_argument("--repeats", type=int, default=2, help="best of N")
    ap.add_argument("--quick", action="store_true", help="16 images, one repeat")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "explain_throughput.json"))
    args = ap.parse_args()
    n, repeats = (16, 1) if args.quick else (args.n, args.repeats)
    with tempfile.TemporaryDirectory(prefix="bench_explain_") as tmp:
        model = args.model
        if model is None:
            from tests.conftest import train_small_model

            model = str(train_small_model(Path(tmp) / "model"))
        trained = measure(Predictor.from_dir(model), n, args.batch_size, repeats)
    result = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "fine_tuned_model": trained,
        f"random_weights_{args.size}px": measure(random_predictor(args.size), n, args.batch_size, repeats),
        "goal_speedup": 5.0,
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    emit(result, None if args.quick and args.out == ap.get_default("out") else args.out)


if __name__ == "__main__":
    main()

"""How well a model folder's out-of-domain guard separates its own data from images unlike it.

In domain: the model's validation and test parts (split as in training). Out of domain: a folder or archive
of other images (`../shared/data/ood_dev.tar.gz`: 800 256 px web-style images, never committed), scored
three ways: as given, downscaled to the model's training size (the size check then passes: only the pixels
can tell), and downscaled then JPEG-encoded (as CIFAKE's own images are); plus the photos scikit-image
ships. For each: the share flagged out of domain and the ROC-AUC of the domain score against in-domain
validation images.

    .venv/bin/python bench/ood_guard.py --model models/cifake-b0 --ood ../shared/data/ood_dev.tar.gz

Only the images of `--ood` whose content hash falls in the measurement half are used when the guard was
fitted with outlier exposure on the other half (`--part measure`, the default; `--part all` uses every one).
Prints one JSON document (and writes it with --out).
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from report import emit  # noqa: E402 - bench/report.py, next to this script

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("ood_guard")


def guard_scores(predictor, images: list[Image.Image], batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(in_domain, domain_score) per image, through the Predictor's own path."""
    from deepfake.inference import score_images

    dom, score = [], []
    for i in range(0, len(images), batch):
        s = score_images([predictor], images[i : i + batch])
        dom += s.in_domain
        score += s.domain_score
    return np.array(dom, dtype=bool), np.array(score, dtype=np.float64)


def downscale(img: Image.Image, size: int, jpeg: int | None = None) -> Image.Image:
    small = img.resize((size, size), Image.Resampling.BICUBIC)
    if jpeg is None:
        return small
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=jpeg)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def main() -> int:
    from sklearn.metrics import roc_auc_score

    from deepfake.calibrate import ood_parts
    from deepfake.checkpoint import read_metadata
    from deepfake.data import scan, split_samples
    from deepfake.evaluate import _Reader, data_settings
    from deepfake.images import decode_image
    from deepfake.inference import Predictor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "cifake-b0"))
    ap.add_argument("--ood", required=True, help="folder or archive of out-of-domain images (labels ignored)")
    ap.add_argument("--part", choices=("measure", "all"), default="measure")
    ap.add_argument("--train-size", type=int, default=32, help="the training images' size (CIFAKE: 32)")
    ap.add_argument("--in-domain-max", type=int, default=None, help="cap on validation images (quick runs)")
    ap.add_argument("--out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    meta = read_metadata(args.model)
    predictor = Predictor.from_dir(args.model, device="cpu", jit=True)
    if predictor.guard is None:
        raise SystemExit(f"{args.model} has no guard: run deepfake calibrate first")
    settings = data_settings(meta)
    cat = scan(settings["path"], keep_blobs=True)
    parts = split_samples(
        cat.samples, settings["val_ratio"], settings["test_ratio"], settings["seed"], settings["max_per_class"]
    )
    read = _Reader(cat.blobs)
    result: dict = {"model": args.model, "guard": {k: v for k, v in meta["trust"]["guard"].items() if k != "envelope"}}
    in_scores = {}
    for part in ("val", "test"):
        refs = parts[parts["split"] == part]["ref"].tolist()[: args.in_domain_max]
        dom, score = guard_scores(predictor, [decode_image(read(r)) for r in refs])
        in_scores[part] = score
        result[f"cifake_{part}"] = {"n": len(refs), "flagged": float((~dom).mean())}

    ocat = scan(args.ood, keep_blobs=True)
    oread = _Reader(ocat.blobs)
    orefs = ood_parts(ocat.samples)["measure" if args.part == "measure" else "all"]
    originals = [decode_image(oread(r)) for r in orefs]
    from skimage import data as skdata

    photos = [
        Image.fromarray(getattr(skdata, n)()).convert("RGB")
        for n in ("astronaut", "coffee", "chelsea", "rocket", "camera")
    ]
    variants = {
        "ood_as_given": originals,
        f"ood_{args.train_size}px": [downscale(im, args.train_size) for im in originals],
        f"ood_{args.train_size}px_jpeg90": [downscale(im, args.train_size, 90) for im in originals],
        f"ood_{args.train_size}px_jpeg75": [downscale(im, args.train_size, 75) for im in originals],
        "skimage_photos": photos,
        f"skimage_photos_{args.train_size}px": [downscale(im, args.train_size) for im in photos],
    }
    for name, imgs in variants.items():
        dom, score = guard_scores(predictor, imgs)
        y = np.r_[np.zeros(len(in_scores["val"])), np.ones(len(score))]
        result[name] = {
            "n": len(imgs),
            "flagged": float((~dom).mean()),
            "flagged_by_features_alone": float((score > 1).mean()),
            "roc_auc_domain_score_vs_val": float(roc_auc_score(y, np.r_[in_scores["val"], score])),
        }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

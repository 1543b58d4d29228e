#!/usr/bin/env bash
# Retrain the shipped detector (models/cifake-b0) from the CIFAKE train split with its recorded config, then
# evaluate it on the same validation part (content-hash split) with the robustness sweep and write its card.
#   bench/reproduce_model.sh [DATA] [OUT]
# On a Ray cluster, the same run is one command (add --workers N --use-gpu true to use GPU nodes):
#   deepfake jobs submit train -- --config deepfake/configs/cifake-b0.yaml --data /mnt/shared/cifake_train.tar.gz
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifake_train.tar.gz}
OUT=${2:-models/cifake-b0-repro}
BIN=${DEEPFAKE_BIN:-.venv/bin/deepfake}
"$BIN" train --config deepfake/configs/cifake-b0.yaml --data "$DATA" --out "$OUT" --name "repro-$(date +%Y%m%d-%H%M%S)"
"$BIN" evaluate --model "$OUT" --split val --robustness --update-card -o "$OUT/eval"
"$BIN" card "$OUT" --limitations "Trained and measured only on CIFAKE: 32x32 images, real ones from CIFAR-10 and AI-generated \
ones from one generator (Stable Diffusion 1.4) made to look like CIFAR-10. The validation figures are for that \
distribution. They are not evidence about high-resolution photographs, other generators (newer diffusion models, \
GANs, editing tools), heavy re-compression or resizing beyond the robustness table, or images that are partly \
generated. Inputs of any size are resized to 32x32 first, which throws away most of a large image. Use the \
verdict as a screening signal for CIFAR-like images, not as proof." > /dev/null

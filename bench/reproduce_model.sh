#!/usr/bin/env bash
# Retrain the shipped detector (models/cifake-b0) from the CIFAKE train split with its recorded configs:
# stage 1 (deepfake/configs/cifake-b0.yaml) from random weights, stage 2 (cifake-b0-finetune.yaml) from
# stage 1's weights; then evaluate it on the same validation part (content-hash split) with the robustness
# sweep and write its card (deepfake.jobs.reproduce does all of it).
#   bench/reproduce_model.sh [DATA] [OUT] [train options for every stage...]
# On a Ray cluster, the same run is one command (add --workers N --use-gpu true to use GPU nodes):
#   deepfake jobs submit reproduce -- --data /mnt/shared/cifake_train.tar.gz --out /mnt/shared/models/cifake-b0
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifake_train.tar.gz}
OUT=${2:-models/cifake-b0-repro}
PY=${DEEPFAKE_PYTHON:-.venv/bin/python}
"$PY" -m deepfake.jobs reproduce --data "$DATA" --out "$OUT" "${@:3}"

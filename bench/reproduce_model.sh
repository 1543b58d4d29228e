#!/usr/bin/env bash
# Retrain the shipped detector (models/cifake-b0) from the CIFAKE train split with its recorded config
# (deepfake/configs/cifake-b0-gpu.yaml: 32 epochs at 64 px, 4.6 min on one H200; it needs a GPU), then evaluate
# it on the same validation part (content-hash split) with the robustness sweep and write its card
# (deepfake.stages.reproduce does all of it). `--recipe cpu` runs the 2-stage CPU recipe of the earlier 94.4%
# model instead (cifake-b0.yaml, then cifake-b0-finetune.yaml from its weights; about 2 hours on 2 cores).
#   bench/reproduce_model.sh [DATA] [OUT] [--recipe gpu|cpu] [train options for every stage...]
# On a Ray cluster, the same run is one command (Ray Train on a GPU worker):
#   deepfake jobs submit reproduce -- --data /mnt/shared/cifake_train.tar.gz --out /mnt/shared/models/cifake-b0 --use-gpu true
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifake_train.tar.gz}
OUT=${2:-models/cifake-b0-repro}
PY=${DEEPFAKE_PYTHON:-.venv/bin/python}
"$PY" -m deepfake.stages reproduce --data "$DATA" --out "$OUT" "${@:3}"

"""What each model choice costs per image on this machine: in-process images/s of the whole verdict path
(resize, normalise, the forward pass of every member, guard, calibration, answer) for model and ensemble
folders, each traced as the server and `deepfake predict` run them, interleaved over `--rounds` so that a
slow moment of the VM hits every choice alike. Pair it with each folder's validation accuracy (its card) to
trade accuracy for cost.

    .venv/bin/python bench/model_cost.py models/cifake-b0 models/cifake-lite0 models/cifake-ensemble
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from report import emit  # noqa: E402 - bench/report.py, next to this script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="model or ensemble folders")
    p.add_argument("--images", type=int, default=1024, help="images per measurement")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the core count)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    import torch

    from deepfake.checkpoint import host_info, is_ensemble, read_ensemble, read_metadata
    from deepfake.inference import load_scorer, throughput

    if args.threads:
        torch.set_num_threads(args.threads)
    scorers = {m: load_scorer(m, device="cpu", jit=True) for m in args.models}
    runs: dict[str, list[float]] = {m: [] for m in args.models}
    for _ in range(args.rounds):
        for m, s in scorers.items():
            runs[m].append(throughput(s, args.images, args.batch_size)["images_per_s"])
    out = {}
    for m in args.models:
        meta = read_ensemble(m) if is_ensemble(m) else read_metadata(m)
        acc = (meta.get("metrics") or {}).get("val_accuracy") or (meta.get("metrics") or {}).get("val_acc")
        ips = statistics.median(runs[m])
        out[Path(m).name] = {
            "kind": "ensemble" if is_ensemble(m) else meta["arch"],
            "members": len(scorers[m].members),
            "input_px": scorers[m].image_size,
            "images_per_s": round(ips, 1),
            "ms_per_image": round(1000 / ips, 2),
            "runs_images_per_s": [round(x, 1) for x in runs[m]],
            "val_accuracy": acc,
        }
    result = {
        "host": host_info(),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "images_per_measurement": args.images,
        "input": "32x32 RGB images (CIFAKE's size), decoded",
        "models": out,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()

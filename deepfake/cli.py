"""`deepfake` command line: a thin layer over the stage modules. Settings come from one Config:
defaults <- `--config FILE` <- the flags below <- `--set section.key=value`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from deepfake import config as cfgmod

log = logging.getLogger("deepfake")

# flag -> dotted config key; one table, so the CLI never re-declares defaults of its own
CONFIG_FLAGS: dict[str, tuple[str, type, str]] = {
    "--data": ("data.path", str, "dataset: folder, CSV manifest or .tar.gz (default: the shipped sample)"),
    "--image-size": ("data.image_size", int, "input resolution (224 default; 32-64 for CPU runs)"),
    "--val-ratio": ("data.val_ratio", float, "validation fraction"),
    "--test-ratio": ("data.test_ratio", float, "test fraction"),
    "--max-per-class": ("data.max_per_class", int, "cap images per class"),
    "--arch": ("model.arch", str, "timm architecture"),
    "--pretrained": ("model.pretrained", str, "none | hub | PATH to weights"),
    "--finetune": ("model.finetune", str, "all | last:K"),
    "--stem-stride": ("model.stem_stride", int, "stem convolution stride (1 for 32 px inputs)"),
    "--epochs": ("train.epochs", int, "max epochs"),
    "--batch-size": ("train.batch_size", int, "global batch size"),
    "--optimizer": ("train.optimizer", str, "adamw | adam | sgd | any timm optimizer"),
    "--lr": ("train.lr", float, "learning rate"),
    "--weight-decay": ("train.weight_decay", float, "weight decay"),
    "--scheduler": ("train.scheduler", str, "step | cosine | none"),
    "--patience": ("train.patience", int, "early-stopping patience (0: off)"),
    "--workers": ("train.workers", int, "Ray Train workers"),
    "--use-gpu": ("train.use_gpu", str, "auto | true | false"),
    "--storage-path": ("train.storage_path", str, "Ray run storage (path or s3:// / gs:// URI)"),
    "--name": ("train.name", str, "run name"),
    "--out": ("train.out", str, "model export folder"),
}


def _add_config_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    p.add_argument("--config", help="YAML config (sections data/model/train/tune)")
    for flag, (key, tp, help_) in CONFIG_FLAGS.items():
        if only is None or key.split(".")[0] in only:
            p.add_argument(flag, dest=key, type=tp, default=None, help=help_)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting, e.g. --set train.label_smoothing=0.1",
    )


def _config_from_args(args: argparse.Namespace, config_path: str | None = None) -> cfgmod.Config:
    overrides: dict[str, Any] = {}
    for key in (k for k, _, _ in CONFIG_FLAGS.values()):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    for item in args.set:
        if "=" not in item:
            raise cfgmod.ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v
    return cfgmod.load(config_path or args.config, overrides)


# ---------------------------------------------------------------------------------------------- commands
def cmd_data_summarize(args: argparse.Namespace) -> int:
    from deepfake.data import report, scan, split_samples

    cfg = _config_from_args(args)
    catalog = scan(args.path)
    split = split_samples(
        catalog.samples, cfg.data.val_ratio, cfg.data.test_ratio, cfg.data.seed, cfg.data.max_per_class
    )
    rep = report(catalog, split)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    lines = [f"{rep['source']} ({rep['layout']}): {rep['images']} usable images {rep['per_class']}"]
    for name, counts in rep["splits"].items():
        lines.append(f"  {name:5s} {counts}")
    lines.append(
        f"  duplicates: {rep['duplicate_groups']} groups of byte-identical files "
        f"({rep['duplicate_images']} images), kept within one split; label conflicts: "
        f"{rep['label_conflicts']}"
    )
    lines.append(f"  skipped: {rep['skipped']} {rep['skipped_by_reason']}")
    for row in rep["skipped_files"][: args.show_skipped]:
        lines.append(f"    {row['reason']:20s} {row['ref']}")
    if rep["skipped"] > args.show_skipped:
        lines.append(f"    ... {rep['skipped'] - args.show_skipped} more (use --json for the full list)")
    print("\n".join(lines))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from deepfake.train import fit

    config_path = args.config
    if args.resume:
        storage = getattr(args, "train.storage_path", None) or cfgmod.TrainConfig.storage_path
        saved = Path(storage) / args.resume / "config.yaml"
        if config_path is None and saved.is_file():
            config_path = str(saved)
        elif config_path is None and "://" not in storage:
            raise cfgmod.ConfigError(f"--resume {args.resume}: no run found at {saved.parent}")
    cfg = _config_from_args(args, config_path)
    if args.resume:
        cfg.train.name = args.resume
    elif cfg.train.name and "://" not in cfg.train.storage_path:
        existing = Path(cfg.train.storage_path) / cfg.train.name
        if existing.exists():
            raise cfgmod.ConfigError(
                f"run {cfg.train.name!r} already exists in {cfg.train.storage_path}: use --resume "
                f"{cfg.train.name} to continue it, or another --name"
            )
    out = fit(cfg, address=args.address)
    m = out["metrics"]
    log.info(
        "best epoch %s: val_acc %.4f val_loss %.4f; model: %s",
        m.get("epoch"),
        m.get("val_acc", 0),
        m.get("val_loss", 0),
        out.get("model_dir"),
    )
    print(
        json.dumps(
            {k: out[k] for k in ("run", "model_dir", "metrics", "train_seconds") if k in out}, indent=2, default=str
        )
    )
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepfake", description="Tell AI-generated images from real photos.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    summ = data.add_parser("summarize", help="counts per class and split, duplicates, skipped files")
    summ.add_argument("path")
    summ.add_argument("--json", help="also write the full report (every skipped file) as JSON")
    summ.add_argument("--show-skipped", type=int, default=20)
    _add_config_flags(summ, only=("data",))
    summ.set_defaults(func=cmd_data_summarize)

    tr = sub.add_parser("train", help="train with Ray Train and export the best model + card")
    _add_config_flags(tr)
    tr.add_argument("--resume", metavar="NAME", help="continue an interrupted run by name")
    tr.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or an embedded local Ray)")
    tr.set_defaults(func=cmd_train)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from deepfake.checkpoint import CheckpointError
    from deepfake.data import DataError
    from deepfake.images import BadImage
    from deepfake.model import ModelError

    try:
        return int(args.func(args) or 0)
    except (cfgmod.ConfigError, DataError, ModelError, CheckpointError, BadImage, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

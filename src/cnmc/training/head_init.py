"""Start fine-tuning from a fitted head instead of a random one ("LP-FT": linear probing, then
fine-tuning; Kumar et al., ICLR 2022).

A random head sends large, arbitrary gradients into the pretrained layers in the first steps
and distorts the features that transfer; with a few dozen cells per class that costs accuracy
on unseen slides. Here a logistic regression is fitted on the frozen backbone's pooled
features of the training set, and becomes the 2-class head: fine-tuning then starts from a
model that already separates the classes as well as the frozen features allow.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from cnmc.core.errors import CnmcError

PROBE_C = 1.0  # inverse L2 strength of the probe (sklearn's default; pooled features are O(1))


@torch.no_grad()
def pooled_features(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logit features (N, D) and targets (N,) of every batch, the model in eval mode."""
    model.eval()
    feats, targets = [], []
    timm_model: Any = model  # timm's forward_features / forward_head
    for images, target in batches:
        x = timm_model.forward_features(images.to(device))
        feats.append(timm_model.forward_head(x, pre_logits=True).float().cpu().numpy())
        targets.append(target.numpy())
    return np.concatenate(feats), np.concatenate(targets)


@torch.no_grad()
def fit_probe_head(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, seed: int
) -> float:
    """Set ``model``'s 2-class linear head to a logistic regression on its frozen features.

    The two logits are ``-z/2`` and ``z/2`` with ``z`` the probe's decision function, so the
    softmax of the head equals the probe's probability. Returns the probe's training accuracy.
    """
    head = model.get_classifier()  # type: ignore[operator]  # timm's
    if not isinstance(head, nn.Linear) or head.out_features != 2:
        raise CnmcError(f"head_init linear_probe needs a 2-class linear head, the model has {head}")
    x, y = pooled_features(model, batches, device)
    if np.unique(y).size < 2:
        raise CnmcError("head_init linear_probe needs both classes in the training set")
    probe = LogisticRegression(C=PROBE_C, max_iter=5000, random_state=seed).fit(x, y)
    coef = torch.as_tensor(probe.coef_[0] / 2, dtype=head.weight.dtype, device=head.weight.device)
    bias = float(probe.intercept_[0]) / 2
    head.weight.copy_(torch.stack([-coef, coef]))
    head.bias.copy_(torch.tensor([-bias, bias], dtype=head.bias.dtype))
    return float(probe.score(x, y))

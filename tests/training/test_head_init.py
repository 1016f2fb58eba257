"""LP-FT head initialisation (cnmc.training.head_init) and frozen batch-norm statistics, on the tiny store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.trainers import make_trainer
from sklearn.linear_model import LogisticRegression

from cnmc.core.errors import CnmcError
from cnmc.data.store import ImageStore, StoreDataset, batch_loader
from cnmc.models.backbones import create_backbone
from cnmc.training.head_init import PROBE_C, fit_probe_head, pooled_features

CPU = torch.device("cpu")


def loader(store_root: Path, split: str = "train") -> object:
    net = create_backbone("test_efficientnet", pretrained=False)
    return batch_loader(StoreDataset(ImageStore(store_root / "images" / split), net.mean, net.std), batch_size=8)


def test_the_head_reproduces_the_probe_exactly(tiny_store: Path) -> None:
    torch.manual_seed(0)
    net = create_backbone("test_efficientnet", pretrained=False)
    batches = list(loader(tiny_store))
    accuracy = fit_probe_head(net.model, batches, CPU, seed=0)

    x, y = pooled_features(net.model, batches, CPU)
    probe = LogisticRegression(C=PROBE_C, max_iter=5000, random_state=0).fit(x, y)
    assert accuracy == pytest.approx(probe.score(x, y))
    with torch.no_grad():
        logits = torch.cat([net.model(images) for images, _ in batches])
    np.testing.assert_allclose(torch.softmax(logits, 1)[:, 1].numpy(), probe.predict_proba(x)[:, 1], atol=1e-5)


def test_one_class_is_refused(tiny_store: Path) -> None:
    net = create_backbone("test_resnet", pretrained=False)
    only_hem = [(images[targets == 0], targets[targets == 0]) for images, targets in loader(tiny_store)]
    with pytest.raises(CnmcError, match="both classes"):
        fit_probe_head(net.model, only_hem, CPU, seed=0)


def test_training_starts_from_the_probe_head(tiny_store: Path, tmp_path: Path) -> None:
    """With head_init linear_probe the first epoch starts from the fitted head, and a second
    trainer from the same seed does the same (the init is deterministic, so resume stays exact)."""
    heads = []
    for name in ("a", "b"):
        trainer = make_trainer(tiny_store, tmp_path / f"{name}.pt", epochs=1, head_init="linear_probe")
        trainer.init_head()
        heads.append(trainer.model.get_classifier().weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    assert torch.equal(heads[0][0], -heads[0][1])  # logits -z/2 and z/2
    random_head = make_trainer(tiny_store, tmp_path / "r.pt", epochs=1).model.get_classifier().weight.detach()
    trainer = make_trainer(tiny_store, tmp_path / "c.pt", epochs=1, head_init="linear_probe")
    result = trainer.fit()
    trained = trainer.model.get_classifier().weight.detach()
    assert np.isfinite(result.history[0]["val_loss"]) and not torch.equal(trained, heads[0])  # it trained ...
    assert (trained - heads[0]).norm() < (random_head - heads[0]).norm() / 10  # ... from the probe's head


def test_freeze_bn_keeps_the_running_statistics(tiny_store: Path, tmp_path: Path) -> None:
    def bn_stats(model: torch.nn.Module) -> list[torch.Tensor]:
        return [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    for freeze, same in ((True, True), (False, False)):
        trainer = make_trainer(tiny_store, tmp_path / f"{freeze}.pt", epochs=1, freeze_bn=freeze)
        before = bn_stats(trainer.model)
        weight = trainer.model.get_classifier().weight.detach().clone()
        trainer.train_epoch(0)
        assert all(torch.equal(a, b) for a, b in zip(before, bn_stats(trainer.model), strict=True)) is same
        assert not torch.equal(weight, trainer.model.get_classifier().weight)  # it still learns

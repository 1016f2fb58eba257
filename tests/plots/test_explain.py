"""Grad-CAM explanations (``cnmc.plots.gradcam``): target layers, heatmaps, the run's example grid,
the seeded choice of examples; and ``cnmc.jobs.explain.explain_images`` on a model from a real tiny run."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cnmc.core.errors import CnmcError
from cnmc.data.store import ImageStore
from cnmc.inference.spec import ModelSpec
from cnmc.jobs.explain import explain_images
from cnmc.models.backbones import create_backbone
from cnmc.plots.gradcam import (
    gradcam_examples_png,
    gradcam_grid,
    gradcam_heatmaps,
    normalize_maps,
    overlay,
    select_examples,
    target_layer,
)
from cnmc.serving.pyfunc import encode_file


def tiny_model(name: str, size: int = 32) -> tuple[torch.nn.Module, ModelSpec]:
    torch.manual_seed(0)
    net = create_backbone(name, pretrained=False)
    return net.model.eval(), ModelSpec(name, size, net.mean, net.std, threshold=0.5)


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def assert_png(path: Path) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 1000
    image = Image.open(path)
    assert image.format == "PNG"
    image.load()  # decodes completely: not truncated
    return image


# -- layers and heatmaps ----------------------------------------------------------------------
def test_target_layer_is_the_last_conv_block_of_each_family() -> None:
    resnet, _ = tiny_model("test_resnet")
    effnet, _ = tiny_model("test_efficientnet")
    assert target_layer(resnet) is resnet.layer4[-1]
    assert target_layer(effnet) is effnet.bn2  # conv_head's batch norm + activation
    with pytest.raises(CnmcError, match="no target layer known for Sequential"):
        target_layer(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten()))


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet"])
def test_heatmaps_have_the_image_shape_and_lie_in_0_1(backbone: str) -> None:
    model, spec = tiny_model(backbone, size=64)
    images = random_images(5, 64)
    model.train()  # the caller's mode is restored
    maps = gradcam_heatmaps(model, spec, images)
    assert maps.shape == (5, 64, 64) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    for m in maps:  # each map is scaled by its own peak (or is all zero)
        assert m.max() == pytest.approx(1.0) or m.max() == 0.0
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    # explicit targets: one map per (image, class); the two classes' maps differ
    per_class = [gradcam_heatmaps(model.eval(), spec, images, targets=[c] * 5) for c in (0, 1)]
    assert not np.allclose(per_class[0], per_class[1])
    assert gradcam_heatmaps(model, spec, images[:0]).shape == (0, 64, 64)


def test_normalize_maps_and_overlay() -> None:
    maps = normalize_maps(np.stack([np.zeros((4, 4)), np.arange(16.0).reshape(4, 4) - 5]))
    assert maps[0].max() == 0.0 and maps[1].max() == 1.0 and maps[1].min() == 0.0
    image = np.full((4, 4, 3), 128, np.uint8)
    blended = overlay(image, maps[1])
    assert blended.shape == (4, 4, 3) and blended.dtype == np.uint8
    assert not np.array_equal(blended[0, 0], blended[3, 3])  # cold and hot ends differ


# -- the grid ---------------------------------------------------------------------------------
def test_gradcam_grid_writes_one_panel_per_image(tmp_path: Path) -> None:
    model, spec = tiny_model("test_resnet")
    labels = ["all", "hem", "all", "hem", "all"]
    probs = np.array([0.9, 0.2, 0.3, 0.7, 0.6])
    out = gradcam_grid(model, spec, random_images(5, 32), labels, probs, tmp_path / "g" / "grid.png", "tiny")
    image = assert_png(out)
    assert image.text["panels"] == "5" and image.text["Title"] == "tiny"
    assert image.width > image.height  # 4 columns, 2 rows
    with pytest.raises(ValueError, match="lengths differ"):
        gradcam_grid(model, spec, random_images(2, 32), ["all"], [0.5, 0.5], tmp_path / "x.png", "x")


def test_select_examples_takes_seeded_cells_from_each_group() -> None:
    # ALL: 5 correct (p >= 0.5), 1 wrong; Hem: 3 correct, none wrong
    index = pd.DataFrame({"label": ["all"] * 6 + ["hem"] * 3})
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.95, 0.1, 0.2, 0.3, 0.05])
    picks = select_examples(index, probs, threshold=0.5, per_group=2, seed=3)
    assert list(picks["group"]) == ["ALL, correct", "ALL, correct", "ALL, wrong", "Hem, correct", "Hem, correct"]
    assert set(picks["row"][:2]) <= {0, 1, 2, 3, 4} and picks["row"].iat[2] == 5
    assert set(picks["row"][3:]) <= {6, 7, 8}
    assert picks["correct"].tolist() == [True, True, False, True, True]
    assert picks["prob_all"].tolist() == [probs[r] for r in picks["row"]]
    pd.testing.assert_frame_equal(picks, select_examples(index, probs, 0.5, per_group=2, seed=3))
    draws = {tuple(select_examples(index, probs, 0.5, per_group=2, seed=s)["row"]) for s in range(10)}
    assert len(draws) > 1  # the seed matters
    # a 0/1 'target' column works too; per_group larger than a group takes the whole group
    by_target = select_examples(pd.DataFrame({"target": ["1"] * 6 + ["0"] * 3}), probs, 0.5, per_group=9)
    assert len(by_target) == 9
    assert select_examples(index, probs, 0.5, per_group=0).empty
    with pytest.raises(ValueError, match="label"):
        select_examples(pd.DataFrame({"x": [1]}), [0.5], 0.5)


def test_gradcam_examples_png_of_the_test_split(tiny_store: Path, tmp_path: Path) -> None:
    test = ImageStore(tiny_store / "images" / "test")
    model, spec = tiny_model("test_efficientnet", size=test.image_size)
    probs = np.linspace(0.0, 1.0, len(test))
    out = gradcam_examples_png(model, spec, test, probs, 0.5, tmp_path / "plots" / "gradcam.png")
    expected = len(select_examples(test.index, probs, 0.5, per_group=2))
    assert 1 <= expected <= 8
    assert assert_png(out).text["panels"] == str(expected)


# -- cnmc explain -----------------------------------------------------------------------------
def test_explain_images_on_a_logged_model(
    tiny_runs, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tiny_runs("test_resnet")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", run.tracking_uri)
    cells = sorted(tiny_data.rglob("*.bmp"))[:2]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = explain_images(run.model_uri, [str(c) for c in cells] + [str(bad)], tmp_path / "explained")
    assert [p.name for p in out] == [f"{c.stem}.gradcam.png" for c in cells]
    served = mlflow.pyfunc.load_model(run.model_uri).predict(pd.DataFrame({"image": [encode_file(c) for c in cells]}))
    for path, prob in zip(out, served["prob_all"], strict=True):  # the served model's probability
        assert float(assert_png(path).text["prob_all"]) == pytest.approx(prob, abs=1e-5)
    table = pd.read_csv(tmp_path / "explained" / "explanations.csv")
    assert table["prob_all"][:2].to_numpy() == pytest.approx(served["prob_all"].to_numpy(), abs=1e-6)
    assert table["path"].tolist() == [str(c) for c in cells] + [str(bad)]
    assert table["prob_all"][:2].between(0, 1).all() and set(table["label"][:2]) <= {"all", "hem"}
    assert pd.isna(table["prob_all"].iat[2]) and "not an image" in table["error"].iat[2].lower()
    with pytest.raises(CnmcError, match="no image could be explained"):
        explain_images(run.model_uri, [str(bad)], tmp_path / "none")
    with pytest.raises(CnmcError, match="cannot load model"):
        explain_images("runs:/0123456789abcdef0123456789abcdef/model", [str(cells[0])], tmp_path / "x")

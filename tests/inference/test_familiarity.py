"""Knowing when not to call: the quality gate, the familiarity score and its cut-off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score

from cnmc.data.demo import demo_cells
from cnmc.data.quality import quality_problem
from cnmc.inference.familiarity import FALSE_ALARM_RATE, Familiarity
from cnmc.training.familiarity import fit_familiarity

ALLIDB2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "allidb2-dev"


def demo_cell_files() -> list[Path]:
    return sorted((demo_cells() / "C-NMC_Leukemia").rglob("*.png"))


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def non_cells() -> dict[str, np.ndarray]:
    """What is obviously not a cell: blank, uniform, near-uniform, a strip, a few dim specks on black, noise,
    a line of text on black, a dot too small to be a cell."""
    rng = np.random.default_rng(0)
    specks = np.zeros((450, 450, 3), np.uint8)
    specks[rng.integers(0, 450, 200), rng.integers(0, 450, 200)] = 60
    text = Image.new("RGB", (450, 450), "black")
    ImageDraw.Draw(text).text((20, 200), "PATIENT 42  smear 2026-12-07", fill="white", font_size=40)
    dot = Image.new("RGB", (450, 450), "black")
    ImageDraw.Draw(dot).ellipse((200, 200, 244, 244), fill=(150, 90, 160))
    return {
        "black": np.zeros((450, 450, 3), np.uint8),
        "white": np.full((450, 450, 3), 255, np.uint8),
        "grey": np.full((300, 300, 3), 128, np.uint8),
        "near-uniform": np.clip(128 + rng.normal(0, 1.0, (450, 450, 3)), 0, 255).astype(np.uint8),
        "strip": rgb(demo_cell_files()[0])[200:230],
        "specks": specks,
        "noise": rng.integers(0, 256, (450, 450, 3), dtype=np.uint8),
        "text on black": np.asarray(text),
        "a dot": np.asarray(dot),
    }


def test_the_gate_flags_generated_non_cells_and_passes_real_cells_in_any_orientation() -> None:
    for name, image in non_cells().items():
        assert quality_problem(image), name
    assert all(
        quality_problem(non_cells()[name]).startswith("no cell-shaped object") for name in ("text on black", "a dot")
    )
    for path in demo_cell_files()[::25]:
        cell = rgb(path)
        for view in (cell, np.rot90(cell), cell[::-1], cell[:, ::-1]):
            assert quality_problem(np.ascontiguousarray(view)) == "", path.name


def test_an_unsegmented_image_is_flagged_only_for_a_model_trained_on_segmented_cells() -> None:
    from cnmc.data.quality import NOT_SEGMENTED, segmented_on_black
    from cnmc.serving.pyfunc import gate

    rng = np.random.default_rng(0)
    familiar = fit_familiarity(rng.normal(size=(60, 4)), rng.integers(0, 2, 60), rng.normal(size=(20, 4)), 1.0)
    assert (
        familiar.segmented
        and not fit_familiarity(
            rng.normal(size=(60, 4)), rng.integers(0, 2, 60), rng.normal(size=(20, 4)), 0.5
        ).segmented
    )
    cells = [rgb(path) for path in demo_cell_files()[::40]]
    assert all(segmented_on_black(cell) and gate(cell, [familiar]) == "" for cell in cells)
    # A cell on a lit background (an unsegmented crop, as another lab's), and a page of text.
    lit = np.where(cells[0] == 0, np.uint8(200), cells[0])
    page = Image.new("RGB", (300, 300), "white")
    ImageDraw.Draw(page).text((20, 140), "PATIENT 42  smear ok", fill="black")
    for image in (lit, np.asarray(page)):
        assert gate(image, [familiar]) == NOT_SEGMENTED and gate(image, [None]) == ""


def test_the_cut_off_flags_about_its_rate_of_unseen_cells_and_every_far_one() -> None:
    rng = np.random.default_rng(0)
    dims, n = 16, 2000
    centres = np.stack([np.zeros(dims), np.full(dims, 2.0)])
    targets = rng.integers(0, 2, n)
    features = centres[targets] + rng.normal(size=(n, dims))
    unseen = centres[rng.integers(0, 2, n)] + rng.normal(size=(n, dims))
    familiar = fit_familiarity(features, targets, unseen)
    fresh = centres[rng.integers(0, 2, n)] + rng.normal(size=(n, dims))
    assert 0.5 * FALSE_ALARM_RATE < np.mean(familiar.score(fresh) > 1) < 2.5 * FALSE_ALARM_RATE
    far = rng.normal(size=(100, dims)) + 8.0 * rng.choice([-1, 1], size=(100, dims))
    assert (familiar.score(far) > 1).all()


def test_a_saved_familiarity_scores_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    features, targets = rng.normal(size=(300, 8)), rng.integers(0, 2, 300)
    familiar = fit_familiarity(features, targets, rng.normal(size=(100, 8)))
    familiar.save(tmp_path / "f.npz")
    loaded = Familiarity.load(tmp_path / "f.npz")
    probe = rng.normal(size=(20, 8)) * 3
    np.testing.assert_allclose(loaded.score(probe), familiar.score(probe), rtol=1e-5)
    assert loaded.segmented == familiar.segmented


@pytest.mark.skipif(not ALLIDB2.is_dir(), reason="../shared/data/allidb2-dev is absent (real cells of another lab)")
def test_another_labs_cells_score_higher_than_held_out_demo_people() -> None:
    """Frozen ImageNet lite0 features (the package's offline weights), fitted on some demo people."""
    import torch

    from cnmc.core.config import Framing
    from cnmc.inference.forward import array_batches, predict_outputs
    from cnmc.models.backbones import create_backbone
    from cnmc.serving.pyfunc import decode_image

    torch.manual_seed(0)
    net = create_backbone("tf_efficientnet_lite0", pretrained=True)
    framing = Framing(96)

    def features(paths: list[Path]) -> np.ndarray:
        images = np.stack([decode_image(p.read_bytes(), framing) for p in paths])
        return predict_outputs(net.model, array_batches(images, 64), net.mean, net.std).features

    files = demo_cell_files()
    held_out_people = {"UID_11", "UID_H6", "UID_30"}
    held = [f for f in files if "_".join(f.name.split("_")[:2]) in held_out_people]
    fitted = [f for f in files if f not in held]
    targets = np.array([f.parent.name == "all" for f in fitted], dtype=int)
    familiar = fit_familiarity(features(fitted[1::2]), targets[1::2], features(fitted[::2]))
    other = sorted(ALLIDB2.rglob("*.jpg"))
    held_scores, other_scores = familiar.score(features(held)), familiar.score(features(other))
    auc = roc_auc_score(np.r_[np.zeros(len(held)), np.ones(len(other))], np.r_[held_scores, other_scores])
    assert auc > 0.9 and np.median(other_scores) > 1 > np.median(held_scores)


def test_a_cell_the_gate_flags_scores_above_every_cell_the_features_pass() -> None:
    """ood_score above 1 means flagged, whichever check flagged it: the score alone ranks them."""
    from cnmc.inference.familiarity import GATE_SCORE
    from cnmc.inference.schema import cell_answers

    answers = cell_answers(
        np.array([0.2, 0.7, 0.9, 0.4]),
        0.5,
        ood_score=np.array([0.3, 0.3, 1.4, 3.5]),
        problems=["", "not segmented on black", "", "near-uniform"],
    )
    assert answers["ood_score"].tolist() == [0.3, GATE_SCORE, 1.4, 3.5]
    assert answers["ood"].tolist() == (answers["ood_score"] > 1).tolist() == [False, True, True, True]
    unscored = cell_answers(np.array([0.2, 0.7]), 0.5, problems=["", "blank"])  # a model without familiarity
    assert np.isnan(unscored["ood_score"][0]) and unscored["ood_score"][1] == GATE_SCORE

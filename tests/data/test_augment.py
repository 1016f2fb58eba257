"""The augment stage: class balance, determinism, the paper's T, the store it writes, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from cnmc.core.config import AugmentConfig, Framing
from cnmc.core.errors import CnmcError
from cnmc.data import transforms as T
from cnmc.data.augment import REQUIRED_COLUMNS, PrepareSummary, derive_seed, prepare_dataset
from cnmc.data.batch_augment import PaperBatchTransform
from cnmc.data.store import ImageStore, apply_transform

SIZE = 32


def _write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (48, 48)) -> None:
    """A small cell-like RGB BMP: a coloured disc with noise on black."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) < (min(w, h) / 3) ** 2
    colour = rng.integers(60, 255, size=3)
    pixels = np.where(disc[..., None], colour, 0) + rng.integers(0, 40, size=(h, w, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(path)


def make_splits(root: Path, counts: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """Write BMPs and split CSVs, ``counts[split][label]`` images each; return the splits dir."""
    rng = np.random.default_rng(seed)
    images, splits = root / "images", root / "splits"
    images.mkdir(parents=True, exist_ok=True)
    splits.mkdir(parents=True, exist_ok=True)
    for split, per_label in counts.items():
        rows = []
        for label, n in per_label.items():
            for i in range(n):
                path = images / f"{split}_{label}_{i}.bmp"
                size = (48, 40) if (split == "val" and i == 0) else (48, 48)  # one non-square image
                _write_image(path, rng, size)
                rows.append(
                    {
                        "path": str(path),
                        "label": label,
                        "subject": f"{label}{i % 3}",
                        "source": "test",
                        "sha256": f"{i:064x}",
                        "width": str(size[0]),
                        "height": str(size[1]),
                        "original_mode": "RGB",
                        "original_name": path.name,
                        "split": split,
                    }
                )
        pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS)).to_csv(splits / f"{split}.csv", index=False)
    return splits


COUNTS = {"train": {"all": 7, "hem": 3}, "val": {"all": 2, "hem": 2}, "test": {"all": 2, "hem": 1}}


def cfg(**kw) -> AugmentConfig:
    base = {"image_size": SIZE, "per_class": 8, "strength": 1.0, "workers": 1, "preview_images": 2, "online": False}
    return AugmentConfig(**(base | kw))


def build(splits: Path, out: Path, seed: int = 7, **kw) -> PrepareSummary:
    """prepare_dataset with the tiny test config; the preview goes to ``<out>.png``."""
    preview = out.parent / f"{out.name}.png"
    return prepare_dataset(splits, out, cfg(**kw), seed=seed, preview_path=preview, progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One store built with workers=1 (shared by the read-only checks)."""
    root = tmp_path_factory.mktemp("aug")
    splits = make_splits(root, COUNTS)
    summary = build(splits, root / "store", seed=7)
    return root, splits, summary


def _read(path: str) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_paper_constants_match_the_paper():
    assert (T.PAPER_HFLIP_P, T.PAPER_VFLIP_P) == (0.5, 0.5)
    assert T.PAPER_ROTATION_DEGREES == 25
    assert (T.PAPER_JITTER_BRIGHTNESS, T.PAPER_JITTER_CONTRAST, T.PAPER_JITTER_SATURATION) == (
        0.3,
        0.3,
        0.3,
    )
    assert T.PAPER_JITTER_HUE == 0.05
    assert T.PAPER_CROP_SCALE == (0.7, 1.0) and T.PAPER_CROP_RATIO == (0.75, 1.33)
    assert T.PAPER_AFFINE_TRANSLATE == 0.05 and T.PAPER_AFFINE_SCALE == (0.95, 1.05)
    assert T.PAPER_AFFINE_SHEAR_DEGREES == 10
    assert T.PAPER_BLUR_KERNEL == 3 and T.PAPER_BLUR_SIGMA == (0.1, 2.0)
    assert T.PAPER_SHARPNESS_FACTOR == 2 and T.PAPER_SHARPNESS_P == 0.3
    assert T.PAPER_PERSPECTIVE_DISTORTION == 0.2 and T.PAPER_PERSPECTIVE_P == 0.3
    assert T.PAPER_IMAGE_SIZE == 224


def test_strength_one_builds_the_papers_transform_in_order():
    ops = T.paper_transform(224, 1.0).transforms
    kinds = [type(op) for op in ops]
    assert kinds == [
        v2.RandomHorizontalFlip,
        v2.RandomVerticalFlip,
        v2.RandomRotation,
        v2.ColorJitter,
        v2.RandomResizedCrop,
        v2.RandomAffine,
        v2.GaussianBlur,
        v2.RandomAdjustSharpness,
        v2.RandomPerspective,
    ]
    hflip, vflip, rot, jit, crop, aff, blur, sharp, persp = ops
    approx = pytest.approx
    assert hflip.p == 0.5 and vflip.p == 0.5
    assert list(rot.degrees) == approx([-25, 25])
    assert jit.brightness == approx((0.7, 1.3)) and jit.contrast == approx((0.7, 1.3))
    assert jit.saturation == approx((0.7, 1.3)) and jit.hue == approx((-0.05, 0.05))
    assert list(crop.size) == [224, 224]
    assert crop.scale == approx((0.7, 1.0)) and crop.ratio == approx((0.75, 1.33))
    assert list(aff.degrees) == approx([0, 0]) and aff.translate == approx((0.05, 0.05))
    assert aff.scale == approx((0.95, 1.05)) and list(aff.shear) == approx([-10, 10])
    assert list(blur.kernel_size) == [3, 3] and list(blur.sigma) == approx([0.1, 2.0])
    assert sharp.sharpness_factor == 2 and sharp.p == approx(0.3)
    assert persp.distortion_scale == approx(0.2) and persp.p == approx(0.3)


def test_strength_scales_magnitudes_and_zero_is_identity():
    half = T.paper_transform(64, 0.5).transforms
    assert half[0].p == pytest.approx(0.25)
    assert list(half[2].degrees) == pytest.approx([-12.5, 12.5])
    assert half[4].scale == pytest.approx((0.85, 1.0))
    x = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    assert torch.equal(T.paper_transform(64, 0.0)(x), x)
    torch.manual_seed(0)
    y = T.paper_transform(64, 1.0)(x)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    with pytest.raises(ValueError):
        T.paper_transform(64, 1.5)


def test_resize_transform_makes_squares():
    x = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    y = T.resize_transform(32)(x)
    assert y.shape == (3, 32, 32) and y.dtype == torch.uint8


def test_train_is_balanced_and_originals_kept(built):
    root, splits, summary = built
    assert isinstance(summary, PrepareSummary)
    store = ImageStore(root / "store" / "train")
    idx = store.index
    assert len(store) == 16 and store.images.shape == (16, SIZE, SIZE, 3)
    for label, n in COUNTS["train"].items():
        rows = idx[idx["label"] == label]
        assert len(rows) == 8
        assert (rows["augmented"] == "0").sum() == n
        assert (rows["augmented"] == "1").sum() == 8 - n
    # every original of the CSV is in the store, once
    train_csv = pd.read_csv(splits / "train.csv", dtype=str, keep_default_na=False)
    originals = idx[idx["augmented"] == "0"]
    assert sorted(originals["path"]) == sorted(train_csv["path"])
    assert summary.train_original == {"all": 7, "hem": 3}
    assert summary.train_augmented == {"all": 1, "hem": 5}
    assert summary.split_counts == {"train": 16, "val": 4, "test": 3}
    assert "train 16" in str(summary) and "\n" not in str(summary)


def test_index_columns_and_origins(built):
    root, _, _ = built
    store = ImageStore(root / "store" / "train")
    idx = store.index
    assert list(idx.columns) == [*REQUIRED_COLUMNS, "target", "augmented", "origin", "aug_seed"]
    assert set(store.targets[idx["label"] == "all"]) == {1} and set(store.targets[idx["label"] == "hem"]) == {0}
    assert store.targets.dtype == np.int64
    origin = idx["origin"].astype(int)
    for row, r in idx.iterrows():
        if r["augmented"] == "0":
            assert origin[row] == row and r["aug_seed"] == ""
            # originals are the resized source images
            expected = T.resize_transform(SIZE)(_read(r["path"])).permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(store.images[row], expected)
        else:
            src = idx.iloc[origin[row]]
            assert src["augmented"] == "0"
            assert src["label"] == r["label"] and src["path"] == r["path"] and src["subject"] == r["subject"]
            assert int(r["aug_seed"]) >= 0
    # round-robin: hem has 3 originals and 5 augmented -> every original used, none more than twice
    hem_aug = idx[(idx["label"] == "hem") & (idx["augmented"] == "1")]
    uses = hem_aug["origin"].value_counts()
    assert len(uses) == 3 and uses.max() == 2
    # seeds derived from (seed, class, k)
    assert hem_aug["aug_seed"].tolist() == [str(derive_seed(7, 0, k)) for k in range(5)]


def test_val_and_test_only_resized(built):
    root, splits, _ = built
    for split in ("val", "test"):
        store = ImageStore(root / "store" / split)
        csv = pd.read_csv(splits / f"{split}.csv", dtype=str, keep_default_na=False)
        assert len(store) == len(csv)
        assert (store.index["augmented"] == "0").all()
        assert store.index["path"].tolist() == csv["path"].tolist()
        for row, path in enumerate(csv["path"]):
            expected = T.resize_transform(SIZE)(_read(path)).permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(store.images[row], expected)


def test_report_and_preview(built):
    root, _, _ = built
    report = json.loads((root / "store" / "augment_report.json").read_text())
    assert report["splits"]["train"]["classes"]["hem"] == {
        "original": 3,
        "augmented": 5,
        "dropped": 0,
    }
    assert (
        report["image_size"] == SIZE
        and report["config"]["per_class"] == 8
        and "seconds" not in report  # a rerun must not change the store's hash
    )
    png = (root / "store.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # no temporary folders left beside the store
    assert sorted(p.name for p in root.iterdir()) == ["images", "splits", "store", "store.png"]


def test_deterministic_and_independent_of_workers(tmp_path, built):
    root, splits, _ = built
    again = build(splits, tmp_path / "a", seed=7)
    two = build(splits, tmp_path / "b", seed=7, workers=2)
    assert again.workers == 1 and two.workers == 2
    for split in ("train", "val", "test"):
        ref = (root / "store" / split / "images.npy").read_bytes()
        assert (tmp_path / "a" / split / "images.npy").read_bytes() == ref
        assert (tmp_path / "b" / split / "images.npy").read_bytes() == ref
        ref_idx = (root / "store" / split / "index.csv").read_text()
        assert (tmp_path / "b" / split / "index.csv").read_text() == ref_idx
    other = build(splits, tmp_path / "c", seed=8)
    assert other.split_counts == again.split_counts
    assert (tmp_path / "c" / "train" / "images.npy").read_bytes() != (
        root / "store" / "train" / "images.npy"
    ).read_bytes()


def test_strength_zero_copies_equal_originals(tmp_path, built):
    _, splits, _ = built
    build(splits, tmp_path / "s", seed=7, strength=0.0)
    store = ImageStore(tmp_path / "s" / "train")
    aug = np.flatnonzero(store.index["augmented"].to_numpy() == "1")
    assert len(aug) == 6
    for row in aug:
        origin = int(store.index["origin"].iloc[row])
        np.testing.assert_array_equal(store.images[row], store.images[origin])


def test_more_originals_than_m_keeps_a_seeded_subset(tmp_path, built, caplog):
    _, splits, _ = built
    with caplog.at_level("WARNING"):
        s = build(splits, tmp_path / "s", seed=7, per_class=5)
    assert "exceed per_class" in caplog.text and "2 originals are DROPPED" in caplog.text
    assert s.train_original == {"all": 5, "hem": 3} and s.train_augmented == {"all": 0, "hem": 2}
    assert s.train_dropped == {"all": 2, "hem": 0}
    assert "5 of 7 original kept, 2 dropped" in str(s)
    store = ImageStore(tmp_path / "s" / "train")
    assert (store.index["label"] == "all").sum() == 5 and (store.index["augmented"] == "1").sum() == 2
    build(splits, tmp_path / "t", seed=7, per_class=5)
    assert (tmp_path / "t" / "train" / "index.csv").read_text() == (tmp_path / "s" / "train" / "index.csv").read_text()


def test_per_class_auto_keeps_every_original_and_balances_to_the_largest_class(tmp_path, built):
    _, splits, _ = built
    s = build(splits, tmp_path / "s", seed=7, per_class="auto", auto_min=0)
    assert s.per_class == 7 and s.train_dropped == {"all": 0, "hem": 0}
    assert s.train_original == {"all": 7, "hem": 3} and s.train_augmented == {"all": 0, "hem": 4}
    report = json.loads((tmp_path / "s" / "augment_report.json").read_text())
    assert report["config"]["per_class"] == "auto" and report["per_class"] == 7
    assert report["splits"]["train"]["classes"]["all"]["dropped"] == 0
    # A small set is still augmented: auto is at least augment.auto_min a class.
    floored = build(splits, tmp_path / "f", seed=7, per_class="auto", auto_min=10)
    assert floored.per_class == 10 and floored.train_augmented == {"all": 3, "hem": 7}


def test_missing_test_split_is_skipped(tmp_path):
    splits = make_splits(tmp_path, {"train": {"all": 2, "hem": 2}, "val": {"all": 1, "hem": 1}})
    s = build(splits, tmp_path / "s", seed=1, per_class=2)
    assert s.split_counts == {"train": 4, "val": 2}
    assert not (tmp_path / "s" / "test").exists()


def test_rebuild_replaces_the_old_store(tmp_path):
    splits = make_splits(tmp_path, {"train": {"all": 2, "hem": 2}, "val": {"all": 1, "hem": 1}})
    out = tmp_path / "s"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build(splits, out, seed=1, per_class=3)
    assert not (out / "stale.txt").exists() and len(ImageStore(out / "train")) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "s", "s.png", "splits"]


def test_missing_split_csv_is_a_clear_error(tmp_path):
    splits = make_splits(tmp_path, {"train": {"all": 2, "hem": 2}})
    with pytest.raises(CnmcError, match=r"val\.csv: split CSV not found"):
        build(splits, tmp_path / "s", seed=1)
    with pytest.raises(CnmcError, match="splits folder not found"):
        build(tmp_path / "nope", tmp_path / "s", seed=1)


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_image_is_a_clear_error_and_leaves_no_store(tmp_path, workers):
    splits = make_splits(tmp_path, {"train": {"all": 3, "hem": 3}, "val": {"all": 1, "hem": 1}})
    bad = tmp_path / "images" / "train_hem_1.bmp"
    bad.write_bytes(b"not an image")
    with pytest.raises(CnmcError) as err:
        build(splits, tmp_path / "s", seed=1, workers=workers)
    msg = str(err.value)
    assert str(bad) in msg and "unreadable image" in msg and "\n" not in msg
    assert not (tmp_path / "s").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "splits"]


def test_missing_image_and_bad_csvs_are_clear_errors(tmp_path):
    splits = make_splits(tmp_path, {"train": {"all": 2, "hem": 2}, "val": {"all": 1, "hem": 1}})
    (tmp_path / "images" / "val_all_0.bmp").unlink()
    with pytest.raises(CnmcError, match=r"val_all_0\.bmp: cannot read image"):
        build(splits, tmp_path / "s", seed=1)

    train = pd.read_csv(splits / "train.csv", dtype=str, keep_default_na=False)
    train.drop(columns=["sha256"]).to_csv(splits / "train.csv", index=False)
    with pytest.raises(CnmcError, match=r"train\.csv: missing column\(s\) sha256"):
        build(splits, tmp_path / "s", seed=1)

    train.iloc[:0].to_csv(splits / "train.csv", index=False)
    with pytest.raises(CnmcError, match="training split has no images"):
        build(splits, tmp_path / "s", seed=1)

    train[train["label"] == "all"].to_csv(splits / "train.csv", index=False)
    with pytest.raises(CnmcError, match="no 'hem' images"):
        build(splits, tmp_path / "s", seed=1)

    train.assign(label="ALL?").to_csv(splits / "train.csv", index=False)
    with pytest.raises(CnmcError, match=r"line 2: label 'ALL\?'"):
        build(splits, tmp_path / "s", seed=1)


def _cell_on_black(size: int = 120, centre: tuple[int, int] = (40, 70), radius: int = 20) -> torch.Tensor:
    yy, xx = np.mgrid[0:size, 0:size]
    disc = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius**2
    pixels = np.where(disc[..., None], np.array([150, 90, 200]), 0).astype(np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def test_the_crop_finds_the_cell_on_its_black_background_and_centres_it_with_the_margin():
    image = _cell_on_black()
    image[:, 110, 5] = 255  # a stray bright pixel: not part of the cell's box
    top, left, side = T.cell_box(image, margin=0.1)
    assert abs(side - 41 * 1.2) <= 3 and abs(top + side / 2 - 40.5) <= 1 and abs(left + side / 2 - 70.5) <= 1
    cropped = T.crop_to_cell(image, margin=0.1)
    foreground = (cropped.amax(dim=0) > T.FOREGROUND_LEVEL).nonzero()
    assert foreground.min() >= 2 and foreground.max() <= side - 3  # the margin stays black all round
    framed = T.frame(image, Framing(32, "cell", 0.1))
    assert framed.shape == (3, 32, 32) and framed.dtype == torch.uint8
    assert (framed.amax(dim=0) > T.FOREGROUND_LEVEL).float().mean() > 0.4  # the cell fills the input


def test_a_cell_touching_the_border_keeps_every_pixel_and_its_place():
    image = _cell_on_black(centre=(10, 110), radius=15)  # cut by the top and right edges
    cropped = T.crop_to_cell(image, margin=0.1)
    assert cropped.sum() == image.sum()  # nothing of the cell lost; the square is padded with black
    assert cropped.shape[1] == cropped.shape[2]


def test_a_frame_without_a_cell_or_with_crop_frame_is_the_whole_frame_resized():
    black = torch.zeros((3, 50, 70), dtype=torch.uint8)
    assert T.cell_box(black, margin=0.0) == (-10, 0, 70)
    image = _cell_on_black()
    assert torch.equal(T.frame(image, Framing(32)), T.resize_transform(32)(image))


def test_a_store_cut_to_the_cell_holds_each_image_as_the_served_model_frames_it(tmp_path):
    from cnmc.serving.pyfunc import decode_image

    splits = make_splits(tmp_path, COUNTS)
    build(splits, tmp_path / "store", crop="cell", crop_margin=0.2)
    store = ImageStore(tmp_path / "store" / "test")
    assert store.framing == Framing(SIZE, "cell", 0.2)
    for row, path in enumerate(store.index["path"]):
        np.testing.assert_array_equal(store.images[row], decode_image(Path(path).read_bytes(), store.framing))


def _disc(size: int, radius: float) -> torch.Tensor:
    """A uint8 (3, S, S) purple disc on black, off-centre and lopsided so flips and turns show."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = ((yy - size * 0.45) ** 2 + (xx - size * 0.55) ** 2) < radius**2
    colour = torch.tensor([150, 60, 170], dtype=torch.uint8).reshape(3, 1, 1)
    image = torch.where(inside, colour, torch.zeros_like(colour))
    image[:, int(size * 0.45) : int(size * 0.5), int(size * 0.55) : int(size * 0.55 + radius)] = 250
    return image


def test_the_batch_t_draws_each_image_its_own_t_at_the_papers_magnitudes() -> None:
    size, n = 64, 96
    disc = _disc(size, 18)
    batch = disc.expand(n, 3, size, size)
    torch.manual_seed(0)
    fast = PaperBatchTransform(size)(batch)
    torch.manual_seed(0)
    slow = torch.stack([T.paper_transform(size)(disc) for _ in range(n)])
    assert fast.dtype == torch.uint8 and fast.shape == batch.shape
    assert len({image.numpy().tobytes() for image in fast}) == n  # one draw per image
    # The same magnitudes: what is left of the cell, where it sits, how bright it is, spread alike.
    for stat in (
        lambda x: (x.amax(dim=1) > T.FOREGROUND_LEVEL).float().mean(dim=(1, 2)),
        lambda x: x.float().mean(dim=(1, 2, 3)),
        lambda x: (
            x[:, :, :, : size // 2].float().mean(dim=(1, 2, 3)) - x[:, :, :, size // 2 :].float().mean(dim=(1, 2, 3))
        ),
    ):
        a, b = stat(fast), stat(slow)
        assert abs(a.mean() - b.mean()) < 0.25 * b.abs().mean() + 1.0
        assert 0.6 < a.std() / b.std() < 1.6
    # Black stays black where no cell is; strength 0 is the identity; draws follow the generator.
    assert torch.equal(PaperBatchTransform(size)(torch.zeros_like(batch[:4])), torch.zeros_like(batch[:4]))
    assert torch.equal(PaperBatchTransform(size, 0.0)(batch), batch)
    draws = [PaperBatchTransform(size, 0.5, torch.Generator().manual_seed(3))(batch[:8]) for _ in range(2)]
    assert torch.equal(*draws)
    with pytest.raises(ValueError, match="strength"):
        PaperBatchTransform(size, 1.5)


def test_a_store_applies_the_batch_t_to_the_marked_rows_only() -> None:
    images = torch.stack([_disc(32, 10)] * 6)
    on = np.array([True, False, True, False, False, True])
    out = apply_transform(images, on, PaperBatchTransform(32))
    assert torch.equal(out[~torch.from_numpy(on)], images[~torch.from_numpy(on)])
    assert not any(torch.equal(out[i], images[i]) for i in np.flatnonzero(on))

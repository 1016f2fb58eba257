"""The image store: round trip, normalisation, dataset items, the batched path, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cnmc.core.errors import CnmcError
from cnmc.data.store import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageStore,
    StoreDataset,
    batch_loader,
    normalize_batch,
)
from cnmc.data.transforms import paper_transform

N, S = 10, 16


def write_store(split_dir: Path, n: int = N, size: int = S, seed: int = 0) -> np.ndarray:
    split_dir.mkdir(parents=True)
    images = np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    np.save(split_dir / "images.npy", images)
    index = pd.DataFrame(
        {
            "path": [f"img{i}.bmp" for i in range(n)],
            "label": ["all" if i % 3 else "hem" for i in range(n)],
            "target": [1 if i % 3 else 0 for i in range(n)],
            "augmented": 0,
            "origin": range(n),
            "aug_seed": "",
        }
    )
    index.to_csv(split_dir / "index.csv", index=False)
    return images


@pytest.fixture
def store_dir(tmp_path) -> tuple[Path, np.ndarray]:
    images = write_store(tmp_path / "train")
    return tmp_path / "train", images


def test_round_trip(store_dir):
    path, images = store_dir
    store = ImageStore(path)
    assert len(store) == N and store.image_size == S
    assert isinstance(store.images, np.memmap) and not store.images.flags.writeable
    np.testing.assert_array_equal(store.images, images)
    assert store.targets.dtype == np.int64
    assert store.targets.tolist() == [1 if i % 3 else 0 for i in range(N)]
    assert store.index["path"].iloc[3] == "img3.bmp"
    # pickling (spawned DataLoader workers) reopens the memmap instead of copying it
    clone = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < images.nbytes
    np.testing.assert_array_equal(clone.images, images)


def test_normalisation_values():
    x = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    out = normalize_batch(x, IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (1, 3, 1, 1) and out.dtype == torch.float32 and out.is_contiguous()
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert out.flatten().tolist() == pytest.approx(expected, abs=1e-6)
    half = normalize_batch(torch.full((2, 4, 4, 3), 255, dtype=torch.uint8), (0.5,) * 3, (0.5,) * 3)
    assert torch.allclose(half, torch.ones_like(half))
    with pytest.raises(ValueError):
        normalize_batch(torch.zeros((2, 3, 4, 4)))


def test_dataset_items(store_dir):
    path, images = store_dir
    ds = StoreDataset(path, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert len(ds) == N
    x, y = ds[4]
    assert x.shape == (3, S, S) and x.dtype == torch.float32 and isinstance(y, int) and y == 1
    ref = (torch.from_numpy(images[4]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(x, ref, atol=1e-5)
    assert ds[np.int64(3)][1] == 0


def test_batched_path_equals_per_item_path(store_dir):
    path, _ = store_dir
    ds = StoreDataset(path)
    order = [7, 2, 9, 0, 5]
    xb, yb = ds[order]
    assert xb.shape == (5, 3, S, S) and yb.dtype == torch.int64
    for j, i in enumerate(order):
        x, y = ds[i]
        assert torch.allclose(xb[j], x, atol=1e-6) and yb[j].item() == y
    batches = list(ImageStore(path).batches(order, batch_size=2))
    assert [len(b[1]) for b in batches] == [2, 2, 1]
    assert torch.allclose(torch.cat([b[0] for b in batches]), xb)
    assert torch.equal(torch.cat([b[1] for b in batches]), yb)
    # through a DataLoader: same images, seeded shuffle covers every item once
    got = list(batch_loader(ds, batch_size=4, shuffle=True, seed=3))
    assert [len(y) for _, y in got] == [4, 4, 2]
    again = list(batch_loader(ds, batch_size=4, shuffle=True, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, again, strict=True))
    xs = torch.cat([x for x, _ in got])
    plain = torch.cat([x for x, _ in batch_loader(ds, batch_size=4)])
    assert sorted(xs.sum(dim=(1, 2, 3)).tolist()) == pytest.approx(sorted(plain.sum(dim=(1, 2, 3)).tolist()))


def test_on_the_fly_transform_batched_equals_per_item(store_dir):
    path, _ = store_dir
    ds = StoreDataset(path, transform=paper_transform(S, 0.7))
    torch.manual_seed(11)
    xb, _ = ds[[1, 2, 3]]
    torch.manual_seed(11)
    items = torch.stack([ds[i][0] for i in (1, 2, 3)])
    assert torch.allclose(xb, items, atol=1e-6)
    assert not torch.allclose(xb, StoreDataset(path)[[1, 2, 3]][0])
    identity = StoreDataset(path, transform=paper_transform(S, 0.0))
    assert torch.equal(identity[[1, 2]][0], StoreDataset(path)[[1, 2]][0])


def test_missing_store_errors(tmp_path):
    with pytest.raises(CnmcError, match="split folder not found"):
        ImageStore(tmp_path / "nope")
    write_store(tmp_path / "a")
    (tmp_path / "a" / "images.npy").unlink()
    with pytest.raises(CnmcError, match=r"images\.npy missing"):
        ImageStore(tmp_path / "a")
    write_store(tmp_path / "b")
    (tmp_path / "b" / "index.csv").unlink()
    with pytest.raises(CnmcError, match=r"index\.csv missing"):
        ImageStore(tmp_path / "b")


def test_inconsistent_store_errors(tmp_path):
    write_store(tmp_path / "a")
    np.save(tmp_path / "a" / "images.npy", np.zeros((N - 1, S, S, 3), dtype=np.uint8))
    with pytest.raises(
        CnmcError,
        match=r"a: inconsistent store, images\.npy has 9 images but index\.csv has 10 rows",
    ):
        ImageStore(tmp_path / "a")
    np.save(tmp_path / "a" / "images.npy", np.zeros((N, S, S), dtype=np.uint8))
    with pytest.raises(CnmcError, match=r"expected a uint8 array"):
        ImageStore(tmp_path / "a")
    (tmp_path / "a" / "images.npy").write_bytes(b"garbage")
    with pytest.raises(CnmcError, match="not a readable .npy"):
        ImageStore(tmp_path / "a")
    write_store(tmp_path / "b")
    pd.read_csv(tmp_path / "b" / "index.csv").drop(columns=["target"]).to_csv(tmp_path / "b" / "index.csv")
    with pytest.raises(CnmcError, match="no 'target' column"):
        ImageStore(tmp_path / "b")


def test_batch_memory_is_reused_only_when_free(store_dir):
    path, _ = store_dir
    store = ImageStore(path)
    expected = StoreDataset(path)
    first, _ = store.load_batch([0, 1, 2])
    kept = first.clone()
    second, _ = store.load_batch([3, 4, 5])  # `first` is alive: must not be overwritten
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, kept)
    view, ptr1, ptr2 = first[0], first.data_ptr(), second.data_ptr()
    del first  # its view keeps the memory busy
    third, _ = store.load_batch([6, 7, 8])
    assert third.data_ptr() not in (ptr1, ptr2) and torch.equal(view, kept[0])
    del view, second  # now both are free
    fourth, _ = store.load_batch([9, 0, 1])
    assert fourth.data_ptr() in (ptr1, ptr2)
    assert torch.allclose(fourth, expected[[9, 0, 1]][0])
    assert torch.allclose(third, expected[[6, 7, 8]][0])


def test_batch_moved_to_shared_memory_is_never_reused(store_dir):
    path, _ = store_dir
    store = ImageStore(path)
    first, _ = store.load_batch([0, 1])
    first.share_memory_()  # as when put on a torch.multiprocessing queue
    ptr = first.data_ptr()
    del first
    second, _ = store.load_batch([2, 3])
    assert second.data_ptr() != ptr

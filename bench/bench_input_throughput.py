"""Input throughput: the image store vs the usual torchvision ImageFolder pipeline.

Goal measured: images/second delivered to a model as normalised 224x224 float tensors
(batch 64) from our image store (``images.npy`` at 224 px, memory-mapped, one slice and one
whole-batch normalisation per batch: ``ImageStore.batches``) versus the baseline everyone
starts with, torchvision ``ImageFolder`` over the raw 450x450 BMPs with
``Resize(224) + ToTensor() + Normalize()`` through a ``DataLoader``. Target: >= 10x.

Both paths run in this one process with ``num_workers=0`` (main process) and one torch thread
(``--threads``; as in a DataLoader worker, and robust on a shared machine, where spinning
OpenMP threads slow small ops down many times). Both shuffle and both get one untimed warm-up
epoch first, so the BMPs are in the page cache (the baseline's best case); timed epochs
alternate between the paths so that other load on the machine affects both alike; images per
CPU-second are printed too (less sensitive to other load). The BMPs are copies of the real
C-NMC sample cells in ``../shared/data/cnmc-sample`` when that folder exists, else random
450x450 images. The one-time cost of building the store (``prepare_dataset``) is printed
separately. The store path reuses a batch's float memory once the batch is dropped (see
``cnmc.data.store``), as a training loop does.

Run (from the project root):
    .venv/bin/python bench/bench_input_throughput.py [--images 400] [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _samples import (  # bench/ is on sys.path when a script here runs
    describe_cells,
    sample_bmps,
    split_row,
    write_cell_bmp,
)
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from cnmc.core.config import AugmentConfig
from cnmc.data.augment import REQUIRED_COLUMNS, prepare_dataset
from cnmc.data.store import IMAGENET_MEAN, IMAGENET_STD, ImageStore, StoreDataset, batch_loader

SIZE = 224


def make_image_folder(root: Path, n: int, seed: int = 0) -> tuple[list[dict[str, str]], str]:
    """n 450x450 RGB BMPs in ``root/{all,hem}/``; returns split-CSV rows and what was used."""
    real = sample_bmps()
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = "all" if i % 2 == 0 else "hem"
        path = root / label / f"img_{i:05d}.bmp"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_cell_bmp(path, i, real, rng)
        rows.append(split_row(path, label, f"s{i}", "train"))
    return rows, describe_cells(real)


def interleaved_rates(paths: dict[str, Callable[[], int]], epochs: int) -> dict[str, tuple[float, float]]:
    """(images per wall second, images per CPU second) of each path: one untimed warm-up epoch
    each, then ``epochs`` rounds timing one epoch of every path in turn, so that load changes on
    the machine hit all paths alike."""
    for run_epoch in paths.values():
        run_epoch()
    seen = dict.fromkeys(paths, 0)
    wall = dict.fromkeys(paths, 0.0)
    cpu = dict.fromkeys(paths, 0.0)
    for _ in range(epochs):
        for name, run_epoch in paths.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            seen[name] += run_epoch()
            wall[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - cpu_start
    return {name: (seen[name] / wall[name], seen[name] / cpu[name]) for name in paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="BMPs in the set (default 400)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per path (default 3)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1)")
    args = parser.parse_args()
    bs = args.batch_size
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp_name:
        tmp = Path(tmp_name)
        rows, what = make_image_folder(tmp / "raw", args.images)
        splits = tmp / "splits"
        splits.mkdir()
        pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS)).to_csv(splits / "train.csv", index=False)
        pd.DataFrame(rows[:2], columns=list(REQUIRED_COLUMNS)).to_csv(splits / "val.csv", index=False)
        per_class = (args.images + 1) // 2  # both classes already have M images: nothing augmented
        cfg = AugmentConfig(
            image_size=SIZE, per_class=per_class, strength=1.0, workers=0, preview_images=1, online=False
        )
        t0 = time.perf_counter()
        summary = prepare_dataset(splits, tmp / "store", cfg, seed=0, preview_path=tmp / "p.png", progress=False)
        build_s = time.perf_counter() - t0
        store = ImageStore(tmp / "store" / "train")
        assert len(store) == args.images, summary

        # (b) baseline: ImageFolder + Resize(224) + ToTensor + Normalize, DataLoader batch 64.
        baseline_tf = transforms.Compose(
            [
                transforms.Resize(SIZE),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        folder = datasets.ImageFolder(str(tmp / "raw"), transform=baseline_tf)
        loader = DataLoader(
            folder,
            batch_size=bs,
            shuffle=True,
            num_workers=0,
            generator=torch.Generator().manual_seed(0),
        )

        def baseline_epoch() -> int:
            n = 0
            for x, _ in loader:
                assert x.shape[1:] == (3, SIZE, SIZE) and x.dtype == torch.float32
                n += len(x)
            return n

        # (a) the store's fast batched path: one memmap slice + whole-batch normalisation.
        rng = np.random.default_rng(0)

        def store_epoch() -> int:
            n = 0
            for x, _ in store.batches(rng.permutation(len(store)), bs, IMAGENET_MEAN, IMAGENET_STD):
                assert x.shape[1:] == (3, SIZE, SIZE) and x.dtype == torch.float32
                n += len(x)
            return n

        # (a') the same store through a DataLoader (batch_loader), as the trainer uses it.
        dataset = StoreDataset(store, IMAGENET_MEAN, IMAGENET_STD)

        def store_loader_epoch() -> int:
            return sum(len(x) for x, _ in batch_loader(dataset, batch_size=bs, shuffle=True, seed=0))

        rates = interleaved_rates(
            {"baseline": baseline_epoch, "store": store_epoch, "loader": store_loader_epoch},
            args.epochs,
        )
        (base_rate, base_cpu), (store_rate, store_cpu), (loader_rate, loader_cpu) = (
            rates["baseline"],
            rates["store"],
            rates["loader"],
        )

    print(
        f"input throughput: {args.images} 450x450 BMPs ({what}) -> normalised "
        f"{SIZE}x{SIZE} float32, batch {bs}, num_workers=0 for both (main process, "
        f"{torch.get_num_threads()} torch thread(s)), "
        f"{args.epochs} timed epochs each (interleaved) after 1 warm-up; "
        f"1-min load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  store build (prepare_dataset, one-time): {build_s:.2f} s")
    print("                                                    images/s   images/CPU-s")
    print(f"  baseline ImageFolder + Resize/ToTensor/Normalize: {base_rate:10.1f} {base_cpu:12.1f}")
    print(f"  image store, ImageStore.batches (fast path):     {store_rate:10.1f} {store_cpu:12.1f}")
    print(f"  image store via DataLoader (batch_loader):       {loader_rate:10.1f} {loader_cpu:12.1f}")
    print(
        f"ratio store/baseline: {store_rate / base_rate:.1f}x (goal >= 10x); "
        f"per CPU-second {store_cpu / base_cpu:.1f}x; via DataLoader {loader_rate / base_rate:.1f}x"
    )


if __name__ == "__main__":
    main()

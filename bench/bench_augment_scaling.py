"""Augment-stage scaling: ``prepare_dataset`` with 1 worker vs all cores, same bytes out.

Goal measured: the ``augment`` stage uses every core (speed-up close to the core count)
while its output stays byte-identical whatever the number of workers. It builds a temporary
split set of 450x450 BMPs (copies of the real C-NMC sample cells in ``../shared/data/cnmc-sample``
when present, else random images), runs the whole stage (resize every split, balance train
to ``--per-class`` images per class with the paper's T at 224 px, write the store, the report
and the preview) once with ``workers=1`` and once with ``workers=os.cpu_count()``, same seed,
asserts every ``images.npy`` and ``index.csv`` is byte-identical, and prints the seconds and the
speed-up against the core count. ``workers=1`` runs in-process with one torch thread (one core);
an untimed tiny warm-up run goes first so imports and the page cache favour neither run.

Run (from the project root):
    .venv/bin/python bench/bench_augment_scaling.py [--originals 60] [--per-class 400] [--size 224]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _samples import (  # bench/ is on sys.path when a script here runs
    describe_cells,
    sample_bmps,
    split_row,
    write_cell_bmp,
)

from cnmc.core.config import AugmentConfig
from cnmc.data.augment import REQUIRED_COLUMNS, prepare_dataset


def make_splits(root: Path, counts: dict[str, dict[str, int]], seed: int = 0) -> tuple[Path, str]:
    """BMPs plus train/val/test CSVs with ``counts[split][label]`` images each."""
    real = sample_bmps()
    rng = np.random.default_rng(seed)
    (root / "raw").mkdir(parents=True)
    (root / "splits").mkdir()
    i = 0
    for split, per_label in counts.items():
        rows = []
        for label, n in per_label.items():
            for _ in range(n):
                path = root / "raw" / f"{split}_{label}_{i:05d}.bmp"
                write_cell_bmp(path, i, real, rng)
                i += 1
                rows.append(split_row(path, label, f"s{i}", split))
        frame = pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS))
        frame.to_csv(root / "splits" / f"{split}.csv", index=False)
    return root / "splits", describe_cells(real)


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the pool workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def store_bytes(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.name in ("images.npy", "index.csv")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--originals", type=int, default=60, help="training originals per class")
    parser.add_argument("--per-class", type=int, default=400, help="M, training images per class")
    parser.add_argument("--size", type=int, default=224, help="stored image side (paper: 224)")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    n = args.originals
    counts = {
        "train": {"all": n, "hem": max(1, n // 2)},
        "val": {"all": max(1, n // 6), "hem": max(1, n // 6)},
        "test": {"all": max(1, n // 6), "hem": max(1, n // 6)},
    }

    def config(workers: int) -> AugmentConfig:
        return AugmentConfig(
            image_size=args.size,
            per_class=args.per_class,
            strength=args.strength,
            workers=workers,
            preview_images=2,
            online=False,  # the stored augmentation is what the workers share
        )

    with tempfile.TemporaryDirectory(prefix="bench_augment_") as tmp_name:
        tmp = Path(tmp_name)
        splits, what = make_splits(tmp / "data", counts)
        # untimed warm-up (imports, matplotlib, page cache)
        warm = tmp / "warm"
        make_splits(warm, {"train": {"all": 2, "hem": 2}, "val": {"all": 1, "hem": 1}})
        warm_cfg = AugmentConfig(image_size=32, per_class=4, workers=1, preview_images=1, online=False)
        prepare_dataset(warm / "splits", warm / "store", warm_cfg, 0, warm / "p.png", progress=False)

        seconds: dict[int, float] = {}
        cpu: dict[int, float] = {}
        load_before = os.getloadavg()[0]
        outputs: dict[int, dict[str, bytes]] = {}
        for workers in (1, cores):
            out = tmp / f"store_w{workers}"
            start, cpu_start = time.perf_counter(), cpu_seconds()
            summary = prepare_dataset(splits, out, config(workers), args.seed, tmp / f"preview_w{workers}.png", False)
            seconds[workers] = time.perf_counter() - start
            cpu[workers] = cpu_seconds() - cpu_start
            outputs[workers] = store_bytes(out)
            print(f"  workers={workers}: {seconds[workers]:6.2f} s wall, {cpu[workers]:6.2f} s CPU  {summary}")

    assert outputs[1] == outputs[cores], "outputs differ between worker counts"
    train_imgs = args.per_class * 2
    made = sum(v for k, v in counts.items() for v in v.values())
    augmented = train_imgs - counts["train"]["all"] - counts["train"]["hem"]
    speedup = seconds[1] / seconds[cores]
    load_after = os.getloadavg()[0]
    print(
        f"augment scaling: {made} 450x450 BMPs ({what}) -> {args.size} px store, "
        f"train balanced to {args.per_class}/class ({augmented} augmented with T at strength "
        f"{args.strength:g}); outputs byte-identical for workers=1 and workers={cores}: yes"
    )
    print(
        f"ratio speed-up workers={cores} vs workers=1: {speedup:.2f}x on {cores} cores "
        f"({seconds[1]:.2f} s -> {seconds[cores]:.2f} s; efficiency {speedup / cores:.0%}); "
        f"1-min load average {load_before:.1f} before, {load_after:.1f} after "
        f"(other processes on the {cores} cores lower the speed-up)"
    )


if __name__ == "__main__":
    main()

"""Training speed: the pipeline's training epoch against the best bare timm loop, in one process.

Goal measured: images/second of ``Trainer.train_epoch`` (the store, the loader, the on-device
normalisation, the batch levers the settings switch on, the loss bookkeeping), also with the
paper's T drawn for every image as ``cnmc train`` does online (``--set train.num_workers=1`` puts
it in a loader process), as a share of a
bare loop that feeds the same model random tensors already in memory, in the fastest memory
format (channels-last, measured beside plain NCHW). Target: >= 0.9x of the best bare loop.

Both run the same backbone (random init: speed does not depend on the weights), batch size and
image size, with Adam and cross-entropy, alternating round by round so that other load on the
machine slows both alike; each round is one epoch of ``--images`` images (one untimed warm-up
round first). The pipeline reads a store of random uint8 images written in a temporary folder.

Run (from the project root; about 2 minutes on 2 CPU cores):
    .venv/bin/python bench/bench_train_speed.py [--images 256] [--rounds 3] [--image-size 128]
        [--batch-size 32] [--backbone tf_efficientnet_lite0] [--set train.rotation=d4 ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cnmc.core.config import Params, apply_overrides
from cnmc.data.store import IMAGES_FILE, INDEX_FILE, ImageStore
from cnmc.models.backbones import create_backbone
from cnmc.training.build import online_transform
from cnmc.training.trainer import Trainer


def write_store(folder: Path, n: int, size: int, seed: int = 0) -> ImageStore:
    """A store split of ``n`` random images, half of each class, four subjects."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    np.save(folder / IMAGES_FILE, rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8))
    targets = np.arange(n) % 2
    pd.DataFrame(
        {
            "path": [f"cell{i}.png" for i in range(n)],
            "label": np.where(targets == 1, "all", "hem"),
            "subject": [f"{'' if t else 'H'}{i % 4}" for i, t in enumerate(targets)],
            "target": targets,
        }
    ).to_csv(folder / INDEX_FILE, index=False)
    return ImageStore(folder)


def bare_epoch(model: nn.Module, n: int, batch_size: int, size: int, channels_last: bool) -> Callable[[], int]:
    """One epoch of the bare loop: the same random batch, already in memory, in the given format."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, 3, size, size).contiguous(memory_format=memory_format)
    y = torch.randint(0, 2, (batch_size,))
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> int:
        model.train()
        for _ in range(n // batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
        return n // batch_size * batch_size

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256, help="images per round (default 256)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per path (default 3)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="train settings of the pipeline")
    args = ap.parse_args()
    params = apply_overrides(Params(), [f"train.batch_size={args.batch_size}", "train.device=cpu", *args.set])
    n, size, bs = args.images, args.image_size, args.batch_size
    print(f"{args.backbone}, {n} images of {size} px a round, batch {bs}, {torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory(prefix="cnmc-speed-") as tmp:
        store = write_store(Path(tmp) / "train", n, size)
        torch.manual_seed(0)
        net = create_backbone(args.backbone, pretrained=False)
        trainer = Trainer(
            net.model, net.mean, net.std, store, store, params.train, params.seed, Path(tmp) / "ckpt.pt", "bench", 1,
            progress=False,
        )  # fmt: skip
        # As `cnmc train` runs with augment.online (the default): the paper's T drawn for every image.
        online = Trainer(
            create_backbone(args.backbone, pretrained=False).model, net.mean, net.std, store, store, params.train,
            params.seed, Path(tmp) / "ckpt2.pt", "bench", 1, train_transform=online_transform(params, size, 1.0),
            progress=False,
        )  # fmt: skip
        epoch = iter(range(10**6))
        paths: dict[str, Callable[[], int]] = {
            "bare NCHW": bare_epoch(create_backbone(args.backbone, pretrained=False).model, n, bs, size, False),
            "bare channels-last": bare_epoch(create_backbone(args.backbone, pretrained=False).model, n, bs, size, True),
            "pipeline": lambda: (trainer.train_epoch(next(epoch)), len(store))[1],
            "pipeline + online T": lambda: (online.train_epoch(next(epoch)), len(store))[1],
        }
        seconds = {name: 0.0 for name in paths}
        counts = {name: 0 for name in paths}
        for round_ in range(args.rounds + 1):
            for name, run in paths.items():
                began = time.perf_counter()
                images = run()
                if round_:  # round 0 warms up
                    seconds[name] += time.perf_counter() - began
                    counts[name] += images
    rates = {name: counts[name] / seconds[name] for name in paths}
    for name, rate in rates.items():
        print(f"  {name:>20}: {rate:6.1f} images/s")
    best = max(rates["bare NCHW"], rates["bare channels-last"])
    print(f"pipeline / best bare loop: {rates['pipeline'] / best:.2f}x (goal >= 0.9x)")
    print(f"pipeline + online T (as cnmc train) / best bare loop: {rates['pipeline + online T'] / best:.2f}x")


if __name__ == "__main__":
    main()

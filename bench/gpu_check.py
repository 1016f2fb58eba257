"""The prepared GPU check: input path, real Trainer epochs per paper backbone, Table 2 projection.

One script, one call, at most 8 minutes on one GPU (an H200 in the issue), so that a short lease
of a GPU machine answers the issue's questions at once:

1. **Input path alone.** A 20,000-image 224 px uint8 image store is written on the spot (synthetic
   cell-like images: only speed is measured) and read the way ``Trainer.train_epoch`` reads it: the
   Trainer's own ``train_ds`` (``StoreDataset(..., normalize=False)``) through ``batch_loader`` with
   the Trainer's ``loader_kwargs`` (its workers, pinned memory), each uint8 batch copied
   non-blocking to the GPU and normalised there by ``cnmc.inference.forward.model_input``. A fresh loader
   per epoch, as the Trainer makes one per epoch (so worker start-up counts), timed between two
   ``torch.cuda.synchronize()``. Goal: >= 10,000 img/s at 224 px (PASS/below).
2. **Training through the pipeline's Trainer.** For each paper backbone (resnet50, resnet101,
   efficientnet_b0/b1/b3, random init from ``create_backbone``) and each configuration (``eager``:
   ``TrainConfig(compile=False)``; ``compile``: ``compile=True``), both with mixed precision and
   channels-last: a short warm-up on a subset (a few training batches plus one batch of the
   epoch's last-batch size, and the same for validation, so cuDNN, the allocator and, compiled,
   every graph shape are ready), then one real ``Trainer.fit()`` epoch on the whole store
   (input path, training, validation, checkpoint). Inside ``fit()`` the Trainer's own
   ``train_epoch`` and ``predict`` calls are timed (with a device sync), which gives training
   img/s, validation img/s and the rest of the epoch (metrics, best-state copy, checkpoint)
   separately. The warm-up is reported on its own: for ``compile`` it holds the compilation.
   Whether the model really ran compiled is read from dynamo's counters (graphs made), not
   assumed: the Trainer falls back to eager, with a warning, where compiling fails.
3. **Projection of the paper's Table 2**: 5 backbones x 50 epochs x (2 x 10,000 augmented training
   images + ~1,100 validation images) at 224 px, each backbone in its faster configuration
   (its warm-up once, beyond what those images cost at speed), against the 30-minute goal.
   50 epochs is the upper bound: early stopping (patience 15 in the paper) can only shorten it.
4. **The bf16 baselines** it compares with (``bench_gpu_train.py`` on an H200, batch 64, bf16 +
   channels-last, synthetic inputs already on the GPU): efficientnet_b3 1,156 img/s, resnet50
   2,650 img/s; goal: each trains >= 1.5x faster here, input path included.

Time budget: ``--budget-s`` (default 420 s from the start of ``main``) is checked before each
configuration against an estimate of its cost; configurations that do not fit are skipped and
listed. All eager configurations run first (they are cheap and give a projection for every
backbone), then the compiled ones, slowest backbone first (where compiling can save the most).
A watchdog stops the run at ``--hard-limit-s`` (default 460 s) even inside a long compilation,
printing and writing what was measured so far, so the whole call stays under 8 minutes. The
figures go to ``--out`` as JSON after every configuration (default ``$OUT/gpu_check.json`` when
``OUT`` is set, else ``outputs/gpu_check.json``).

Run (from the project root, on a machine with a CUDA GPU; give the call about 9 minutes):
    .venv/bin/python bench/gpu_check.py [--batch-size 128] [--budget-s 420] [--out FILE]
        [--backbones resnet50,...] [--configs eager,compile]

Without a CUDA device it prints ``skipped: no CUDA device (...)`` and exits 0. ``--smoke`` runs
every step at toy size (64 images at 32 px, ``test_resnet`` and ``test_efficientnet``, batch 16,
eager only: compiling on a CPU needs a C compiler and minutes) on whatever device there is, so
CI exercises the script's code paths in well under a minute.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
from torch import nn

from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import TrainConfig
from cnmc.data.store import IMAGENET_MEAN, IMAGENET_STD, IMAGES_FILE, INDEX_FILE, ImageStore, batch_loader
from cnmc.inference.forward import model_input
from cnmc.models.backbones import create_backbone
from cnmc.training.trainer import Trainer

PAPER_BACKBONES = ("resnet50", "resnet101", "efficientnet_b0", "efficientnet_b1", "efficientnet_b3")
SMOKE_BACKBONES = ("test_resnet", "test_efficientnet")
CONFIGS = ("eager", "compile")
INPUT_GOAL_IPS = 10_000  # images/s the input path must deliver at 224 px
# bench_gpu_train.py on an H200: batch 64, bf16 autocast + channels-last, inputs already on the GPU.
BASELINE_IPS = {"efficientnet_b3": 1156.0, "resnet50": 2650.0}
BASELINE_GOAL_RATIO = 1.5
# The paper's Table 2: 5 backbones x 50 epochs, 2 x 10,000 augmented training images per epoch at
# 224 px, validation on its val split (~1,100 images).
PAPER_EPOCHS, PAPER_TRAIN_IMAGES, PAPER_VAL_IMAGES = 50, 20_000, 1_100
TABLE2_GOAL_S = 30 * 60
# Rough eager bf16 training img/s on an H200, only to decide whether a configuration still fits
# the time budget before it has been measured (the first two are the baselines above).
GUESS_IPS = {"resnet50": 2650.0, "resnet101": 1500.0, "efficientnet_b0": 3000.0, "efficientnet_b1": 2000.0}
GUESS_IPS_DEFAULT = 1156.0


class Clock:
    """Seconds since ``main`` started, against the soft budget (skip) and the hard limit (stop)."""

    def __init__(self, budget_s: float, hard_limit_s: float):
        self.start = time.perf_counter()
        self.budget_s, self.hard_limit_s = budget_s, hard_limit_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s <= self.budget_s


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer stops when the work is done, not queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the store ---------------------------------------------------------------------------------


def cell_like_pool(count: int, size: int, seed: int) -> np.ndarray:
    """``count`` distinct uint8 (size, size, 3) images, made in a few whole-array numpy ops: a pale
    background with noise and one darker, purple-ish disc (a stained cell) at a random place."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy = rng.uniform(0.35, 0.65, count).astype(np.float32)[:, None, None] * size
    cx = rng.uniform(0.35, 0.65, count).astype(np.float32)[:, None, None] * size
    radius = rng.uniform(0.18, 0.32, count).astype(np.float32)[:, None, None] * size
    inside = (yy[None] - cy) ** 2 + (xx[None] - cx) ** 2 <= radius**2  # (count, size, size)
    background = np.array([226, 210, 224], dtype=np.uint8)
    cell = np.array([120, 70, 150], dtype=np.uint8)
    images = np.where(inside[..., None], cell, background)
    noise = rng.integers(0, 24, size=images.shape, dtype=np.uint8)
    return images.astype(np.uint8) - noise  # no wrap-around: every channel value is >= 70


def write_store_split(split_dir: Path, count: int, size: int, seed: int) -> None:
    """One split of an image store in the layout ``cnmc.data.store`` reads (``images.npy`` +
    ``index.csv``), written the way the augment stage writes it (``open_memmap``), but filled from a
    small pool of synthetic images by whole-block copies: seconds for 20,000 images, not minutes."""
    split_dir.mkdir(parents=True, exist_ok=True)
    pool = cell_like_pool(min(count, 256), size, seed)
    images = np.lib.format.open_memmap(split_dir / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(count, size, size, 3))
    for start in range(0, count, len(pool)):
        n = min(len(pool), count - start)
        images[start : start + n] = pool[:n]
    images.flush()
    del images
    targets = np.arange(count) % 2  # balanced: 1 = all, 0 = hem
    pd.DataFrame(
        {
            "label": np.where(targets == 1, "all", "hem"),
            "target": targets,
            "augmented": 0,
            "origin": np.arange(count),
            "aug_seed": 0,
        }
    ).to_csv(split_dir / INDEX_FILE, index=False)


# -- the Trainer --------------------------------------------------------------------------------


def train_config(args: argparse.Namespace, compile_model: bool) -> TrainConfig:
    """One epoch, no early stop, random init, mixed precision and channels-last: the GPU settings."""
    return TrainConfig(
        epochs=1,
        patience=1000,
        batch_size=args.batch_size,
        pretrained=False,
        mixed_precision=True,
        channels_last=True,
        compile=compile_model,
    )


def make_trainer(
    model: nn.Module,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    stores: dict[str, ImageStore],
    cfg: TrainConfig,
    checkpoint: Path,
) -> Trainer:
    return Trainer(
        model,
        mean,
        std,
        stores["train"],
        stores["val"],
        cfg,
        seed=0,
        checkpoint_path=checkpoint,
        fingerprint="gpu-check",
        min_val_per_class=1,
        progress=False,
    )


def measure_input_path(stores: dict[str, ImageStore], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Images/s of the training input path alone: the loader a Trainer builds (its ``train_ds`` and
    ``loader_kwargs``; a stand-in model, never run) into ``model_input`` on the device. The best of
    ``--input-epochs`` epochs counts: the first also pays one-time costs (pinned-memory pool growth,
    first kernel launches) that a training run pays once, not every epoch."""
    trainer = make_trainer(
        nn.Linear(1, 2), IMAGENET_MEAN, IMAGENET_STD, stores, train_config(args, False), tmp / "probe.pt"
    )
    device, bs = trainer.device, args.batch_size
    channels_last = trainer.cuda and trainer.cfg.channels_last
    kwargs = dict(trainer.loader_kwargs)
    rates = []
    for epoch in range(args.input_epochs):
        sync(device)
        start = time.perf_counter()
        # A new loader per epoch, as Trainer.train_epoch makes one (worker start-up included).
        loader = batch_loader(trainer.train_ds, batch_size=bs, shuffle=True, seed=epoch, **kwargs)
        seen = 0
        for raw, host_targets in loader:
            seen += len(model_input(raw, trainer.mean, trainer.std, device, channels_last))
            host_targets.to(device, non_blocking=True)
        del loader  # its workers stop, as the Trainer's do at the end of an epoch
        sync(device)
        rates.append(seen / (time.perf_counter() - start))
    best = max(rates)
    return {
        "images": len(stores["train"]),
        "image_size": stores["train"].image_size,
        "batch_size": bs,
        "loader_kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))},
        "epoch_images_per_s": rates,
        "images_per_s": best,
        "goal_images_per_s": INPUT_GOAL_IPS,
        "pass": best >= INPUT_GOAL_IPS,
    }


def dynamo_stats() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far, from dynamo's counters (0, 0 where unreadable)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0, 0
    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


@contextmanager
def collected_notes() -> Iterator[list[str]]:
    """Warnings of the cnmc loggers and Python warnings about compiling, seen inside the block
    (the Trainer's compile fallback announces itself this way)."""
    notes: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("cnmc")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notes
    finally:
        logger.removeHandler(handler)
    shown: set[str] = set()
    for w in caught:
        text = str(w.message)
        if "compil" in text.lower():
            notes.append(text)
        elif text not in shown:  # the rest still reach stderr, once each
            shown.add(text)
            print(f"warning ({w.category.__name__}): {text[:300]}", file=sys.stderr)


def time_calls(trainer: Trainer, device: torch.device) -> dict[str, list[float]]:
    """Time the Trainer's own ``train_epoch`` and ``predict`` calls made inside ``fit()``.

    Instance attributes shadow the methods, so ``fit()`` (``self.train_epoch(...)``) calls these
    wrappers; they sync the device before reading the clock.
    """
    seconds: dict[str, list[float]] = {"train_epoch": [], "predict": []}

    def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **kw: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            out = method(*a, **kw)
            sync(device)
            seconds[name].append(time.perf_counter() - start)
            return out

        return call

    trainer.train_epoch = timed("train_epoch", trainer.train_epoch)  # type: ignore[method-assign]
    trainer.predict = timed("predict", trainer.predict)  # type: ignore[method-assign]
    return seconds


def warm_up(trainer: Trainer, stores: dict[str, ImageStore], args: argparse.Namespace) -> dict[str, Any]:
    """Train a few batches and validate a few, on subsets whose last batch has the size the real
    epoch's last batch will have: cuDNN and the allocator warm up, and a compiled model compiles
    every shape (training and evaluation) before the timed epoch."""
    device, bs = trainer.device, args.batch_size
    n_train, n_val = len(stores["train"]), len(stores["val"])
    vbs = 2 * bs  # Trainer.predict's batch size
    warm_train = min(n_train, args.warmup_batches * bs + n_train % bs)
    warm_val = min(n_val, vbs + n_val % vbs)
    full = trainer.train_ds
    sync(device)
    start = time.perf_counter()
    try:
        trainer.train_ds = type(full)(
            stores["train"].subset(np.arange(warm_train)), full.mean, full.std, normalize=False
        )
        trainer.train_epoch(0)
    finally:
        trainer.train_ds = full
    trainer.predict(type(full)(stores["val"].subset(np.arange(warm_val)), full.mean, full.std, normalize=False))
    sync(device)
    return {"seconds": time.perf_counter() - start, "train_images": warm_train, "val_images": warm_val}


def run_config(
    name: str, config: str, stores: dict[str, ImageStore], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """Warm-up, then one ``fit()`` epoch of backbone ``name`` in ``config``; the figures as a row."""
    compile_model = config == "compile"
    backbone = create_backbone(name, pretrained=False)
    checkpoint = tmp / f"{name}-{config}.pt"
    row: dict[str, Any] = {"backbone": name, "config": config, "compile_requested": compile_model}
    graphs0, breaks0 = dynamo_stats()
    with collected_notes() as notes:
        trainer = make_trainer(
            backbone.model, backbone.mean, backbone.std, stores, train_config(args, compile_model), checkpoint
        )
        device = trainer.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm = warm_up(trainer, stores, args)
        graphs1, _ = dynamo_stats()
        seconds = time_calls(trainer, device)
        result = trainer.fit()
        graphs2, breaks2 = dynamo_stats()
    n_train, n_val = len(stores["train"]), len(stores["val"])
    train_s = sum(seconds["train_epoch"]) if seconds["train_epoch"] else None
    val_s = sum(seconds["predict"]) if seconds["predict"] else None
    row.update(
        {
            "amp_dtype": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "float32",
            "graphs_compiled": graphs2 - graphs0,
            "graphs_compiled_in_timed_epoch": graphs2 - graphs1,
            "graph_breaks": breaks2 - breaks0,
            "compiled": graphs2 > graphs0,
            "notes": list(dict.fromkeys(n[:300] for n in notes)),
            "warmup_s": warm["seconds"],
            "warmup_train_images": warm["train_images"],
            "warmup_val_images": warm["val_images"],
            "train_images": n_train,
            "val_images": n_val,
            "fit_s": result.seconds,
            "train_s": train_s,
            "val_s": val_s,
            "fit_images_per_s": n_train / result.seconds,
            "train_images_per_s": n_train / train_s if train_s else None,
            "val_images_per_s": n_val / val_s if val_s else None,
            "other_s": result.seconds - train_s - val_s if train_s and val_s else None,
            "train_loss": result.history[-1]["train_loss"] if result.history else None,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
    )
    # The warm-up beyond what its images cost at the measured speed: compilation, autotuning.
    if row["train_images_per_s"] and row["val_images_per_s"]:
        at_speed = warm["train_images"] / row["train_images_per_s"] + warm["val_images"] / row["val_images_per_s"]
        row["warmup_extra_s"] = max(0.0, warm["seconds"] - at_speed)
    else:
        row["warmup_extra_s"] = warm["seconds"]
    del trainer, backbone, result
    checkpoint.unlink(missing_ok=True)
    release_memory(compile_model)
    return row


def release_memory(compiled: bool) -> None:
    """Free the configuration's model, optimizer and (compiled) graphs before the next one."""
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compile_state(row: dict[str, Any]) -> str:
    """How a row ran, in words: eager, compiled, or requested but not compiled (and why, if said)."""
    if not row["compile_requested"]:
        return "eager"
    if row["compiled"]:
        late = row["graphs_compiled_in_timed_epoch"]
        suffix = f", {late} graphs compiled inside the timed epoch" if late else ""
        return f"compiled ({row['graphs_compiled']} graphs, {row['graph_breaks']} graph breaks{suffix})"
    said = "; ".join(row["notes"]) or "the Trainer did not compile and said nothing"
    return f"NOT compiled ({said})"


def format_row(row: dict[str, Any]) -> str:
    def rate(value: float | None) -> str:
        return f"{value:8.0f}" if value else "     n/a"

    other = f"{row['other_s']:.1f}" if row["other_s"] is not None else "n/a"
    return (
        f"  {row['backbone']:<17} {row['config']:<8} train {rate(row['train_images_per_s'])} img/s  "
        f"val {rate(row['val_images_per_s'])} img/s  fit epoch {row['fit_s']:6.1f} s "
        f"({rate(row['fit_images_per_s']).strip()} img/s incl. val, other {other} s)  "
        f"warm-up {row['warmup_s']:5.1f} s ({row['warmup_extra_s']:.1f} s beyond its images at speed)  "
        f"{compile_state(row)}"
        + "".join(f"\n      note: {n}" for n in row["notes"] if row["compiled"] or not row["compile_requested"])
    )


# -- the verdicts --------------------------------------------------------------------------------


def paper_run_seconds(row: dict[str, Any]) -> float:
    """One backbone's 50 paper epochs in this row's configuration, plus its warm-up extra once."""
    if row["train_images_per_s"] and row["val_images_per_s"]:
        epoch = (
            PAPER_TRAIN_IMAGES / row["train_images_per_s"]
            + PAPER_VAL_IMAGES / row["val_images_per_s"]
            + (row["other_s"] or 0.0)
        )
    else:  # the timers saw nothing: scale the whole fit epoch by the images
        epoch = row["fit_s"] * (PAPER_TRAIN_IMAGES + PAPER_VAL_IMAGES) / (row["train_images"] + row["val_images"])
    return PAPER_EPOCHS * epoch + row["warmup_extra_s"]


def project_table2(rows: list[dict[str, Any]], backbones: list[str]) -> dict[str, Any]:
    """The paper's Table 2 wall-clock, each backbone in its faster configuration."""
    per_backbone: dict[str, Any] = {}
    for name in backbones:
        options = {r["config"]: paper_run_seconds(r) for r in rows if r["backbone"] == name}
        if options:
            best = min(options, key=lambda c: options[c])
            per_backbone[name] = {"config": best, "seconds": options[best], "by_config": options}
    missing = [b for b in backbones if b not in per_backbone]
    total = sum(v["seconds"] for v in per_backbone.values())
    return {
        "epochs": PAPER_EPOCHS,
        "train_images_per_epoch": PAPER_TRAIN_IMAGES,
        "val_images_per_epoch": PAPER_VAL_IMAGES,
        "per_backbone": per_backbone,
        "missing_backbones": missing,
        "total_s": total,
        "goal_s": TABLE2_GOAL_S,
        "pass": not missing and total <= TABLE2_GOAL_S,
    }


def baseline_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each baselined backbone's best training img/s here against the bf16 baseline."""
    out: dict[str, Any] = {}
    for name, baseline in BASELINE_IPS.items():
        rates = [r["train_images_per_s"] for r in rows if r["backbone"] == name and r["train_images_per_s"]]
        best = max(rates) if rates else None
        ratio = best / baseline if best else None
        out[name] = {
            "baseline_images_per_s": baseline,
            "images_per_s": best,
            "ratio": ratio,
            "goal_ratio": BASELINE_GOAL_RATIO,
            "pass": ratio is not None and ratio >= BASELINE_GOAL_RATIO,
        }
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "below"


def print_summary(report: dict[str, Any]) -> None:
    """The verdicts: input path, a table of the rows, baseline ratios, Table 2 projection, what was skipped."""
    caveat = "  (smoke: toy sizes, the verdicts mean nothing)" if report["settings"]["smoke"] else ""
    print(f"\nsummary{caveat}")
    inp = report.get("input_path")
    if inp:
        print(
            f"  input path: {inp['images_per_s']:.0f} img/s at {inp['image_size']} px "
            f"-> {verdict(inp['pass'])} (goal >= {INPUT_GOAL_IPS} img/s)"
        )
    if report["training"]:
        print(f"  {'backbone':<17} {'config':<8} {'train img/s':>11} {'val img/s':>9} {'epoch s':>7} {'warm-up s':>9}")
        for r in report["training"]:
            train, val = r["train_images_per_s"] or 0.0, r["val_images_per_s"] or 0.0
            state = compile_state(r).split(" (")[0]
            print(
                f"  {r['backbone']:<17} {r['config']:<8} {train:11.0f} {val:9.0f} {r['fit_s']:7.1f} "
                f"{r['warmup_s']:9.1f}  {state}"
            )
    for name, b in report["baselines"].items():
        if b["images_per_s"] is None:
            print(f"  {name}: not measured (baseline {b['baseline_images_per_s']:.0f} img/s)")
            continue
        print(
            f"  {name}: {b['images_per_s']:.0f} img/s vs bf16 baseline {b['baseline_images_per_s']:.0f} img/s "
            f"(H200, batch 64, bf16 + channels-last) = {b['ratio']:.2f}x -> {verdict(b['pass'])} "
            f"(goal >= {BASELINE_GOAL_RATIO}x)"
        )
    proj = report["projection"]
    print(
        f"  projected Table 2: {len(proj['per_backbone'])} backbones x {PAPER_EPOCHS} epochs x "
        f"({PAPER_TRAIN_IMAGES} train + {PAPER_VAL_IMAGES} val images), faster configuration each:"
    )
    for name, p in proj["per_backbone"].items():
        others = ", ".join(f"{c} {s / 60:.1f} min" for c, s in p["by_config"].items())
        print(f"    {name:<17} {p['seconds'] / 60:6.1f} min ({p['config']}; {others})")
    missing = f"; NOT measured: {', '.join(proj['missing_backbones'])}" if proj["missing_backbones"] else ""
    print(
        f"    total {proj['total_s'] / 60:.1f} min -> {verdict(proj['pass'])} "
        f"(goal < {TABLE2_GOAL_S // 60} min{missing})"
    )
    for s in report["skipped"]:
        print(f"  skipped {s['backbone']} {s['config']}: {s['reason']}")
    if report.get("stopped"):
        print(f"  STOPPED: {report['stopped']}")
    print(f"  wall-clock {report['elapsed_s']:.0f} s of budget {report['settings']['budget_s']:.0f} s", flush=True)


def write_report(report: dict[str, Any], clock: Clock, out: Path) -> None:
    report["elapsed_s"] = clock.elapsed()
    report["baselines"] = baseline_ratios(report["training"])
    report["projection"] = project_table2(report["training"], report["settings"]["backbones"])
    atomic_write_text(out, json.dumps(report, indent=2, default=str) + "\n")


# -- the run --------------------------------------------------------------------------------------


def describe_machine(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "gpu_memory_gib": props.total_memory / 2**30 if props else None,
        "capability": f"{props.major}.{props.minor}" if props else None,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else False,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }


def estimate_seconds(name: str, config: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> float:
    """What a configuration will probably take: its eager epoch where measured (else a guess from
    GUESS_IPS), plus, compiled, the largest compile warm-up seen so far (else ``--compile-estimate-s``)."""
    eager = [r for r in rows if r["backbone"] == name and r["config"] == "eager"]
    if eager:
        base = eager[0]["fit_s"] + eager[0]["warmup_s"] + 5.0
    else:
        ips = GUESS_IPS.get(name, GUESS_IPS_DEFAULT)
        base = 1.3 * (args.train_images + args.val_images / 3) / ips + 10.0
    if config != "compile":
        return base
    compiled = [r["warmup_s"] for r in rows if r["config"] == "compile" and r["compiled"]]
    return base + max([args.compile_estimate_s, *compiled])


def plan(
    backbones: list[str], configs: list[str], rows: list[dict[str, Any]], compile_order: str
) -> Iterator[tuple[str, str]]:
    """Eager first, in the given order; then compiled, slowest eager epoch first (where compiling
    can save the most) or in the given order. A generator: the order is read after the eager rows."""
    if "eager" in configs:
        for name in backbones:
            yield name, "eager"
    if "compile" in configs:
        fit_s = {r["backbone"]: r["fit_s"] for r in rows if r["config"] == "eager"}
        order = sorted(backbones, key=lambda b: -fit_s.get(b, 0.0)) if compile_order == "slowest" else backbones
        for name in order:
            yield name, "compile"


def start_watchdog(report: dict[str, Any], clock: Clock, out: Path, tmp: Path) -> threading.Timer:
    """At the hard limit, even inside a long compilation: print and write what is there, then exit."""

    def stop() -> None:
        report["stopped"] = f"hard limit {clock.hard_limit_s:g} s reached during {report.get('running')}"
        write_report(report, clock, out)
        print_summary(report)
        print(f"figures: {out}", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os._exit(0)

    timer = threading.Timer(max(0.0, clock.hard_limit_s - clock.elapsed()), stop)
    timer.daemon = True
    timer.start()
    return timer


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("outputs/gpu_check.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=None, help="training batch (default 128; --smoke 16)")
    ap.add_argument("--backbones", default=None, help="comma-separated (default the five paper backbones)")
    ap.add_argument("--configs", default=None, help="eager,compile (default both; --smoke: eager)")
    ap.add_argument("--train-images", type=int, default=None, help="training store size (default 20000)")
    ap.add_argument("--val-images", type=int, default=None, help="validation store size (default 2000)")
    ap.add_argument("--image-size", type=int, default=None, help="square image side (default 224; --smoke 32)")
    ap.add_argument("--input-epochs", type=int, default=2, help="timed epochs of the input path (default 2)")
    ap.add_argument("--warmup-batches", type=int, default=3, help="training batches warmed up per config")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no configuration past this (default 420)")
    ap.add_argument("--hard-limit-s", type=float, default=460.0, help="stop the run at this (default 460)")
    ap.add_argument(
        "--compile-estimate-s", type=float, default=120.0, help="assumed compile warm-up before one is seen"
    )
    ap.add_argument(
        "--compile-order",
        choices=("slowest", "given"),
        default="slowest",
        help="compiled configurations: slowest eager backbone first (default) or in --backbones order",
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON of all figures (default $OUT/gpu_check.json)")
    ap.add_argument("--smoke", action="store_true", help="toy size on any device (CI): every code path, seconds")
    args = ap.parse_args(argv)
    toy = args.smoke
    defaults = {
        "batch_size": 16 if toy else 128,
        "backbones": ",".join(SMOKE_BACKBONES if toy else PAPER_BACKBONES),
        "configs": "eager" if toy else ",".join(CONFIGS),
        "train_images": 64 if toy else 20_000,
        "val_images": 32 if toy else 2_000,
        "image_size": 32 if toy else 224,
        "out": default_out(),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown := [c for c in args.configs if c not in CONFIGS]:
        ap.error(f"unknown configs {unknown}: choose from {', '.join(CONFIGS)}")
    if min(args.batch_size, args.train_images, args.val_images, args.image_size, args.input_epochs) < 1:
        ap.error("--batch-size, --train-images, --val-images, --image-size and --input-epochs must be >= 1")
    if not args.backbones or not args.configs:
        ap.error("give at least one backbone and one config")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print(
            f"skipped: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
            f"torch.cuda.is_available() is False); --smoke runs it at toy size on the CPU"
        )
        return 0
    clock = Clock(args.budget_s, args.hard_limit_s)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = describe_machine(device)
    print(
        f"GPU check on {machine['device']} | torch {machine['torch']} | timm {machine['timm']} | "
        f"CUDA {machine['cuda']} | cuDNN {machine['cudnn']} | bf16 {machine['bf16_supported']} | "
        f"{machine['cpus']} CPUs"
    )
    print(
        f"cudnn.benchmark {machine['cudnn_benchmark']} (as the pipeline runs), TF32 matmul "
        f"{machine['tf32_matmul']} / cuDNN {machine['tf32_cudnn']}; batch {args.batch_size}, "
        f"mixed precision + channels-last; budget {args.budget_s:.0f} s, hard limit {args.hard_limit_s:.0f} s"
    )
    if not torch.cuda.is_available():
        print("smoke run without CUDA: on the CPU at toy size (no autocast, no channels-last, no compile)")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report: dict[str, Any] = {"machine": machine, "settings": settings, "training": [], "skipped": []}
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    watchdog = start_watchdog(report, clock, args.out, tmp)
    try:
        started = time.perf_counter()
        for split, count, seed in (("train", args.train_images, 0), ("val", args.val_images, 1)):
            write_store_split(tmp / "store" / split, count, args.image_size, seed)
        stores = {split: ImageStore(tmp / "store" / split) for split in ("train", "val")}
        report["store"] = {
            "train_images": args.train_images,
            "val_images": args.val_images,
            "image_size": args.image_size,
            "build_s": time.perf_counter() - started,
        }
        print(
            f"store: {args.train_images} train + {args.val_images} val synthetic cell images, "
            f"{args.image_size} px uint8, written in {report['store']['build_s']:.1f} s",
            flush=True,
        )

        report["running"] = "input path"
        inp = measure_input_path(stores, args, tmp)
        report["input_path"] = inp
        epochs = ", ".join(f"{r:.0f}" for r in inp["epoch_images_per_s"])
        print(
            f"input path (Trainer's StoreDataset(normalize=False) + batch_loader {inp['loader_kwargs']}, "
            f"batch {inp['batch_size']}, non-blocking copy, model_input on {device.type}): "
            f"{inp['images_per_s']:.0f} img/s (best epoch; epochs: {epochs}) -> {verdict(inp['pass'])} "
            f"(goal >= {INPUT_GOAL_IPS} img/s)",
            flush=True,
        )
        write_report(report, clock, args.out)

        if "compile" not in args.configs:
            print("compile: not run (--configs eager" + (", --smoke)" if args.smoke else ")"))
        print(
            f"training: Trainer warm-up ({args.warmup_batches} batches + last-batch shape, train and val), "
            f"then one fit() epoch on {args.train_images} images + validation on {args.val_images}:",
            flush=True,
        )
        rows: list[dict[str, Any]] = report["training"]
        for name, config in plan(args.backbones, args.configs, rows, args.compile_order):
            estimate = estimate_seconds(name, config, rows, args)
            if not clock.fits(estimate):
                left = max(0.0, args.budget_s - clock.elapsed())
                reason = f"time budget: about {estimate:.0f} s needed, {left:.0f} s left"
                report["skipped"].append({"backbone": name, "config": config, "reason": reason})
                print(f"  {name:<17} {config:<8} skipped ({reason})", flush=True)
                continue
            report["running"] = f"{name} {config}"
            try:
                row = run_config(name, config, stores, args, tmp)
            except torch.cuda.OutOfMemoryError:
                release_memory(config == "compile")
                reason = f"out of GPU memory at batch {args.batch_size}"
                report["skipped"].append({"backbone": name, "config": config, "reason": reason})
                print(f"  {name:<17} {config:<8} {reason}", flush=True)
                continue
            rows.append(row)
            print(format_row(row), flush=True)
            write_report(report, clock, args.out)
        report["running"] = None
        watchdog.cancel()
        write_report(report, clock, args.out)
        print_summary(report)
        print(f"figures: {args.out}")
    finally:
        watchdog.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

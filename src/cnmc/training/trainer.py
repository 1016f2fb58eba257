"""Fine-tune one backbone on the image store: Adam + cross-entropy, early stopping on
validation macro F1 (ties broken by validation loss), a checkpoint every epoch and exact resume.

The loop knows nothing of MLflow: it reports each epoch to a callback, so tracking,
tuning (pruning) and tests can all drive it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms import Join
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cnmc.core.config import TrainConfig
from cnmc.core.distributed import ONE_PROCESS, World, all_sum, evaluation_share, gather_rows
from cnmc.core.errors import CnmcError
from cnmc.data.batch_augment import hed_jitter, random_symmetries
from cnmc.data.sampling import draw_weights, epoch_rows
from cnmc.data.store import ImageStore, StoreDataset, Transform, batch_loader
from cnmc.inference.forward import autocast, model_input, predict_outputs, prob_all
from cnmc.metrics.scores import binary_metrics, judging_shortfall
from cnmc.models.param_groups import parameter_groups
from cnmc.training.head_init import fit_probe_head

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, float]], None]


@dataclass
class FitResult:
    """What training produced: the best weights (by validation macro F1) and the history."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_f1_macro: float
    best_val_loss: float = math.inf
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0
    selection: str = "best validation macro F1"  # how best_epoch was chosen
    val_probs: list[list[float]] = field(default_factory=list)  # P(ALL) of every validation image, each epoch


def improves(best: FitResult, val_f1_macro: float, val_loss: float) -> bool:
    """Whether an epoch beats the best so far: higher validation macro F1, or the same F1 with a
    lower validation loss. On a small validation set F1 moves in coarse steps and often ties
    for several epochs while the loss still falls; the strict F1 rule alone kept the earliest."""
    if val_f1_macro != best.best_val_f1_macro:
        return val_f1_macro > best.best_val_f1_macro
    return val_loss < best.best_val_loss


def resolve_device(cfg: TrainConfig, world: World = ONE_PROCESS) -> torch.device:
    """The training device; under torchrun on CUDA, this rank's GPU (``LOCAL_RANK``)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise CnmcError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda", world.local_rank) if cuda else torch.device("cpu")


def uses_cuda(cfg: TrainConfig) -> bool:
    return resolve_device(cfg).type == "cuda"


def config_fingerprint(payload: dict[str, Any]) -> str:
    """A short hash of what must not change between an interrupted run and its resume."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so a killed job still leaves its last checkpoint intact."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Trainer:
    """One training run of ``model`` on ``train``/``val`` stores.

    Under torchrun (``world`` of several processes) the model is wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel`: each rank trains on its share of every
    epoch (``train.batch_size`` is the global batch, split between the ranks), gradients are
    all-reduced, validation is sharded and gathered so that every rank sees the metrics of all
    images and takes the same early-stopping decision, and rank 0 alone writes the checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        train: ImageStore,
        val: ImageStore,
        cfg: TrainConfig,
        seed: int,
        checkpoint_path: Path,
        fingerprint: str,
        min_val_per_class: int,
        train_transform: Transform | None = None,
        per_class: int | None = None,
        progress: bool = True,
        world: World = ONE_PROCESS,
    ):
        if cfg.batch_size % world.size:
            raise CnmcError(
                f"train.batch_size {cfg.batch_size} is the global batch: it must divide by the "
                f"{world.size} training processes"
            )
        self.world, self.rank_batch = world, cfg.batch_size // world.size
        self.device = resolve_device(cfg, world)
        self.cuda = self.device.type == "cuda"
        self.model = model.to(self.device)
        if cfg.channels_last:  # faster on CUDA and on CPU alike (bench/bench_train_speed.py)
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.cuda else None)
            if world.distributed
            else None
        )
        self.net: nn.Module = self.ddp or self.model  # what a training step calls
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = torch.compile(self.net) if cfg.compile else None
        self._compile_tried = False
        self.cfg, self.seed, self.progress = cfg, seed, progress and world.is_main
        self.mean, self.std = mean, std
        # uint8 batches: normalised on the device (cnmc.inference.forward.model_input), a quarter of the bytes to move.
        self.train_ds = StoreDataset(train, mean, std, transform=train_transform, normalize=False)
        self.val_ds = StoreDataset(val, mean, std, normalize=False)
        # A validation set too small in a class cannot pick an epoch: then every epoch runs and the last is kept.
        self.val_shortfall = judging_shortfall(val.targets, min_val_per_class)
        self.checkpoint_path, self.fingerprint = checkpoint_path, fingerprint
        subjects = train.index["subject"].to_numpy() if "subject" in train.index.columns else None
        self.draw_weights = draw_weights(train.targets, subjects, cfg.sampling)
        self.per_class = per_class  # online augmentation: an epoch draws this many of each class
        self.optimizer = torch.optim.Adam(
            parameter_groups(self.model, cfg.lr, cfg.lr_stem_factor, cfg.lr_head_factor), lr=cfg.lr
        )
        self.loss_fn = nn.CrossEntropyLoss()
        amp_dtype = torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.amp_dtype = amp_dtype if self.cuda and cfg.mixed_precision else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        workers = cfg.num_workers if cfg.num_workers >= 0 else (min(8, os.cpu_count() or 1) if self.cuda else 0)
        self.loader_kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": self.cuda}
        if workers:
            self.loader_kwargs["persistent_workers"] = True

    # -- one epoch -----------------------------------------------------------------------
    def _autocast(self) -> Any:
        return autocast(self.device, self.amp_dtype)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """A training forward pass: compiled when ``train.compile`` is on and compiling works here
        (the first step tells; a failure there warns and trains eagerly from then on)."""
        if self._compiled is not None and not self._compile_tried:
            self._compile_tried = True
            try:
                return self._compiled(images)
            except Exception as exc:  # inductor raises many types (no compiler, unsupported op)
                log.warning(
                    "torch.compile failed here (%s: %s): training without it",
                    exc.__class__.__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                )
                self._compiled = None
        return (self._compiled or self.net)(images)

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        if self.cfg.freeze_bn:  # keep the pretrained normalisation statistics (affine still learns)
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        epoch_seed = self.seed * 1000 + epoch
        share = epoch_rows(self.train_ds.store.targets, self.world, epoch_seed, self.draw_weights, self.per_class)
        loader = batch_loader(self.train_ds, batch_size=self.rank_batch, rows=share, **self.loader_kwargs)
        levers = torch.Generator().manual_seed(epoch_seed * 100 + self.world.rank)
        total, count = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False, disable=not self.progress)
        # Ranks' shares differ by one image at most, so one may run a batch more: Join lets it finish alone.
        with Join([self.ddp]) if self.ddp else nullcontext():
            for raw, host_targets in bar:
                images = model_input(
                    self._batch_levers(raw, levers),
                    self.mean,
                    self.std,
                    self.device,
                    self.cfg.channels_last,
                    self.cfg.colour,
                )
                targets = host_targets.to(self.device, non_blocking=True)
                self.optimizer.zero_grad(set_to_none=True)
                with self._autocast():
                    loss = self.loss_fn(self._forward(images), targets)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} in epoch {epoch + 1}")
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                total += loss.item() * len(targets)
                count += len(targets)
                bar.set_postfix(loss=f"{total / count:.4f}")
        total_all, count_all = all_sum([total, count], self.world)
        return total_all / max(count_all, 1)

    def _batch_levers(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A uint8 training batch under the settings' random symmetries and stain jitter."""
        if self.cfg.rotation != "none":
            raw = random_symmetries(raw, generator, any_angle=self.cfg.rotation == "any")
        return hed_jitter(raw, self.cfg.hed_jitter, generator)

    def predict(self, dataset: StoreDataset) -> tuple[np.ndarray, float]:
        """Probabilities of ALL for every image of ``dataset``'s store, as stored (uint8 batches, no
        transform), in order, and the mean loss; under torchrun each rank scores its share and all of
        them get the whole result."""
        plain = (
            dataset
            if not dataset.normalize and dataset.transform is None
            else StoreDataset(dataset.store, normalize=False)
        )
        rows = evaluation_share(len(plain), self.world)
        loader = batch_loader(plain, batch_size=self.rank_batch * 2, rows=rows, **self.loader_kwargs)
        part = predict_outputs(
            self.model,
            (images for images, _ in loader),
            self.mean,
            self.std,
            amp_dtype=self.amp_dtype,
            channels_last=self.cfg.channels_last,
            colour=self.cfg.colour,
        ).logits
        logits = gather_rows(part, self.world)
        targets = torch.from_numpy(dataset.store.targets.astype(np.int64))
        loss = self.loss_fn(torch.from_numpy(logits), targets).item() if len(targets) else 0.0
        return prob_all(logits), loss

    def init_head(self) -> None:
        """Set the new head to a logistic regression on the frozen features (LP-FT's first step; ``fit``
        calls it before the first epoch where ``train.head_init`` is ``linear_probe``)."""
        plain = StoreDataset(self.train_ds.store, normalize=False)
        loader = batch_loader(plain, batch_size=self.cfg.batch_size * 2, **self.loader_kwargs)
        batches = (
            (model_input(raw, self.mean, self.std, self.device, self.cfg.channels_last, self.cfg.colour), targets)
            for raw, targets in loader
        )
        with self._autocast():
            accuracy = fit_probe_head(self.model, batches, self.device, self.seed)
        log.info("head initialised by a linear probe on the frozen features (train accuracy %.3f)", accuracy)

    # -- the loop ------------------------------------------------------------------------
    def fit(self, resume: bool = False, on_epoch: EpochCallback | None = None) -> FitResult:
        """Train until ``epochs`` or early stopping; with ``resume``, continue from the checkpoint."""
        state = self._load_checkpoint() if resume else None
        if state is None:
            if self.cfg.head_init == "linear_probe":
                self.init_head()
            result = FitResult(copy.deepcopy(self.model.state_dict()), -1, -1.0)
            start, bad_epochs = 0, 0
        else:
            result, start, bad_epochs = state
            for row in result.history:  # replay, so trackers see the whole curve
                if on_epoch:
                    on_epoch(row)
        if self.val_shortfall:
            result.selection = f"last epoch, no early stopping: {self.val_shortfall}"
            log.warning("%s: training every epoch and keeping the last", self.val_shortfall)
        began = time.perf_counter() - result.seconds
        epochs = tqdm(
            range(start, self.cfg.epochs),
            desc="training",
            unit="epoch",
            disable=not self.progress,
            initial=start,
            total=self.cfg.epochs,
        )
        with sigterm_as_interrupt():
            for epoch in epochs:
                if bad_epochs >= self.cfg.patience:
                    break
                torch.manual_seed(self.seed * 1000 + epoch)  # dropout etc.: same draws after a resume
                train_loss = self.train_epoch(epoch)
                val_prob, val_loss = self.predict(self.val_ds)
                val = binary_metrics(self.val_ds.store.targets, val_prob)
                row = {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_f1_macro": val["f1_macro"],
                    "val_roc_auc": val["roc_auc"],
                }
                result.history.append(row)
                result.val_probs.append(val_prob.tolist())
                if self.val_shortfall or improves(result, val["f1_macro"], val_loss):
                    result.best_val_f1_macro, result.best_val_loss = val["f1_macro"], val_loss
                    result.best_epoch = epoch + 1
                    result.best_state = copy.deepcopy(self.model.state_dict())
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                result.seconds = time.perf_counter() - began
                if self.world.is_main:
                    self._save_checkpoint(result, epoch + 1, bad_epochs)
                epochs.set_postfix(
                    loss=f"{train_loss:.4f}", val_f1=f"{val['f1_macro']:.4f}", best=f"{result.best_val_f1_macro:.4f}"
                )
                if on_epoch:
                    on_epoch(row)
        result.stopped_early = bad_epochs >= self.cfg.patience and len(result.history) < self.cfg.epochs
        self.model.load_state_dict(result.best_state)
        return result

    def _save_checkpoint(self, result: FitResult, next_epoch: int, bad_epochs: int) -> None:
        payload = {
            "fingerprint": self.fingerprint,
            "next_epoch": next_epoch,
            "bad_epochs": bad_epochs,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best_state": result.best_state,
            "best_epoch": result.best_epoch,
            "best_val_f1_macro": result.best_val_f1_macro,
            "best_val_loss": result.best_val_loss,
            "history": result.history,
            "val_probs": result.val_probs,
            "seconds": result.seconds,
        }
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.checkpoint_path)  # a kill mid-save never corrupts the last checkpoint

    def _load_checkpoint(self) -> tuple[FitResult, int, int] | None:
        path = self.checkpoint_path
        if not path.is_file():
            log.warning("no checkpoint at %s: starting from scratch", path)
            return None
        try:
            payload = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file
            raise CnmcError(
                f"{path}: unreadable checkpoint ({exc.__class__.__name__}); delete it to start over"
            ) from exc
        if payload.get("fingerprint") != self.fingerprint:
            raise CnmcError(f"{path}: checkpoint was made with other settings or data; delete it or drop --resume")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])
        result = FitResult(
            payload["best_state"],
            payload["best_epoch"],
            payload["best_val_f1_macro"],
            payload["best_val_loss"],
            list(payload["history"]),
            seconds=payload["seconds"],
            val_probs=list(payload.get("val_probs", [])),
        )
        log.info("resuming %s from epoch %d", path, payload["next_epoch"] + 1)
        return result, payload["next_epoch"], payload["bad_epochs"]

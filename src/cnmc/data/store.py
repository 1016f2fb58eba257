"""The image store the ``augment`` stage writes and the trainer reads.

One folder per split::

    <store>/<split>/images.npy   uint8 array (N, S, S, 3), memory-mapped on read
    <store>/<split>/index.csv    one row per image: the split CSV's columns plus
                                 target (1 = all, 0 = hem), augmented (0/1),
                                 origin (row of the original it came from), aug_seed

Reading a batch is one slice of the memmap and a few whole-batch torch ops, with no
image decoding or resizing: that is what makes input fast (see ``bench/bench_input_throughput.py``).

``ImageStore.subset(rows, transform_mask)`` is a view of chosen rows (repeats allowed) over the
same memmap; the mask says which of its rows an on-the-fly transform applies to (tuning uses it
to replay the augment stage's balancing with fresh draws of T, see
:func:`cnmc.jobs.tune_trial.live_augmentation_view`).
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    get_worker_info,
)

from cnmc.core.config import Framing
from cnmc.core.errors import CnmcError
from cnmc.data.batch_augment import PaperBatchTransform

IMAGES_FILE = "images.npy"
INDEX_FILE = "index.csv"
REPORT_FILE = "augment_report.json"  # at the store's root: what made it (cnmc.data.augment)
LABELS = ("all", "hem")
TARGETS = {"all": 1, "hem": 0}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A callable on a uint8 CHW tensor returning one (torchvision's T), or a PaperBatchTransform, which
# takes the whole uint8 (B, 3, S, S) batch at once.
Transform = Any


def apply_transform(chw: torch.Tensor, on: np.ndarray, transform: Transform) -> torch.Tensor:
    """The uint8 (B, 3, S, S) batch ``chw`` with ``transform`` applied to the rows ``on`` marks."""
    if isinstance(transform, PaperBatchTransform):
        if on.all():
            return transform(chw)
        out = chw.clone()
        rows = torch.from_numpy(np.flatnonzero(on))
        if len(rows):
            out[rows] = transform(chw[rows])
        return out
    return torch.stack([transform(img) if flag else img for img, flag in zip(chw, on, strict=True)])


def _storage_refs(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class _BatchBuffers:
    """Output tensors for whole batches, reused once nothing references them any more.

    A fresh float batch of 64 x 3 x 224 x 224 (38.5 MB) is above glibc's largest mmap threshold
    (32 MB), so every new one costs page faults and kernel zeroing: about twice the cost of
    normalising it. A buffer is handed out again (as a new view) only when its storage has no
    reference left but the pool's own. Nothing is reused inside DataLoader worker processes
    (their batches go to another process through shared memory), nor once a buffer has been
    moved to shared memory (e.g. put on a ``torch.multiprocessing`` queue).
    """

    def __init__(self, keep: int = 3):
        self.keep = keep
        self._buffers: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._idle_refs = -1
        self.enabled = hasattr(torch._C, "_storage_Use_Count")

    def get(self, shape: tuple[int, ...]) -> torch.Tensor:
        if not self.enabled or get_worker_info() is not None:
            return torch.empty(shape, dtype=torch.float32)
        with self._lock:
            self._buffers = [b for b in self._buffers if not b.is_shared()]
            for base in self._buffers:
                if tuple(base.shape) == shape and _storage_refs(base) == self._idle_refs:
                    return base.view(shape)
            base = torch.empty(shape, dtype=torch.float32)
            self._idle_refs = _storage_refs(base)
            idle = [b for b in self._buffers if _storage_refs(b) == self._idle_refs]
            if len(self._buffers) >= self.keep and idle:
                self._buffers.remove(idle[0])  # forget the oldest idle buffer
            if len(self._buffers) < self.keep:
                self._buffers.append(base)
            return base.view(shape)


class _RowsView:
    """Rows ``rows`` of an (N, S, S, 3) array, read like an (len(rows), S, S, 3) array.

    Indexing gathers from the base array on access; nothing is copied up front.
    """

    def __init__(self, base: np.ndarray, rows: np.ndarray):
        self.base, self.rows = base, rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            return self.base[(self.rows[key[0]], *key[1:])]
        return self.base[self.rows[key]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.base[self.rows], dtype=dtype)


class ImageStore:
    """One split of the store: ``images`` (memmap, N x S x S x 3 uint8), ``index``, ``targets``.

    ``transform_mask`` (None = every row) marks the rows an on-the-fly transform applies to;
    only views made by :meth:`subset` set it.
    """

    def __init__(self, split_dir: Path | str):
        self.split_dir = Path(split_dir)
        images_path = self.split_dir / IMAGES_FILE
        index_path = self.split_dir / INDEX_FILE
        if not self.split_dir.is_dir():
            raise CnmcError(f"{self.split_dir}: image store split folder not found (run `cnmc augment`)")
        for path in (images_path, index_path):
            if not path.is_file():
                raise CnmcError(f"{self.split_dir}: image store incomplete, {path.name} missing (run `cnmc augment`)")
        try:
            self.index = pd.read_csv(index_path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise CnmcError(f"{index_path}: unreadable index ({exc.__class__.__name__})") from exc
        if "target" not in self.index.columns:
            raise CnmcError(f"{index_path}: no 'target' column")
        try:
            self.targets = self.index["target"].astype(np.int64).to_numpy()
        except ValueError as exc:
            raise CnmcError(f"{index_path}: 'target' must be 0 or 1") from exc
        if not np.isin(self.targets, (0, 1)).all():
            raise CnmcError(f"{index_path}: 'target' must be 0 or 1")
        self._images: np.ndarray | None = None
        self._rows: np.ndarray | None = None  # a view's rows of the file (see subset)
        self.transform_mask: np.ndarray | None = None
        self._buffers = _BatchBuffers()
        images = self.images  # open now, so a bad array fails here
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
            raise CnmcError(
                f"{images_path}: expected a uint8 array (N, S, S, 3), got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) != len(self.index):
            raise CnmcError(
                f"{self.split_dir}: inconsistent store, {IMAGES_FILE} has {len(images)} images "
                f"but {INDEX_FILE} has {len(self.index)} rows (rerun `cnmc augment`)"
            )

    @property
    def images(self) -> np.ndarray:
        """The (N, S, S, 3) uint8 images, memory-mapped read-only (reopened after unpickling).

        For a :meth:`subset` view, an array-like of the view's rows (gathered on indexing).
        """
        if self._images is None:
            path = self.split_dir / IMAGES_FILE
            try:
                self._images = np.load(path, mmap_mode="r")
            except (ValueError, OSError) as exc:
                raise CnmcError(f"{path}: not a readable .npy array ({exc})") from exc
        if self._rows is not None:
            return _RowsView(self._images, self._rows)  # type: ignore[return-value]
        return self._images

    def subset(
        self, rows: Sequence[int] | np.ndarray, transform_mask: Sequence[bool] | np.ndarray | None = None
    ) -> ImageStore:
        """A view of rows ``rows`` of this split, in that order (repeats allowed), sharing its memmap.

        ``index`` and ``targets`` follow the rows. ``transform_mask`` (one bool per row of the view;
        default: the parent's mask for those rows, i.e. all) picks the rows that an on-the-fly
        ``transform`` of :meth:`load_batch` / :class:`StoreDataset` applies to; the rest pass
        through untouched.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"rows must be one-dimensional, got shape {rows.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows must be in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        if transform_mask is not None:
            given = np.asarray(transform_mask, dtype=bool)
            if given.shape != rows.shape:
                raise ValueError(f"transform_mask has shape {given.shape}, rows {rows.shape}")
            mask: np.ndarray | None = given
        else:
            mask = None if self.transform_mask is None else self.transform_mask[rows]
        view = copy.copy(self)  # shallow: the memmap is shared
        view.index = self.index.iloc[rows].reset_index(drop=True)
        view.targets = self.targets[rows]
        view._rows = rows if self._rows is None else self._rows[rows]
        view.transform_mask = mask
        view._buffers = _BatchBuffers()
        return view

    def transformed(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Whether an on-the-fly transform applies to each of ``indices`` (all, unless masked)."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.transform_mask is None:
            return np.ones(idx.shape, dtype=bool)
        return self.transform_mask[idx]

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def framing(self) -> Framing:
        """How the augment stage framed this store's images (its ``augment_report.json``); stores made
        before cropping existed, or without a report, hold whole frames."""
        try:
            config = json.loads((self.split_dir.parent / REPORT_FILE).read_text()).get("config", {})
        except (OSError, ValueError):
            config = {}
        return Framing(self.image_size, config.get("crop", "frame"), float(config.get("crop_margin", 0.1)))

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        view = "" if self._rows is None else ", view"
        return f"ImageStore({str(self.split_dir)!r}, n={len(self)}, size={self.image_size}{view})"

    # Pickling (DataLoader workers under spawn) must not copy the whole memmap: reopen it instead.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None
        state["_buffers"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._buffers = _BatchBuffers()

    def load_uint8_batch(
        self, indices: Sequence[int] | np.ndarray, transform: Transform | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``indices`` as a uint8 (B, S, S, 3) tensor (``transform`` applied to the rows the
        store marks) and their int64 targets: what a device that normalises for itself is fed."""
        idx = np.asarray(indices, dtype=np.int64)
        raw = np.ascontiguousarray(self.images[idx])  # one gather from the memmap
        batch = torch.from_numpy(raw)
        if transform is not None:
            batch = apply_transform(batch.permute(0, 3, 1, 2), self.transformed(idx), transform).permute(0, 2, 3, 1)
        return batch, torch.from_numpy(self.targets[idx])

    def load_batch(
        self,
        indices: Sequence[int] | np.ndarray,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        transform: Transform | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``indices`` as a normalised float (B, 3, S, S) tensor and their int64 targets.

        The float tensor may reuse the memory of an earlier batch that nothing references any
        more (see ``_BatchBuffers``); a batch that is still referenced is never overwritten.
        """
        batch, targets = self.load_uint8_batch(indices, transform)
        n, h, w, _ = batch.shape
        out = self._buffers.get((n, 3, h, w))
        return normalize_batch(batch, mean, std, out=out), targets

    def batches(
        self,
        indices: Iterable[int] | np.ndarray | None = None,
        batch_size: int = 64,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        transform: Transform | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, targets)`` batches over ``indices`` (default: all, in order)."""
        idx = np.arange(len(self)) if indices is None else np.asarray(list(indices), dtype=np.int64)
        for start in range(0, len(idx), batch_size):
            yield self.load_batch(idx[start : start + batch_size], mean, std, transform)


def normalize_batch(
    images: torch.Tensor | np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> contiguous float32 (B, 3, H, W), ``(x / 255 - mean) / std``.

    ``out``: an optional contiguous float32 (B, 3, H, W) tensor to write into.
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32)
    std_t = torch.tensor(std, dtype=torch.float32)
    scale = 1.0 / (255.0 * std_t)
    shift = -mean_t / std_t
    shape = (x.shape[0], 3, x.shape[1], x.shape[2])
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 {shape}, got {out.dtype} {tuple(out.shape)}")
    out.copy_(x.permute(0, 3, 1, 2))  # converts and transposes in one pass
    return out.mul_(scale.view(1, 3, 1, 1)).add_(shift.view(1, 3, 1, 1))


def normalize_image(
    image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 (3, H, W), ``(x / 255 - mean) / std`` per channel."""
    return normalize_batch(image.permute(1, 2, 0).unsqueeze(0), mean, std)[0]


class StoreDataset(Dataset):
    """A torch ``Dataset`` over an :class:`ImageStore`.

    ``ds[i]`` gives ``(float tensor (3, S, S) normalised, int target)``; ``transform`` (e.g. T at a
    trial's strength) is applied to the uint8 (3, S, S) tensor before normalisation, on the rows
    the store's ``transform_mask`` selects (all rows of a plain store).
    ``ds[[i, j, ...]]`` gives a whole batch ``(float (B, 3, S, S), int64 (B,))`` in one memmap
    slice: use it through :func:`batch_loader`, the fast path. With ``normalize=False`` a batch is
    uint8 (B, S, S, 3), for :func:`cnmc.inference.forward.model_input` to normalise on the device.
    """

    def __init__(
        self,
        store: ImageStore | Path | str,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        transform: Transform | None = None,
        normalize: bool = True,
    ):
        self.normalize = normalize
        self.store = store if isinstance(store, ImageStore) else ImageStore(store)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, item: Any) -> tuple[torch.Tensor, Any]:
        if isinstance(item, (int, np.integer)):
            image = torch.from_numpy(np.array(self.store.images[int(item)])).permute(2, 0, 1)
            if self.transform is not None:
                image = apply_transform(image[None], self.store.transformed([int(item)]), self.transform)[0]
            return normalize_image(image, self.mean, self.std), int(self.store.targets[int(item)])
        if not self.normalize:
            return self.store.load_uint8_batch(item, self.transform)
        return self.store.load_batch(item, self.mean, self.std, self.transform)


def batch_loader(
    dataset: StoreDataset,
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
    rows: Sequence[int] | np.ndarray | None = None,
    **loader_kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` that fetches each batch with one ``dataset[list_of_indices]`` call.

    Yields ``(float (B, 3, S, S), int64 (B,))`` like a normal loader, without per-item collation.
    ``seed`` fixes the shuffle order; ``rows`` (e.g. one rank's share of an epoch) replaces it:
    exactly those rows, in that order.
    """
    sampler: Sequence[int] | RandomSampler | SequentialSampler
    if rows is not None:
        sampler = [int(r) for r in rows]
    elif shuffle:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last),
        num_workers=num_workers,
        **loader_kwargs,
    )

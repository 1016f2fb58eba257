"""Data preparation outside DVC: manifest -> split -> augment into one work folder.

``cnmc train --data DIR`` (a user's own data) and ``mlflow run`` (which may override the image
size or augmentation strength) use it; a folder prepared with the same data and settings is
reused rather than rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import Params
from cnmc.data.augment import prepare_dataset
from cnmc.data.manifest import build_manifest, shared_pictures, write_manifest
from cnmc.data.split import split_manifest, write_splits

log = logging.getLogger(__name__)
STAMP = "prepared.json"
PIPELINE_STORE_ROOT = Path("outputs")  # the DVC stages' outputs: outputs/images
PREPARED_ROOT = Path("outputs/prepared")  # where settings differ from the pipeline's store


def store_root(
    params: Params,
    data: Path | None = None,
    work_dir: Path | None = None,
    test_data: Path | None = None,
    progress: bool = True,
) -> Path:
    """The folder whose ``images/`` store a training run reads: ``data`` prepared into ``work_dir``;
    else the DVC outputs when they match ``params``; else a matching store prepared beside them."""
    if data is not None:
        root = work_dir or PREPARED_ROOT
        prepare_work_dir(data, root, params, test_data, progress=progress)
        return root
    if store_matches(PIPELINE_STORE_ROOT / "images", params):
        return PIPELINE_STORE_ROOT
    prepare_work_dir(Path(params.data_dir), PREPARED_ROOT, params, progress=progress)  # no store, or other settings
    return PREPARED_ROOT


def store_matches(store: Path, params: Params) -> bool:
    """Whether ``store`` (an augment output) was made with ``params``' augment settings and seed."""
    try:
        report = json.loads((store / "augment_report.json").read_text())
    except (OSError, ValueError):
        return False
    stored = {k: v for k, v in report.get("config", {}).items() if k != "workers"}
    return stored == _augment_settings(params) and report.get("seed") == params.seed


def prepare_work_dir(
    data_dir: Path, work_dir: Path, params: Params, test_data: Path | None = None, progress: bool = True
) -> Path:
    """Build (or reuse) manifest, splits and image store in ``work_dir``; return the store folder."""
    manifest = build_manifest(data_dir, progress=progress)
    test_manifest = build_manifest(test_data, progress=progress) if test_data else None
    key = _key(
        params, manifest.table.to_csv(index=False), test_manifest.table.to_csv(index=False) if test_manifest else ""
    )
    store = work_dir / "images"
    stamp = work_dir / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key and (store / "train").is_dir():
        log.info("reusing the prepared data in %s", work_dir)
        return store
    write_manifest(manifest, work_dir / "manifest.csv", work_dir / "data_report.json")
    print(manifest.summary_line(work_dir / "data_report.json"))
    table, test_table = shared_pictures(manifest, test_manifest) if test_manifest else (manifest.table, None)
    splits = split_manifest(table, params.split, params.seed, test_manifest=test_table)
    write_splits(splits, work_dir / "splits", work_dir / "split_report.json")
    print(splits.summary_line())
    print(
        prepare_dataset(
            work_dir / "splits",
            store,
            params.augment,
            params.seed,
            preview_path=work_dir / "plots" / "augment_preview.png",
            progress=progress,
        )
    )
    atomic_write_text(stamp, json.dumps({"key": key, "data": str(data_dir), "test_data": str(test_data or "")}))
    return store


def _key(params: Params, *manifests: str) -> str:
    digest = hashlib.sha256()
    payload = {"seed": params.seed, "split": params.split.model_dump(), "augment": _augment_settings(params)}
    digest.update(json.dumps(payload, sort_keys=True).encode())
    for text in manifests:
        digest.update(text.encode())
    return digest.hexdigest()[:16]


def _augment_settings(params: Params) -> dict:
    """The augment settings that change the stored images (not the worker count)."""
    return params.augment.model_dump(exclude={"workers"})

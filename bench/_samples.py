"""Real C-NMC sample cells for the benchmarks (from ../shared/data when it is there)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_CANDIDATES = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cnmc-sample",
    Path("../shared/data/cnmc-sample"),
)


def sample_bmps() -> list[Path]:
    """Real 450x450 C-NMC cells if the shared sample is there, else []."""
    for root in SAMPLE_CANDIDATES:
        if root.is_dir():
            found = sorted(root.rglob("*.bmp"))
            if found:
                return found
    return []


def write_cell_bmp(path: Path, i: int, real: list[Path], rng: np.random.Generator) -> None:
    """Cell ``i`` of a benchmark set at ``path``: a copy of a real sample, else 450x450 noise."""
    if real:
        shutil.copyfile(real[i % len(real)], path)
    else:
        noise = rng.integers(0, 256, size=(450, 450, 3), dtype=np.uint8)
        Image.fromarray(noise, "RGB").save(path)


def describe_cells(real: list[Path]) -> str:
    return f"copies of {len(real)} real C-NMC sample BMPs" if real else "random-noise BMPs"


def split_row(path: Path, label: str, subject: str, split: str) -> dict[str, str]:
    """One row of a split CSV (``cnmc.data.augment.REQUIRED_COLUMNS``) for a 450x450 benchmark BMP."""
    return {
        "path": str(path),
        "label": label,
        "subject": subject,
        "source": "bench",
        "sha256": "",
        "width": "450",
        "height": "450",
        "original_mode": "RGB",
        "original_name": path.name,
        "split": split,
    }

"""Real C-NMC sample cells for the benchmarks (from ../shared/data when it is there)."""

from __future__ import annotations

from pathlib import Path

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

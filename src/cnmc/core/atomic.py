"""Write files so that a crash never leaves a half-written output looking complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cnmc.core.errors import CnmcError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_T = TypeVar("_T")


def atomic_write_png(fig: Figure, path: Path | str) -> Path:
    """Write the PNG to a temporary sibling first, so a crash never leaves a truncated image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plain_mode(path: Path | str) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (0644/0755 under umask 022), not the
    private 0600/0700 of a temporary file or folder, so that a teammate can read the output."""
    mask = os.umask(0o022)  # read by setting it, then set straight back
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a unique temporary sibling, then rename it over ``path``.

    A reader (or DVC) sees the old file or the new one, never half of one. The file gets the mode a
    plain ``open`` would give (0644 under umask 022), not the temporary file's private 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False, encoding="utf-8", newline=""
    ) as tmp:
        tmp.write(text)
    try:
        plain_mode(tmp.name)
        os.replace(tmp.name, path)
    except OSError:
        os.unlink(tmp.name)
        raise


def fill_new_folder(out_dir: Path, fill: Callable[[Path], _T]) -> _T:
    """Run ``fill`` on a hidden sibling of ``out_dir`` (which must be absent or empty), then rename
    it to ``out_dir``: an interrupted run never leaves a folder that looks complete."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CnmcError(f"{out_dir}: exists and is not an empty folder; give a new or empty folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its private 0700 mode would stick to the renamed folder.
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # only a dead run with our pid can have left it
    tmp.mkdir()
    try:
        result = fill(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result

"""Write files so that a crash never leaves a half-written output looking complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cnmc.core.errors import CnmcError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_T = TypeVar("_T")


def atomic_write_png(fig: Figure, path: Path | str, text: dict[str, str] | None = None, tight: bool = True) -> Path:
    """Write the figure as a PNG (with PNG text chunks ``text``) through a temporary sibling, so a
    crash never leaves a truncated image; the errors of :func:`atomic_write_text`."""
    with _replacing(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata=text, bbox_inches="tight" if tight else None)
    return Path(path)


def plain_mode(path: Path | str) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (0644/0755 under umask 022), not the
    private 0600/0700 of a temporary file or folder, so that a teammate can read the output."""
    mask = os.umask(0o022)  # read by setting it, then set straight back
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a unique temporary sibling, then rename it over ``path``.

    A reader (or DVC) sees the old file or the new one, never half of one. The file gets the mode a
    plain ``open`` would give (0644 under umask 022), not the temporary file's private 0600. A path
    that is a folder, lies under a regular file, or cannot be written (no permission, disk full) is a
    one-line :class:`CnmcError` naming it, with no temporary file left; a symbolic link is written
    through (the file it points to is replaced, the link stays).
    """
    with _replacing(Path(path)) as tmp, open(tmp, "w", encoding="utf-8", newline="") as file:
        file.write(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_write_text` for bytes (a Parquet table)."""
    with _replacing(Path(path)) as tmp, open(tmp, "wb") as file:
        file.write(data)


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path``'s target to write, renamed over the target when the block ends."""
    target = _writable_target(path)
    try:
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        plain_mode(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _writable_target(path: Path) -> Path:
    """The file to replace for ``path`` (a link's target), its folder made; CnmcError where it can't be."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.is_dir():
        raise CnmcError(f"{path}: is a folder; give a file name")
    output_folder(target.parent, named=path)
    return target


def output_folder(folder: Path | str, named: Path | str | None = None) -> Path:
    """``folder``, made where missing; a one-line CnmcError naming ``named`` (default: the folder)
    where a file stands in the way or it cannot be made."""
    folder, named = Path(folder), Path(named or folder)
    for step in (folder, *folder.parents):
        if step.exists() or step.is_symlink():
            if not step.is_dir():
                where = "is a file" if step == named else f"{step} is a file"
                raise CnmcError(f"{named}: {where}, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(named, exc) from None
    return folder


def _cannot_write(path: Path, exc: OSError) -> CnmcError:
    return CnmcError(f"{path}: cannot write ({exc.strerror or exc.__class__.__name__})")


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

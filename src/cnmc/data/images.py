"""Open any image the pipeline may meet as 8-bit RGB, or say precisely why it can't.

Every stage that reads pixels (manifest checks, augmentation, prediction) goes through
:func:`open_rgb`, so a file accepted once is read the same way everywhere, and every stage that
reads an image file's bytes goes through :func:`read_image_file`, so none of them ever opens a
FIFO, a socket or a device that only looks like an image.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Far above a 450x450 cell, far below a decompression bomb.
MAX_PIXELS = 40_000_000
# Decoded bytes an image may take: a 22-megapixel RGB, or a 16-megapixel float TIFF (4 bytes a pixel),
# so that a small file of a costly mode cannot cost a second and a gigabyte to decode.
MAX_DECODED_BYTES = 64 * 1024 * 1024
MIN_SIDE = 8  # pixels: below this an image holds no cell, and upsampling it only invents one
# The formats every stage reads (manifest, augment, predict, the server), each with its file extensions.
FORMATS = {"BMP": (".bmp",), "PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "TIFF": (".tif", ".tiff")}
IMAGE_EXTENSIONS = tuple(extension for extensions in FORMATS.values() for extension in extensions)
FORMAT_NAMES = ", ".join(FORMATS)


# What a path that is not a regular file is, for the reason; the first test that holds names it.
_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISDIR, "folder"),
)
# Opening a FIFO for reading waits for a writer unless non-blocking; a terminal must not become ours.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


class ImageProblem(ValueError):
    """The file is not a usable image; ``str(exc)`` is a short reason."""


def read_image_file(path: Path | str, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at ``path`` (links followed), at most ``max_bytes`` of them.

    A FIFO named like an image blocks whoever opens it until some writer comes, and a device
    may never end, so only regular files are read: the type is checked before opening (nothing
    else is even opened) and again on the open descriptor, which is opened non-blocking so
    that a FIFO swapped in between cannot block either. Raises :class:`ImageProblem` for
    anything that is not a regular file (a broken link or a link loop too) or is too large,
    and leaves other :class:`OSError` (no such file, permission denied) to the caller.
    """
    try:
        _require_regular(os.stat(path).st_mode)
    except OSError as exc:
        raise _link_problem(path, exc) or exc from None
    with open(os.open(path, _OPEN_FLAGS), "rb") as file:
        status = os.fstat(file.fileno())
        _require_regular(status.st_mode)
        _require_size(status.st_size, max_bytes)
        data = file.read() if max_bytes is None else file.read(max_bytes + 1)
    _require_size(len(data), max_bytes)
    return data


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "special file")
        raise ImageProblem(f"not a regular file ({kind})")


def _require_size(size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ImageProblem(f"too large ({size:,} bytes, limit {max_bytes:,})")


def _link_problem(path: Path | str, exc: OSError) -> ImageProblem | None:
    """What ``os.stat``'s failure means when ``path`` is a symbolic link that leads nowhere."""
    if exc.errno == errno.ELOOP:
        return ImageProblem("symbolic link loop")
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return ImageProblem(f"broken symbolic link to {os.readlink(path)} (no such file)")
    return None


def open_rgb(source: Path | str | bytes) -> tuple[Image.Image, str]:
    """Decode ``source`` (a path or encoded bytes) fully and return ``(rgb_image, original_mode)``.

    Grayscale, palette, RGBA (composited on black, like the cells' background), CMYK and
    16-bit/float images are converted to 8-bit RGB. Raises :class:`ImageProblem` for empty,
    truncated, corrupt, oversized or non-image input, and for a path that is not a regular file
    (:func:`read_image_file`).
    """
    data = source if isinstance(source, bytes) else read_image_file(source)
    if not data:
        raise ImageProblem("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))  # no other decoder is even tried
            size = f"{image.width}x{image.height}"
            if image.width * image.height > MAX_PIXELS:
                raise ImageProblem(f"too large ({size} pixels, limit {MAX_PIXELS:,})")
            if (decoded := _decoded_bytes(image)) > MAX_DECODED_BYTES:
                raise ImageProblem(
                    f"too costly to decode ({size} {image.mode}: {decoded:,} bytes, limit {MAX_DECODED_BYTES:,})"
                )
            if min(image.width, image.height) < MIN_SIDE:
                raise ImageProblem(f"too small ({size} pixels; at least {MIN_SIDE} a side)")
            if (frames := getattr(image, "n_frames", 1)) > 1:
                raise ImageProblem(f"{frames} frames in one file; send one image a file")
            image.load()
            return _to_rgb(image), image.mode
    except ImageProblem:
        raise
    except UnidentifiedImageError:
        raise ImageProblem(f"not an image of a format cnmc reads ({FORMAT_NAMES})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(f"too large (limit {MAX_PIXELS:,} pixels)") from None
    except Exception as exc:  # Pillow's format plugins raise almost any type on malformed bytes
        reason = str(exc) or exc.__class__.__name__
        raise ImageProblem(f"corrupt or truncated image ({reason})") from None


def _decoded_bytes(image: Image.Image) -> int:
    """What ``image`` takes in memory once decoded: its pixels times its mode's bytes a pixel."""
    per_band = 4 if image.mode in ("F", "I", "I;32") else 2 if image.mode.startswith("I;16") else 1
    return image.width * image.height * len(image.getbands()) * per_band


def image_like(path: Path) -> bool:
    """Named like an image: one of :data:`FORMATS`, or another format Pillow knows (GIF, WebP, ...),
    which a folder's listing shows with the reason it is refused rather than skipping it unsaid."""
    suffix = path.suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in Image.registered_extensions()


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        hi = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(np.rint(array / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")

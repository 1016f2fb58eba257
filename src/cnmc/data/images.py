"""Open any image the pipeline may meet as 8-bit RGB, or say precisely why it can't.

Every stage that reads pixels (manifest checks, augmentation, prediction) goes through
:func:`open_rgb`, so a file accepted once is read the same way everywhere.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Far above a 450x450 cell, far below a decompression bomb.
MAX_PIXELS = 40_000_000


class ImageProblem(ValueError):
    """The file is not a usable image; ``str(exc)`` is a short reason."""


def open_rgb(source: Path | str | bytes) -> tuple[Image.Image, str]:
    """Decode ``source`` (a path or encoded bytes) fully and return ``(rgb_image, original_mode)``.

    Grayscale, palette, RGBA (composited on black, like the cells' background), CMYK and
    16-bit/float images are converted to 8-bit RGB. Raises :class:`ImageProblem` for empty,
    truncated, corrupt, oversized or non-image input.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not data:
        raise ImageProblem("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                size = f"{image.width}x{image.height}"
                raise ImageProblem(f"too large ({size} pixels, limit {MAX_PIXELS:,})")
            image.load()
            if image.width == 0 or image.height == 0:
                raise ImageProblem("image has no pixels")
            return _to_rgb(image), image.mode
    except ImageProblem:
        raise
    except UnidentifiedImageError:
        raise ImageProblem("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(f"too large (limit {MAX_PIXELS:,} pixels)") from None
    except Exception as exc:  # Pillow's format plugins raise almost any type on malformed bytes
        reason = str(exc) or exc.__class__.__name__
        raise ImageProblem(f"corrupt or truncated image ({reason})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(np.rint(array / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")

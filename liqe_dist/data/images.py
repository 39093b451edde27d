"""Decoding images from files or bytes, with errors that say which image and why.

Truncated files are an error here (the reference code silently loads them half-grey), and so is
anything over the decompression-bomb limit (:data:`MAX_PIXELS`, checked on the header before
any pixel is decoded): such inputs are reported and skipped by callers. Only regular files are
read (a FIFO would block, ``/dev/zero`` never ends), up to :data:`MAX_FILE_BYTES`.

Every image becomes 8-bit RGB by its type's range (:func:`to_rgb`), not by clipping: 16-bit
samples are divided by 257, float images are read as 0..1, and transparent pixels are
composited on white.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Largest image accepted, in pixels (about 16k x 12k). Larger files are refused as likely bombs.
MAX_PIXELS = 200_000_000
#: Largest image file read, in bytes.
MAX_FILE_BYTES = 1 << 30
#: What transparent pixels are composited on.
ALPHA_BACKGROUND = (255, 255, 255)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_PIL_LIMIT = threading.Lock()  # Image.MAX_IMAGE_PIXELS is a module global


class ImageDecodeError(ValueError):
    """An image could not be decoded. ``source`` names the file or sample; ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def read_image_file(path: str | Path, source: str | None = None, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file; anything else (missing, folder, FIFO, device, too large) is an
    :class:`ImageDecodeError` naming the file."""
    source = source or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open itself
    except FileNotFoundError:
        raise ImageDecodeError(source, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(source, "is a directory, not an image") from None
    except OSError as exc:
        raise ImageDecodeError(source, f"cannot read file ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageDecodeError(source, "is a directory, not an image")
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError(source, "not a regular file (a device, FIFO or socket)")
        if info.st_size > max_bytes:
            raise ImageDecodeError(source, f"file too large ({info.st_size} bytes > limit {max_bytes})")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as exc:
        raise ImageDecodeError(source, f"cannot read file ({exc.strerror})") from None
    finally:
        os.close(fd)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB by the image type's range rather than by clipping (``convert("RGB")`` turns a
    16-bit image almost white and a float one black): 16-bit samples (``I;16*``, and ``I`` whose
    values fit 0..65535, which is how Pillow holds 16-bit PGM/PPM) / 65535; other ``I`` by the
    int32 range; ``F`` as 0..1 (clipped); transparency composited on :data:`ALPHA_BACKGROUND`."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            top = 65535.0
        elif mode == "I":
            top = 65535.0 if values.size and values.min() >= 0 and values.max() <= 65535 else 2147483647.0
        else:
            top = 1.0
        gray = np.rint(np.clip(values / top, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes | str | Path, source: str | None = None,
                 max_pixels: int = MAX_PIXELS, rgb: bool = True) -> Image.Image:
    """Decode to a fully loaded PIL image, 8-bit RGB (:func:`to_rgb`) unless ``rgb=False``
    (validation only needs the decode). Raises :class:`ImageDecodeError`."""
    if isinstance(data, (str, Path)):
        source = source or str(data)
        data = read_image_file(data, source)
    source = source or "<bytes>"
    if len(data) == 0:
        raise ImageDecodeError(source, "empty file (0 bytes)")
    try:
        with _PIL_LIMIT, warnings.catch_warnings():
            # The limit is ours (checked below from the header); Pillow's own (89.5 MP, a warning,
            # an error at twice that) would otherwise refuse images the documented limit allows.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
            try:
                with Image.open(io.BytesIO(data)) as img:
                    w, h = img.size
                    if w == 0 or h == 0:
                        raise ImageDecodeError(source, f"zero-size image ({w}x{h})")
                    if w * h > max_pixels:
                        raise ImageDecodeError(
                            source, f"image too large ({w}x{h} = {w * h} pixels > limit {max_pixels})")
                    img.load()
                    out = to_rgb(img) if rgb else img
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(source, "not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(source, f"decompression bomb refused ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = f"truncated image ({reason})"
        raise ImageDecodeError(source, f"cannot decode: {reason}") from None
    return out


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS

"""Decoding images from files or bytes, with errors that say which image and why.

Truncated files are an error here (the reference code silently loads them half-grey), and so is
anything over the decompression-bomb limit: such inputs are reported and skipped by callers.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

#: Largest image accepted, in pixels (about 16k x 12k). Larger files are refused as likely bombs.
MAX_PIXELS = 200_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class ImageDecodeError(ValueError):
    """An image could not be decoded. ``source`` names the file or sample; ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def decode_image(data: bytes | str | Path, source: str | None = None,
                 max_pixels: int = MAX_PIXELS, rgb: bool = True) -> Image.Image:
    """Decode to a fully loaded PIL image, RGB unless ``rgb=False`` (validation only needs the
    decode). Raises :class:`ImageDecodeError`."""
    if isinstance(data, (str, Path)):
        source = source or str(data)
        try:
            data = Path(data).read_bytes()
        except FileNotFoundError:
            raise ImageDecodeError(source, "file not found") from None
        except IsADirectoryError:
            raise ImageDecodeError(source, "is a directory, not an image") from None
        except OSError as exc:
            raise ImageDecodeError(source, f"cannot read file ({exc.strerror})") from None
    source = source or "<bytes>"
    if len(data) == 0:
        raise ImageDecodeError(source, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w == 0 or h == 0:
                    raise ImageDecodeError(source, f"zero-size image ({w}x{h})")
                if w * h > max_pixels:
                    raise ImageDecodeError(
                        source, f"image too large ({w}x{h} = {w * h} pixels > limit {max_pixels})")
                img.load()
                out = img.convert("RGB") if rgb else img
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(source, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(source, f"decompression bomb refused ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = f"truncated image ({reason})"
        raise ImageDecodeError(source, f"cannot decode: {reason}") from None
    return out


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS

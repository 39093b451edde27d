"""The packing workers' job: read and decode one image. Kept apart from the packer so that a
worker process imports only PIL, not torch or webdataset."""

from __future__ import annotations

from pathlib import Path

from ..images import ImageDecodeError, decode_image
from .records import Record


def validate_record(args: tuple[Record, int]) -> tuple[bytes | None, tuple[int, int] | None, str]:
    """Returns (bytes, (width, height), "") for a good image, (None, None, reason) otherwise."""
    rec, max_pixels = args
    if rec.data is not None:
        data = rec.data
    else:
        try:
            data = Path(rec.path).read_bytes()
        except FileNotFoundError:
            return None, None, "file not found"
        except OSError as exc:
            return None, None, f"cannot read file ({exc.strerror})"
    try:
        img = decode_image(data, rec.path or rec.key, max_pixels=max_pixels, rgb=False)
    except ImageDecodeError as exc:
        return None, None, exc.reason
    return data, img.size, ""

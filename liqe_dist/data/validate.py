"""The packing workers' job: read and decode one image. Kept apart from the packer so that a
worker process imports only PIL, not torch or webdataset."""

from __future__ import annotations

from liqe_dist.data.images import ImageDecodeError, decode_image, read_image_file
from liqe_dist.data.records import Record


def validate_record(args: tuple[Record, int]) -> tuple[bytes | None, tuple[int, int] | None, str]:
    """Returns (bytes, (width, height), "") for a good image, (None, None, reason) otherwise."""
    rec, max_pixels = args
    try:
        data = rec.data if rec.data is not None else read_image_file(rec.path)
        img = decode_image(data, rec.path or rec.key, max_pixels=max_pixels, rgb=False)
    except ImageDecodeError as exc:
        return None, None, exc.reason
    return data, img.size, ""

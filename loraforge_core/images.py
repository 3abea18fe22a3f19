"""Images from callers: decoded once, the same way, by both services."""

from __future__ import annotations

import io

from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(data: bytes, mode: str = "RGB") -> Image.Image:
    """Decode PNG/JPEG/WebP bytes, upright (EXIF) in ``mode``; refuses decompression bombs.

    Raises ValueError with what is wrong with the bytes."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.format not in FORMATS:
                raise ValueError(f"format {probe.format} is not PNG, JPEG or WebP")
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{width}x{height} is larger than {MAX_IMAGE_PIXELS} pixels")
            probe.load()
            return ImageOps.exif_transpose(probe).convert(mode)
    except ValueError:
        raise
    except Exception as err:  # untrusted bytes: any decoder failure is the input's fault
        raise ValueError(f"cannot decode image: {err}") from err

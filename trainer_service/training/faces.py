"""Face masks: lora_pti's ``use_face_segmentation_condition``, torch-free (the trainer server
checks for a detector when a job asks for one).

The seed used MediaPipe, whose current wheel ships no detector model and fetches one at run
time. OpenCV 4's wheel ships its Haar cascades, which run offline; OpenCV 5 dropped them, hence
``opencv-python-headless<5`` (the ``faces`` extra).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from PIL import Image

FACE_CASCADE = "haarcascade_frontalface_default.xml"
NO_DETECTOR = (
    "use_face_segmentation_condition needs OpenCV 4 on the trainer (pip install "
    "'loraforge[faces]'); or send each image's mask in InstanceImage.mask (white = the face)"
)


def face_detector_problem() -> str | None:
    """Why this process cannot detect faces, or None."""
    try:
        import cv2
    except ImportError:
        return NO_DETECTOR
    if not hasattr(cv2, "CascadeClassifier"):
        return NO_DETECTOR
    return None


def face_mask(image: Image.Image) -> Image.Image | None:
    """White boxes over the faces OpenCV's frontal-face cascade finds; None where none is."""
    import cv2
    import numpy as np

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + FACE_CASCADE)
    gray = np.asarray(image.convert("L"))
    smallest = max(16, min(image.size) // 20)
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                     minSize=(smallest, smallest))  # fmt: skip
    if len(faces) == 0:
        return None
    mask = np.zeros(gray.shape, dtype=np.uint8)
    for x, y, width, height in faces:
        mask[y : y + height, x : x + width] = 255
    return Image.fromarray(mask, mode="L")


def with_face_masks(examples: list[Any], warn: Callable[[str], None]) -> list[Any]:
    """The instance examples, each one sent without a mask given its faces' mask (``warn``
    says which images showed no face: they train unmasked)."""
    out = []
    for i, example in enumerate(examples):
        if example.mask is None:
            mask = face_mask(example.image)
            if mask is None:
                warn(f"no face found in image {i} ({example.filename or 'unnamed'}): unmasked")
            example = dataclasses.replace(example, mask=mask)
        out.append(example)
    return out

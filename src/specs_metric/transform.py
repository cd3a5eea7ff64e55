"""Image decoding and the reference CLIP preprocessing, with PIL only.

Preprocessing (guide §3): resize so the shorter side equals the model resolution with PIL's
bicubic filter, centre crop, convert to RGB, scale to [0, 1] and normalise with CLIP's
mean and std. This is what the reference's torchvision pipeline does on PIL images; the
float operations are performed in the same order, so pixels match exactly. EXIF
orientation is not applied, as in the reference.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = str | os.PathLike | bytes | Image.Image


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


def _describe(source: ImageSource) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} image bytes>"
    return str(source)


def open_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """Decode an image fully (so truncation errors surface here, not later).

    Args:
        source: a path, encoded bytes, or a PIL image (returned as is).
        name: how error messages call the image (default: the path).

    Raises:
        ImageError: missing, empty, truncated or non-image file, or one over PIL's
            decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``).
    """
    if isinstance(source, Image.Image):
        return source
    name = name or _describe(source)
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{name}: empty image data")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
        if not stream.is_file():
            raise ImageError(f"{name}: image file not found")
        if stream.stat().st_size == 0:
            raise ImageError(f"{name}: image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as img:
                img.load()
                return img.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: image too large (decompression-bomb limit): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: cannot decode image ({exc})") from exc


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so that the shorter side is ``size`` (longer side rounded down)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to ``size`` x ``size`` with the reference's rounding of the offsets."""
    width, height = image.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float tensor (3, H, W): /255, minus mean, divided by std (fp32)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div(255)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    return pixels.sub(mean).div(std)


def preprocess(image: Image.Image, resolution: int = 224) -> torch.Tensor:
    """The reference preprocessing of one PIL image -> FloatTensor (3, R, R).

    Example:
        >>> from PIL import Image
        >>> preprocess(Image.new("RGB", (50, 30), (255, 0, 0)), resolution=16).shape
        torch.Size([3, 16, 16])
    """
    image = center_crop(resize_shorter_side(image, resolution), resolution)
    return to_normalized_tensor(image)


def load_and_preprocess(source: ImageSource, resolution: int = 224) -> torch.Tensor:
    """Decode then preprocess; raises :class:`ImageError` on bad input."""
    return preprocess(open_image(source), resolution)

"""Image decoding and the reference CLIP preprocessing, with PIL only.

Preprocessing (guide §3): resize so the shorter side equals the model resolution with PIL's
bicubic filter, centre crop, convert to RGB, scale to [0, 1] and normalise with CLIP's
mean and std. This is what the reference's torchvision pipeline does on PIL images; the
float operations are performed in the same order, so pixels match exactly. EXIF
orientation is not applied, as in the reference. Models that describe another pipeline
(HF ``preprocessor_config.json``: offsets floored, own mean/std) pass a
:class:`~specs_metric.config.PreprocessConfig` instead of a resolution.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from specs_metric.config import CLIP_MEAN as MEAN
from specs_metric.config import CLIP_STD as STD
from specs_metric.config import PreprocessConfig

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


_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def resize_shorter_side(
    image: Image.Image, size: int, interpolation: str = "bicubic"
) -> Image.Image:
    """Resize (bicubic by default) so that the shorter side is ``size`` (longer side rounded
    down)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, _FILTERS[interpolation])


def center_crop(image: Image.Image, size: int, rounding: str = "round") -> Image.Image:
    """Centre crop to ``size`` x ``size``. Offsets are rounded as the reference does
    (``round``, half to even), or floored as HF's ``CLIPImageProcessor`` does (``floor``)."""
    width, height = image.size
    if rounding == "floor":
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top = int(round((height - size) / 2.0))
        left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_normalized_tensor(
    image: Image.Image, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD
) -> torch.Tensor:
    """RGB image -> float tensor (3, H, W): /255, minus mean, divided by std (fp32)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return pixels.sub(mean_t).div(std_t)


def preprocess(image: Image.Image, resolution: int | PreprocessConfig = 224) -> torch.Tensor:
    """Preprocess one PIL image -> FloatTensor (3, R, R).

    ``resolution`` is either the size of the reference pipeline or a full
    :class:`~specs_metric.config.PreprocessConfig` (crop rounding, interpolation, mean/std).

    Example:
        >>> from PIL import Image
        >>> preprocess(Image.new("RGB", (50, 30), (255, 0, 0)), resolution=16).shape
        torch.Size([3, 16, 16])
    """
    pre = resolution if isinstance(resolution, PreprocessConfig) else None
    if pre is None:
        pre = PreprocessConfig.reference(int(resolution))
    image = resize_shorter_side(image, pre.resize, pre.interpolation)
    image = center_crop(image, pre.crop, pre.crop_rounding)
    return to_normalized_tensor(image, pre.mean, pre.std)


def load_and_preprocess(
    source: ImageSource, resolution: int | PreprocessConfig = 224
) -> torch.Tensor:
    """Decode then preprocess; raises :class:`ImageError` on bad input."""
    return preprocess(open_image(source), resolution)

"""Image reading and decoding, and the reference CLIP preprocessing, with PIL only.

Preprocessing: resize so the shorter side equals the model resolution with PIL's bicubic
filter, centre crop, convert to RGB, scale to [0, 1] and normalise with CLIP's mean and std.
This is what the reference's torchvision pipeline does on PIL images; the float operations
are performed in the same order, so pixels match exactly. EXIF orientation is not applied,
as in the reference. Models that describe another pipeline (HF ``preprocessor_config.json``:
offsets floored, own mean/std) pass a
:class:`~specs_metric.processing.preprocess.PreprocessConfig` instead of a resolution.

Untrusted files are read and decoded in bounded memory: files are read by
:func:`specs_metric.io.reading.read_image_bytes` (regular files of at most
:data:`~specs_metric.limits.MAX_IMAGE_BYTES`), and an image is refused before its pixels
are decoded when
it has more pixels than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) or
when resizing its shorter side to the model resolution would make more than
:data:`~specs_metric.limits.MAX_RESIZED_PIXELS` pixels (an extreme aspect ratio such as
1 x 1,000,000).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from specs_metric.data.images import ImageSource
from specs_metric.errors import ImageError
from specs_metric.io.reading import printable as _printable
from specs_metric.io.reading import read_image_bytes
from specs_metric.limits import MAX_RESIZED_PIXELS
from specs_metric.processing.preprocess import CLIP_MEAN as MEAN
from specs_metric.processing.preprocess import CLIP_STD as STD
from specs_metric.processing.preprocess import PreprocessConfig


def describe_image(source: ImageSource) -> str:
    """How messages call an image: its path, or ``<N image bytes>``."""
    if isinstance(source, bytes):
        return f"<{len(source)} image bytes>"
    return _printable(str(source))


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side of ``size`` to ``resolution``."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resolution * long / short)
    return (resolution, new_long) if width <= height else (new_long, resolution)


def check_image_size(
    size: tuple[int, int], resolution: int | None, name: str, decoding: bool = True
) -> None:
    """Refuse a size that cannot be decoded and preprocessed in bounded memory.

    Raises:
        ImageError: an empty size; when ``decoding``, more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS``; with ``resolution``, a shorter-side resize of
            more than :data:`MAX_RESIZED_PIXELS` pixels.
    """
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    limit = Image.MAX_IMAGE_PIXELS
    if decoding and limit is not None and width * height > limit:
        raise ImageError(
            f"{name}: image too large (decompression-bomb limit): {width}x{height} = "
            f"{width * height} pixels, more than {limit}"
        )
    if resolution is not None:
        new_w, new_h = resized_size(size, resolution)
        if new_w * new_h > MAX_RESIZED_PIXELS:
            raise ImageError(
                f"{name}: aspect ratio too extreme ({width}x{height}): resizing its shorter "
                f"side to {resolution} gives {new_w}x{new_h} pixels, more than "
                f"{MAX_RESIZED_PIXELS}"
            )


def open_image(
    source: ImageSource,
    name: str | None = None,
    resolution: int | PreprocessConfig | None = None,
) -> Image.Image:
    """Decode an image fully (so truncation errors surface here, not later).

    Args:
        source: a path, encoded bytes, or a PIL image (returned as is).
        name: how error messages call the image (default: the path).
        resolution: the model resolution it will be preprocessed for; an image whose
            shorter-side resize would be too large is then refused before decoding.

    Raises:
        ImageError: a file :func:`read_image_bytes` refuses; empty, truncated or non-image
            data; an image over PIL's decompression-bomb limit or too large to preprocess.
    """
    if isinstance(source, Image.Image):
        return source
    name = _printable(name) if name else describe_image(source)
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{name}: empty image data")
        data = source
    else:
        data = read_image_bytes(source, name=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                if isinstance(resolution, PreprocessConfig):
                    resolution = resolution.resize
                check_image_size(img.size, resolution, name)
                img.load()
                return img.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: image too large (decompression-bomb limit): {exc}") from exc
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image file") from exc
    except Exception as exc:  # OSError, SyntaxError, ...: any decoder failure on crafted data
        raise ImageError(f"{name}: cannot decode image ({exc})") from exc


_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def resize_shorter_side(
    image: Image.Image, size: int, interpolation: str = "bicubic"
) -> Image.Image:
    """Resize (bicubic by default) so that the shorter side is ``size`` (longer side rounded
    down).

    Raises:
        ImageError: the result would have more than :data:`MAX_RESIZED_PIXELS` pixels.
    """
    check_image_size(image.size, size, "image", decoding=False)
    if min(image.size) == size:
        return image
    return image.resize(resized_size(image.size, size), _FILTERS[interpolation])


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
    return normalize_pixels(torch.from_numpy(array.copy()), mean, std)


def normalize_pixels(
    pixels: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD
) -> torch.Tensor:
    """uint8 RGB pixels (..., H, W, 3) -> the model's input (..., 3, H, W), fp32 on the
    same device: /255, minus mean, divided by std. For images already at the model's size
    (a batch of them too), this is :func:`preprocess` without the resize and crop."""
    x = pixels.movedim(-1, -3).to(torch.float32).div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.sub(mean_t).div(std_t)


def preprocess(image: Image.Image, resolution: int | PreprocessConfig = 224) -> torch.Tensor:
    """Preprocess one PIL image -> FloatTensor (3, R, R).

    ``resolution`` is either the size of the reference pipeline or a full
    :class:`~specs_metric.models.config.PreprocessConfig` (crop rounding, interpolation, mean/std).

    Example:
        >>> from PIL import Image
        >>> preprocess(Image.new("RGB", (50, 30), (255, 0, 0)), resolution=16).shape
        torch.Size([3, 16, 16])

    Raises:
        ImageError: a size too extreme to resize, or a mode with no RGB conversion.
    """
    pre = resolution if isinstance(resolution, PreprocessConfig) else None
    if pre is None:
        pre = PreprocessConfig.reference(int(resolution))
    try:
        image = resize_shorter_side(image, pre.resize, pre.interpolation)
        image = center_crop(image, pre.crop, pre.crop_rounding)
        return to_normalized_tensor(image, pre.mean, pre.std)
    except ImageError:
        raise
    except (OSError, ValueError, MemoryError) as exc:  # e.g. a mode that has no RGB conversion
        raise ImageError(f"image (mode {image.mode}): cannot preprocess ({exc})") from exc


def decode_pixels(
    data: bytes, name: str, preprocessing: int | PreprocessConfig = 224
) -> torch.Tensor:
    """Encoded image bytes -> model pixels (3, R, R), refused in bounded memory when too
    large (see :func:`open_image`)."""
    return preprocess(open_image(data, name=name, resolution=preprocessing), preprocessing)


def load_and_preprocess(
    source: ImageSource, resolution: int | PreprocessConfig = 224
) -> torch.Tensor:
    """Decode then preprocess; raises :class:`ImageError` on bad input."""
    return preprocess(open_image(source, resolution=resolution), resolution)

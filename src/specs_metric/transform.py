"""Image reading and decoding, and the reference CLIP preprocessing, with PIL only.

Preprocessing: resize so the shorter side equals the model resolution with PIL's bicubic
filter, centre crop, convert to RGB, scale to [0, 1] and normalise with CLIP's mean and std.
This is what the reference's torchvision pipeline does on PIL images; the float operations
are performed in the same order, so pixels match exactly. EXIF orientation is not applied,
as in the reference. Models that describe another pipeline (HF ``preprocessor_config.json``:
offsets floored, own mean/std) pass a :class:`~specs_metric.config.PreprocessConfig`
instead of a resolution.

Untrusted files are read and decoded in bounded memory: only regular files of at most
:data:`MAX_IMAGE_BYTES` are read, and an image is refused before its pixels are decoded when
it has more pixels than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) or
when resizing its shorter side to the model resolution would make more than
:data:`MAX_RESIZED_PIXELS` pixels (an extreme aspect ratio such as 1 x 1,000,000).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from specs_metric.config import CLIP_MEAN as MEAN
from specs_metric.config import CLIP_STD as STD
from specs_metric.config import PreprocessConfig

# Largest image file read (bytes); larger files are refused unread.
MAX_IMAGE_BYTES = 64 * 2**20
# Most pixels of the shorter-side resize (before the centre crop). 2**25 allows aspect ratios
# up to about 1:668 at resolution 224 (the resized image then takes ~100 MB as RGB).
MAX_RESIZED_PIXELS = 2**25

ImageSource = str | os.PathLike | bytes | Image.Image


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


def describe_image(source: ImageSource) -> str:
    """How messages call an image: its path, or ``<N image bytes>``."""
    if isinstance(source, bytes):
        return f"<{len(source)} image bytes>"
    return _printable(str(source))


def _printable(name: str) -> str:
    """A name that can be written as UTF-8 (a path with bytes that are not UTF-8: escaped)."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _os_error(name: str, exc: OSError) -> ImageError:
    reasons = {
        errno.ENOENT: "image file not found",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EISDIR: "is a directory, not an image file",
        errno.ELOOP: "too many levels of symbolic links (a symlink loop?)",
        errno.ENOTDIR: "a part of the path is not a folder",
        errno.ENAMETOOLONG: "path too long",
        errno.ENXIO: "not a regular file",
    }
    reason = reasons.get(exc.errno) or f"cannot read image file ({exc.strerror or exc})"
    return ImageError(f"{name}: {reason}")


def _check_regular(name: str, st: os.stat_result, max_bytes: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{name}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{name}: not a regular file ({_file_kind(st.st_mode)})")
    if st.st_size > max_bytes:
        raise ImageError(
            f"{name}: image file too large ({st.st_size} bytes; the limit is {max_bytes})"
        )


def read_image_bytes(
    path: str | os.PathLike[str], max_bytes: int | None = None, name: str | None = None
) -> bytes:
    """The bytes of an image file, read in bounded memory.

    Only a regular file is opened (never a FIFO, a device or a directory, which could block
    or never end), and at most ``max_bytes`` (default :data:`MAX_IMAGE_BYTES`) are read.

    Raises:
        ImageError: not found, permission denied, a directory, not a regular file, a path
            that cannot name a file (a NUL byte), empty, or larger than ``max_bytes``.
    """
    limit = MAX_IMAGE_BYTES if max_bytes is None else max_bytes
    name = _printable(name or str(path))
    try:
        # stat first: a FIFO or a device is refused without being opened at all
        _check_regular(name, os.stat(path), limit)
        # O_NONBLOCK: should the path have become a FIFO since, opening it does not block
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except ImageError:
        raise
    except OSError as exc:
        raise _os_error(name, exc) from None
    except ValueError as exc:  # a NUL byte, or text that is not a valid file name
        raise ImageError(f"{name!r}: not a valid file path ({exc})") from None
    try:
        _check_regular(name, os.fstat(fd), limit)  # the file that was actually opened
        parts, size = [], 0
        while size <= limit:
            part = os.read(fd, min(limit + 1 - size, 1 << 20))
            if not part:
                break
            parts.append(part)
            size += len(part)
    except OSError as exc:
        raise _os_error(name, exc) from None
    finally:
        os.close(fd)
    if size > limit:  # the file grew while being read
        raise ImageError(f"{name}: image file too large (over {limit} bytes)")
    if size == 0:
        raise ImageError(f"{name}: image file is empty (0 bytes)")
    return b"".join(parts)


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
    :class:`~specs_metric.config.PreprocessConfig` (crop rounding, interpolation, mean/std).

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


def image_bytes(
    path: str | os.PathLike[str] | None, data: bytes | None = None, name: str | None = None
) -> bytes:
    """The encoded bytes of an image given as a file (read by :func:`read_image_bytes`) or
    as bytes from a shard or table (``name`` calls them in messages).

    Raises:
        ImageError: a file :func:`read_image_bytes` refuses, or empty bytes.
    """
    if data is None:
        if path is None:
            raise ImageError("row has no image")
        return read_image_bytes(path)
    if not data:
        raise ImageError(f"{name or 'image bytes'}: image is empty (0 bytes)")
    return data


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

"""Deterministic test data: tiny checkpoints in every supported file layout, and test images.

All random values come from ``numpy.random.default_rng`` so that they are identical across
torch versions (the reference-parity fixtures in ``tests/data/reference`` are generated from
these same functions in a different environment).

Every tensor of a state dict gets its own generator seeded with ``(seed, crc32(key))``: the
value of a key depends only on the seed, the key and its shape, so a 77-position checkpoint
and a 248-position checkpoint built with the same seed share all other weights.
"""

from __future__ import annotations

import io
import math
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

LONG_CONTEXT = 248
CLIP_CONTEXT = 77
VOCAB_SIZE = 49408
LOGIT_SCALE = math.log(100.0)

# Names accepted by ``write_checkpoint``.
CHECKPOINT_FORMATS = (
    "pt",  # torch.save(state_dict): the reference LongCLIP layout
    "pt-legacy",  # same, in torch's pre-1.6 (non-zip) serialisation
    "state_dict",  # {"state_dict": sd, "epoch": ...}
    "model",  # {"model": sd, "epoch": ...}
    "module",  # keys prefixed with "module." (DistributedDataParallel)
    "state_dict-module",  # {"state_dict": {"module.<key>": ...}}
    "safetensors",
    "torchscript",  # OpenAI-style TorchScript archive
)

_SUFFIXES = {"safetensors": ".safetensors"}


# --------------------------------------------------------------------------- state dicts


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _normal(seed: int, key: str, shape: tuple[int, ...], std: float, mean: float = 0.0):
    values = _rng(seed, key).normal(mean, std, size=shape)
    return torch.from_numpy(values.astype(np.float32))


def _layer_norm(sd: dict, seed: int, prefix: str, width: int) -> None:
    # Near-identity LayerNorms with non-zero biases, so that a swapped weight/bias is caught.
    sd[f"{prefix}.weight"] = _normal(seed, f"{prefix}.weight", (width,), 0.1, mean=1.0)
    sd[f"{prefix}.bias"] = _normal(seed, f"{prefix}.bias", (width,), 0.1)


def _resblocks(sd: dict, seed: int, prefix: str, width: int, layers: int) -> None:
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}"
        shapes = {
            "attn.in_proj_weight": ((3 * width, width), attn_std),
            "attn.in_proj_bias": ((3 * width,), 0.02),
            "attn.out_proj.weight": ((width, width), proj_std),
            "attn.out_proj.bias": ((width,), 0.02),
        }
        for name, (shape, std) in shapes.items():
            sd[f"{p}.{name}"] = _normal(seed, f"{p}.{name}", shape, std)
        _layer_norm(sd, seed, f"{p}.ln_1", width)
        shapes = {
            "mlp.c_fc.weight": ((4 * width, width), fc_std),
            "mlp.c_fc.bias": ((4 * width,), 0.02),
            "mlp.c_proj.weight": ((width, 4 * width), proj_std),
            "mlp.c_proj.bias": ((width,), 0.02),
        }
        for name, (shape, std) in shapes.items():
            sd[f"{p}.{name}"] = _normal(seed, f"{p}.{name}", shape, std)
        _layer_norm(sd, seed, f"{p}.ln_2", width)


def _clip_state_dict(
    *,
    seed: int,
    embed_dim: int,
    vision_width: int,
    vision_layers: int,
    patch: int,
    resolution: int,
    text_width: int,
    text_layers: int,
    context_length: int,
    vocab_size: int,
    long_positions: bool,
) -> dict[str, torch.Tensor]:
    if resolution % patch:
        raise ValueError(f"resolution {resolution} is not a multiple of patch {patch}")
    sd: dict[str, torch.Tensor] = {}
    # Same key order as the reference model's state_dict(): own parameters, then submodules.
    sd["positional_embedding"] = _normal(
        seed, "positional_embedding", (context_length, text_width), 0.01
    )
    if long_positions:
        sd["positional_embedding_res"] = _normal(
            seed, "positional_embedding_res", (context_length, text_width), 0.01
        )
    sd["text_projection"] = _normal(
        seed, "text_projection", (text_width, embed_dim), text_width**-0.5
    )
    sd["logit_scale"] = torch.tensor(LOGIT_SCALE, dtype=torch.float32)

    scale = vision_width**-0.5
    grid = resolution // patch
    sd["visual.class_embedding"] = _normal(seed, "visual.class_embedding", (vision_width,), scale)
    sd["visual.positional_embedding"] = _normal(
        seed, "visual.positional_embedding", (grid * grid + 1, vision_width), scale
    )
    sd["visual.proj"] = _normal(seed, "visual.proj", (vision_width, embed_dim), scale)
    sd["visual.conv1.weight"] = _normal(
        seed, "visual.conv1.weight", (vision_width, 3, patch, patch), (3 * patch * patch) ** -0.5
    )
    _layer_norm(sd, seed, "visual.ln_pre", vision_width)
    _resblocks(sd, seed, "visual.transformer", vision_width, vision_layers)
    _layer_norm(sd, seed, "visual.ln_post", vision_width)

    _resblocks(sd, seed, "transformer", text_width, text_layers)
    sd["token_embedding.weight"] = _normal(
        seed, "token_embedding.weight", (vocab_size, text_width), 0.02
    )
    _layer_norm(sd, seed, "ln_final", text_width)
    return sd


def make_state_dict(
    *,
    seed: int = 0,
    embed_dim: int = 32,
    vision_width: int = 64,
    vision_layers: int = 1,
    patch: int = 16,
    resolution: int = 32,
    text_width: int = 64,
    text_layers: int = 1,
    context_length: int = LONG_CONTEXT,
    vocab_size: int = VOCAB_SIZE,
) -> dict[str, torch.Tensor]:
    """Random LongCLIP ViT weights in the reference checkpoint key layout.

    ``positional_embedding_res`` is present when ``context_length > 77`` (as in LongCLIP files).
    Attention heads follow from the widths (``width // 64``), so widths should be multiples of 64.
    """
    return _clip_state_dict(
        seed=seed,
        embed_dim=embed_dim,
        vision_width=vision_width,
        vision_layers=vision_layers,
        patch=patch,
        resolution=resolution,
        text_width=text_width,
        text_layers=text_layers,
        context_length=context_length,
        vocab_size=vocab_size,
        long_positions=context_length > CLIP_CONTEXT,
    )


def make_openai_state_dict(
    *,
    seed: int = 0,
    embed_dim: int = 32,
    vision_width: int = 64,
    vision_layers: int = 1,
    patch: int = 16,
    resolution: int = 32,
    text_width: int = 64,
    text_layers: int = 1,
    vocab_size: int = VOCAB_SIZE,
    with_extras: bool = False,
) -> dict[str, torch.Tensor]:
    """Random OpenAI CLIP ViT weights: 77 text positions, no ``positional_embedding_res``.

    With ``with_extras`` the dict also holds the integer scalar tensors ``input_resolution``,
    ``context_length`` and ``vocab_size`` that OpenAI's TorchScript archives carry (they are
    not weights of the model; loaders drop them).
    """
    sd = _clip_state_dict(
        seed=seed,
        embed_dim=embed_dim,
        vision_width=vision_width,
        vision_layers=vision_layers,
        patch=patch,
        resolution=resolution,
        text_width=text_width,
        text_layers=text_layers,
        context_length=CLIP_CONTEXT,
        vocab_size=vocab_size,
        long_positions=False,
    )
    if with_extras:
        sd.update(openai_extras(sd))
    return sd


def openai_extras(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The non-weight scalar tensors an OpenAI archive stores next to ``sd``'s weights."""
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return {
        "input_resolution": torch.tensor(patch * grid),
        "context_length": torch.tensor(sd["positional_embedding"].shape[0]),
        "vocab_size": torch.tensor(sd["token_embedding.weight"].shape[0]),
    }


def make_resnet_state_dict(*, seed: int = 0, width: int = 8, embed_dim: int = 16) -> dict:
    """A small CLIP ResNet-style state dict (``visual.layer*`` and ``visual.attnpool.*`` keys).

    Not a complete ModifiedResNet; it has enough of the layout for loaders to recognise it.
    """
    sd = _clip_state_dict(
        seed=seed,
        embed_dim=embed_dim,
        vision_width=64,
        vision_layers=1,
        patch=16,
        resolution=32,
        text_width=64,
        text_layers=1,
        context_length=CLIP_CONTEXT,
        vocab_size=VOCAB_SIZE,
        long_positions=False,
    )
    sd = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    feat = width * 32
    resnet = {
        "visual.conv1.weight": (width // 2, 3, 3, 3),
        "visual.bn1.weight": (width // 2,),
        "visual.bn1.bias": (width // 2,),
        "visual.bn1.running_mean": (width // 2,),
        "visual.bn1.running_var": (width // 2,),
        "visual.layer1.0.conv1.weight": (width, width, 1, 1),
        "visual.layer1.0.bn1.weight": (width,),
        "visual.layer1.0.bn1.bias": (width,),
        "visual.layer2.0.conv1.weight": (2 * width, 4 * width, 1, 1),
        "visual.layer3.0.conv1.weight": (4 * width, 8 * width, 1, 1),
        "visual.layer4.0.conv1.weight": (8 * width, 16 * width, 1, 1),
        "visual.attnpool.positional_embedding": (2, feat),
        "visual.attnpool.k_proj.weight": (feat, feat),
        "visual.attnpool.q_proj.weight": (feat, feat),
        "visual.attnpool.v_proj.weight": (feat, feat),
        "visual.attnpool.c_proj.weight": (embed_dim, feat),
        "visual.attnpool.c_proj.bias": (embed_dim,),
    }
    for key, shape in resnet.items():
        sd[key] = _normal(seed, key, shape, 0.05)
    return sd


# --------------------------------------------------------------------------- file layouts


def _save_script_module(tensors: dict[str, torch.Tensor], target) -> None:
    """Save a TorchScript archive whose ``state_dict()`` keys are exactly ``tensors``' keys.

    Floating tensors become parameters, others (the integer extras) buffers, like the modules
    in OpenAI's archives. ``target``: a file name or a binary stream.
    """

    class Node(nn.Module):
        pass

    root = Node()
    for key, value in tensors.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, Node())
            node = node._modules[part]
        if value.is_floating_point():
            node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            node.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():
        # torch>=2.10 flags TorchScript as deprecated; the files it writes are what we need.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(root), target)


def checkpoint_suffix(fmt: str) -> str:
    """File name suffix conventionally used for checkpoint format ``fmt``."""
    return _SUFFIXES.get(fmt, ".pt")


def write_checkpoint(
    state_dict: dict[str, torch.Tensor], path: str | Path, fmt: str = "pt"
) -> Path:
    """Write ``state_dict`` to ``path`` in one of ``CHECKPOINT_FORMATS``; returns ``path``.

    The ``torchscript`` archive stores the tensors with their dtypes as given (OpenAI's own
    archives hold most weights in fp16; pass such a dict to mimic them) and, when the dict has
    77 positions and no extras, adds the integer extras OpenAI archives carry.
    """
    path = Path(path)
    sd = dict(state_dict)
    if fmt == "pt":
        torch.save(sd, path)
    elif fmt == "pt-legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif fmt == "state_dict":
        torch.save({"state_dict": sd, "epoch": 3, "step": 1200}, path)
    elif fmt == "model":
        torch.save({"model": sd, "epoch": 3}, path)
    elif fmt == "module":
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif fmt == "state_dict-module":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        # safetensors refuses tensors that share memory; the factories never produce any.
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "torchscript":
        tensors = dict(sd)
        if "positional_embedding_res" not in tensors and "input_resolution" not in tensors:
            tensors.update(openai_extras(tensors))
        _save_script_module(tensors, str(path))
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {CHECKPOINT_FORMATS}")
    return path


def openai_half(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy of ``state_dict`` with the tensors OpenAI stores in fp16 cast to half.

    These are the weights the reference loader rounds (Conv2d/Linear weights and biases,
    attention in-projections, ``text_projection``, ``visual.proj``).
    """
    half_suffixes = (
        "conv1.weight",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    )
    out = {}
    for key, value in state_dict.items():
        is_half = key.endswith(half_suffixes) or key in ("text_projection", "visual.proj")
        out[key] = value.half() if is_half else value
    return out


def fp16_rounded(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with the reference loader's fp16 rounding applied, back in fp32."""
    halved = openai_half(state_dict)
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in halved.items()}


class _Marker:
    """Unpickling this object opens (and so creates) the file at ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def make_malicious_pickle(path: str | Path, marker: str | Path, *, legacy: bool = False) -> Path:
    """A checkpoint whose unpickling runs code: it creates the file ``marker``.

    The payload sits next to real tensors in an otherwise ordinary state dict, so a loader that
    unpickles without restrictions would load it silently. ``legacy`` writes a plain pickle
    stream instead of torch's zip container.
    """
    path = Path(path)
    payload = {"logit_scale": torch.tensor(LOGIT_SCALE), "config": _Marker(Path(marker))}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path)
    return path


def make_malicious_torchscript(path: str | Path, marker: str | Path) -> Path:
    """A TorchScript archive whose ``data.pkl`` creates the file ``marker`` when unpickled.

    Everything else (code, constants, tensor records) is that of a genuine archive, so only a
    reader that restricts what ``data.pkl`` may reference refuses it.
    """
    path = Path(path)
    genuine = io.BytesIO()
    _save_script_module({"logit_scale": torch.tensor(LOGIT_SCALE)}, genuine)
    genuine.seek(0)
    with zipfile.ZipFile(genuine) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps({"logit_scale": _Marker(Path(marker))}, protocol=2)
            dst.writestr(info, data)
    return path


def truncate_file(source: str | Path, target: str | Path, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of ``source``'s bytes to ``target`` (a cut-off download)."""
    data = Path(source).read_bytes()
    target = Path(target)
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def zip_member_names(path: str | Path) -> list[str]:
    """Names inside a zip-based checkpoint (torch.save and TorchScript files)."""
    with zipfile.ZipFile(path) as zf:
        return zf.namelist()


# --------------------------------------------------------------------------- images


def _smooth_noise(
    rng: np.random.Generator, height: int, width: int, channels: int, fine: float = 6.0
) -> np.ndarray:
    """uint8 image: gradients plus blurred noise plus a little fine noise.

    Smooth enough that JPEG and PNG files stay small, detailed enough that resampling errors
    show up.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.empty((height, width, channels))
    for c in range(channels):
        fx, fy = rng.uniform(0.5, 3.0, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * xx / max(width, 1) + fy * yy / max(height, 1)) + phase)
        coarse = rng.normal(size=(max(height // 8, 1) + 1, max(width // 8, 1) + 1))
        iy = np.minimum((yy / 8).astype(int), coarse.shape[0] - 1)
        ix = np.minimum((xx / 8).astype(int), coarse.shape[1] - 1)
        out[..., c] = 128 + 70 * wave + 25 * coarse[iy, ix] + rng.normal(0, fine, (height, width))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _image(array: np.ndarray, mode: str) -> Image.Image:
    """PIL image of ``mode`` holding ``array`` (H, W[, C]); explicit about the raw layout."""
    height, width = array.shape[:2]
    return Image.frombytes(mode, (width, height), np.ascontiguousarray(array).tobytes())


def _noise(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)


def _img_rgb_small(rng):
    return _image(_noise(rng, 53, 37, 3), "RGB")


def _img_rgba(rng):
    # Posterised to keep the PNG small.
    return _image(_smooth_noise(rng, 200, 300, 4, fine=0.0) // 16 * 16, "RGBA")


def _img_palette(rng):
    return _image(_smooth_noise(rng, 47, 61, 3), "RGB").quantize(colors=32, dither=0)


def _img_palette_gif(rng):
    return _image(_smooth_noise(rng, 40, 50, 3), "RGB").quantize(colors=16, dither=0)


def _img_gray(rng):
    return _image(_smooth_noise(rng, 30, 45, 1)[..., 0], "L")


def _img_gray_alpha(rng):
    return _image(_smooth_noise(rng, 45, 30, 2), "LA")


def _img_cmyk(rng):
    return _image(_smooth_noise(rng, 60, 40, 4), "CMYK")


def _img_i16(rng):
    values = rng.integers(0, 65536, size=(20, 24), dtype=np.uint16)
    return _image(values.astype("<u2"), "I;16")


def _img_bilevel(rng):
    return _image(_noise(rng, 33, 27, 1)[..., 0], "L").point(lambda v: 255 * (v > 127)).convert("1")


def _img_thin(rng):
    return _image(_noise(rng, 500, 1, 3), "RGB")


def _img_tiny(rng):
    return _image(_noise(rng, 3, 5, 3), "RGB")


def _img_large(rng):
    return _image(_smooth_noise(rng, 481, 640, 3), "RGB")


def _img_exif_rotated(rng):
    img = _image(_smooth_noise(rng, 30, 40, 3), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display; the reference ignores it
    img.info["exif"] = exif.tobytes()
    return img


# name -> (builder, file name, save options). Ordered; the seed of image i is 1000 + i.
_IMAGES: dict[str, tuple[Callable, str, dict]] = {
    "rgb_37x53": (_img_rgb_small, "rgb_37x53.png", {}),
    "rgba_300x200": (_img_rgba, "rgba_300x200.png", {}),
    "palette_61x47": (_img_palette, "palette_61x47.png", {}),
    "palette_50x40_gif": (_img_palette_gif, "palette_50x40.gif", {}),
    "gray_45x30": (_img_gray, "gray_45x30.png", {}),
    "gray_alpha_30x45": (_img_gray_alpha, "gray_alpha_30x45.png", {}),
    "cmyk_40x60": (_img_cmyk, "cmyk_40x60.tiff", {"compression": "tiff_deflate"}),
    "i16_24x20": (_img_i16, "i16_24x20.png", {}),
    "bilevel_27x33": (_img_bilevel, "bilevel_27x33.png", {}),
    "thin_1x500": (_img_thin, "thin_1x500.png", {}),
    "tiny_5x3": (_img_tiny, "tiny_5x3.png", {}),
    "large_640x481": (_img_large, "large_640x481.jpg", {"quality": 75}),
    "exif_rotated_40x30": (_img_exif_rotated, "exif_rotated_40x30.jpg", {"quality": 90}),
}

IMAGE_NAMES = tuple(_IMAGES)
IMAGE_DIR = Path(__file__).parent / "data" / "images"


def make_test_image(name: str) -> Image.Image:
    """The in-memory test image ``name`` (one of ``IMAGE_NAMES``), before any file encoding."""
    builder, _, _ = _IMAGES[name]
    return builder(np.random.default_rng(1000 + IMAGE_NAMES.index(name)))


def image_file(name: str, directory: str | Path = IMAGE_DIR) -> Path:
    """Path of the committed file of test image ``name``."""
    return Path(directory) / _IMAGES[name][1]


def write_test_images(directory: str | Path = IMAGE_DIR) -> dict[str, Path]:
    """Encode every test image into ``directory``; returns name -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in IMAGE_NAMES:
        img = make_test_image(name)
        path = image_file(name, directory)
        options = dict(_IMAGES[name][2])
        if "exif" in img.info:
            options["exif"] = img.info["exif"]
        img.save(path, **options)
        paths[name] = path
    return paths


def image_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    """``img`` encoded as ``fmt`` in memory."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def sample_coordinates(
    count: int, channels: int, size: int, seed: int = 7
) -> list[tuple[int, int, int]]:
    """``count`` fixed (channel, row, column) positions in a (channels, size, size) tensor."""
    rng = np.random.default_rng([seed, size])
    c = rng.integers(0, channels, count)
    y = rng.integers(0, size, count)
    x = rng.integers(0, size, count)
    return [(int(a), int(b), int(d)) for a, b, d in zip(c, y, x, strict=True)]


def pixel_summary(pixels: Iterable) -> dict:
    """Per-channel sum and sum of squares (float64) of a (3, R, R) array, plus sample values."""
    arr = np.asarray(pixels, dtype=np.float64)
    coords = sample_coordinates(64, arr.shape[0], arr.shape[1])
    return {
        "shape": list(arr.shape),
        "sum": arr.sum(axis=(1, 2)).tolist(),
        "sum_sq": (arr * arr).sum(axis=(1, 2)).tolist(),
        "samples": [float(arr[c, y, x]) for c, y, x in coords],
    }


def score_args(world: str | Path, src: str | Path, out: str | Path) -> list[str]:
    """``specs score`` arguments for ``world``'s ``tiny.pt`` and its images."""
    world = Path(world)
    return ["score", "--model", str(world / "tiny.pt"), "--input", str(src),
            "--image-root", str(world), "--output", str(out)]

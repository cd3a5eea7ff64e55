"""Named architectures and architecture files: what a description pins of a
:class:`~specs_metric.models.config.ModelConfig` that the tensors cannot tell (activation, head
widths), for ``--arch``.

:data:`ARCHS` holds the OpenAI/LongCLIP convention and the open_clip ViT families;
:func:`read_arch` also reads a JSON file (a flat :class:`ModelConfig` dict, an open_clip
model config or ``open_clip_config.json``, or an HF ``config.json``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specs_metric.errors import ConfigError
from specs_metric.limits import MAX_CONTEXT, MAX_IMAGE_SIZE, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH
from specs_metric.models.weights.validation import (
    Where,
    check_model_fields,
    preprocess_config,
    read_json_file,
    require_bool,
    require_float,
    require_int,
    require_numbers,
    require_object,
    require_str,
)
from specs_metric.processing.preprocess import CLIP_MEAN, CLIP_STD, INTERPOLATIONS, PreprocessConfig


@dataclass(frozen=True)
class Arch:
    """A named architecture: what it pins of a :class:`ModelConfig` (any subset of fields),
    and, for models from a known family, its preprocessing."""

    name: str
    description: str
    pins: Mapping[str, Any]
    preprocess: PreprocessConfig | None = None


def _vit(embed: int, res: int, vw: int, patch: int, tw: int, **extra: Any) -> dict[str, Any]:
    return {
        "embed_dim": embed,
        "image_resolution": res,
        "vision_width": vw,
        "vision_patch_size": patch,
        "text_width": tw,
        **extra,
    }


# open_clip model configs (src/open_clip/model_configs/*.json): "quick_gelu": true selects
# QuickGELU, otherwise nn.GELU; vision heads are width / head_width (default 64), text heads
# are given as a count (all 64 wide here).
_OPEN_CLIP_FAMILIES = {
    "ViT-B-32": _vit(512, 224, 768, 32, 512),
    "ViT-B-16": _vit(512, 224, 768, 16, 512),
    "ViT-L-14": _vit(768, 224, 1024, 14, 768),
    "ViT-L-14-336": _vit(768, 336, 1024, 14, 768),
    "ViT-H-14": _vit(1024, 224, 1280, 14, 1024, vision_head_width=80),
    "ViT-g-14": _vit(1024, 224, 1408, 14, 1024, vision_head_width=88),
    "ViT-bigG-14": _vit(1280, 224, 1664, 14, 1280, vision_head_width=104),
}


def _build_archs() -> dict[str, Arch]:
    archs = {
        "openai": Arch(
            "openai",
            "the OpenAI CLIP / LongCLIP convention: QuickGELU, 64-wide heads (the default "
            "for OpenAI-layout files)",
            {"activation": "quick_gelu", "vision_head_width": 64, "text_head_width": 64},
        )
    }
    for name, shape in _OPEN_CLIP_FAMILIES.items():
        head = shape.get("vision_head_width", 64)
        for suffix, act in (("", "gelu"), ("-quickgelu", "quick_gelu")):
            label = "GELU (LAION / DataComp weights)" if act == "gelu" else "QuickGELU"
            archs[name + suffix] = Arch(
                name + suffix,
                f"open_clip {name}, {label}, {head}-wide vision heads",
                {"text_head_width": 64, "vision_head_width": 64, **shape, "activation": act},
                PreprocessConfig(resize=shape["image_resolution"]),
            )
    return archs


ARCHS: dict[str, Arch] = _build_archs()


def _open_clip_size(data: Mapping[str, Any], key: str, where: Where, default: int) -> int:
    """An open_clip image size: an integer or a square ``[n, n]``."""
    value = data.get(key)
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        return require_int({key: value[0]}, key, where, high=MAX_IMAGE_SIZE)
    return require_int(data, key, where, high=MAX_IMAGE_SIZE, default=default)


def _pins_from_open_clip(data: Mapping[str, Any], where: Where) -> dict[str, Any]:
    """Pins of an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``), each
    field checked for type and range."""
    vision = require_object(data, "vision_cfg", where, default={})
    text = require_object(data, "text_cfg", where, default={})
    at_vision, at_text = where / "vision_cfg", where / "text_cfg"
    if isinstance(vision.get("layers"), (list, tuple)):
        raise at_vision.error("layers", "is a list: only ViT image towers are supported")
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise ConfigError(f"{where.file}: open_clip timm / HF towers are not supported")
    quick = require_bool(data, "quick_gelu", where, default=False)
    pins: dict[str, Any] = {
        "activation": "quick_gelu" if quick else "gelu",
        "vision_head_width": require_int(vision, "head_width", at_vision, default=64),
    }

    def given(obj: Mapping[str, Any], at: Where, ours: str, theirs: str, high: int) -> None:
        if obj.get(theirs) is not None:
            pins[ours] = require_int(obj, theirs, at, high=high)

    given(data, where, "embed_dim", "embed_dim", MAX_WIDTH)
    if vision.get("image_size") is not None:
        pins["image_resolution"] = _open_clip_size(vision, "image_size", at_vision, 224)
    given(vision, at_vision, "vision_width", "width", MAX_WIDTH)
    given(vision, at_vision, "vision_layers", "layers", MAX_LAYERS)
    given(vision, at_vision, "vision_patch_size", "patch_size", MAX_IMAGE_SIZE)
    if vision.get("mlp_ratio") is not None and "vision_width" in pins:
        ratio = require_float(vision, "mlp_ratio", at_vision, low=0.0, high=64.0, low_open=True)
        pins["vision_mlp_width"] = int(pins["vision_width"] * ratio)
    given(text, at_text, "context_length", "context_length", MAX_CONTEXT)
    given(text, at_text, "vocab_size", "vocab_size", MAX_VOCAB)
    given(text, at_text, "text_width", "width", MAX_WIDTH)
    given(text, at_text, "text_layers", "layers", MAX_LAYERS)
    if "text_width" in pins:
        heads = require_int(text, "heads", at_text, default=8)
        if pins["text_width"] % heads:
            raise at_text.error(
                "heads", f"{heads} does not divide the text width {pins['text_width']}"
            )
        pins["text_head_width"] = pins["text_width"] // heads
    return pins


def read_arch(name_or_path: str | Path) -> Arch:
    """An architecture from a name in :data:`ARCHS` or a JSON file.

    The file may be a flat dict of :class:`ModelConfig` fields, an open_clip model config
    (or an ``open_clip_config.json`` holding one under ``model_cfg``), or an HF
    ``config.json``.
    """
    key = str(name_or_path)
    if key in ARCHS:
        return ARCHS[key]
    path = Path(os.path.expanduser(key))  # (Path.expanduser raises for an unknown ~user)
    if not path.is_file():
        raise ConfigError(
            f"--arch {key!r} is neither an architecture name ({', '.join(ARCHS)}) nor a JSON file"
        )
    return arch_from_json(read_json_file(path, "JSON architecture"), str(path))


def arch_from_json(data: Mapping[str, Any], name: str) -> Arch:
    """See :func:`read_arch`; ``name`` is the file, named in messages. Every field read is
    checked for type and range (:mod:`specs_metric.models.weights.validation`).

    Raises:
        ConfigError: a field of the wrong type, out of range or unsupported.
    """
    where = Where(name)
    preprocess = None
    if "model_cfg" in data:  # open_clip_config.json
        pre = require_object(data, "preprocess_cfg", where, default={})
        data = require_object(data, "model_cfg", where)
        vision = data.get("vision_cfg")
        resolution = 224
        if isinstance(vision, dict):
            resolution = _open_clip_size(vision, "image_size", where / "model_cfg.vision_cfg", 224)
        preprocess = open_clip_preprocess(pre, resolution, where / "preprocess_cfg")
        where = where / "model_cfg"
    if "vision_cfg" in data or "text_cfg" in data:
        return Arch(name, "open_clip model config", _pins_from_open_clip(data, where), preprocess)
    if "vision_config" in data or "text_config" in data:
        from specs_metric.models.weights.hf import config_from_hf

        return Arch(name, "HF CLIP config.json", config_from_hf(data, name).to_dict())
    return Arch(name, "model config", check_model_fields(data, where))


def open_clip_preprocess(
    pre: Mapping[str, Any], resolution: int, where: Where | str = "open_clip preprocess_cfg"
) -> PreprocessConfig:
    """open_clip's ``preprocess_cfg``: resize shorter side + centre crop ("shortest"), with
    its mean/std and interpolation. Other resize modes are refused."""
    at = where if isinstance(where, Where) else Where(str(where))
    mode = require_str(pre, "resize_mode", at, default="shortest")
    if mode != "shortest":
        raise at.error("resize_mode", f"{mode!r} is not supported (only 'shortest')")
    return preprocess_config(
        at,
        resize=_open_clip_size(pre, "size", at, resolution),
        interpolation=require_str(pre, "interpolation", at, choices=INTERPOLATIONS,
                                  default="bicubic"),
        mean=require_numbers(pre, "mean", at, length=3, low=-1e3, high=1e3, default=CLIP_MEAN),
        std=require_numbers(pre, "std", at, length=3, low=0.0, high=1e3, low_open=True,
                            default=CLIP_STD),
    )  # fmt: skip

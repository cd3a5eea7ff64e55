"""Named architectures and architecture files: what a description pins of a
:class:`~specs_metric.models.config.ModelConfig` that the tensors cannot tell (activation, head
widths), for ``--arch``.

:data:`ARCHS` holds the OpenAI/LongCLIP convention and the open_clip ViT families;
:func:`read_arch` also reads a JSON file (a flat :class:`ModelConfig` dict, an open_clip
model config or ``open_clip_config.json``, or an HF ``config.json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from specs_metric.errors import ConfigError
from specs_metric.models.config import ModelConfig
from specs_metric.processing.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig


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


def _pins_from_open_clip(data: Mapping[str, Any]) -> dict[str, Any]:
    """Pins of an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
    vision, text = data.get("vision_cfg", {}), data.get("text_cfg", {})
    if not isinstance(vision.get("layers", 0), int):
        raise ConfigError("open_clip config: only ViT image towers are supported")
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise ConfigError("open_clip config: timm / HF towers are not supported")
    pins: dict[str, Any] = {
        "activation": "quick_gelu" if data.get("quick_gelu") else "gelu",
        "vision_head_width": vision.get("head_width", 64),
    }
    if "embed_dim" in data:
        pins["embed_dim"] = data["embed_dim"]
    for ours, theirs in (
        ("image_resolution", "image_size"),
        ("vision_width", "width"),
        ("vision_layers", "layers"),
        ("vision_patch_size", "patch_size"),
    ):
        if theirs in vision:
            pins[ours] = vision[theirs]
    if "mlp_ratio" in vision and "width" in vision:
        pins["vision_mlp_width"] = int(vision["width"] * vision["mlp_ratio"])
    for ours, theirs in (
        ("context_length", "context_length"),
        ("vocab_size", "vocab_size"),
        ("text_width", "width"),
        ("text_layers", "layers"),
    ):
        if theirs in text:
            pins[ours] = text[theirs]
    if "width" in text:
        heads = text.get("heads", 8)
        if text["width"] % heads:
            raise ConfigError(f"open_clip config: text width {text['width']} / {heads} heads")
        pins["text_head_width"] = text["width"] // heads
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
    path = Path(key).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"--arch {key!r} is neither an architecture name ({', '.join(ARCHS)}) nor a JSON file"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON architecture ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an architecture file holds a JSON object")
    return arch_from_json(data, str(path))


def arch_from_json(data: Mapping[str, Any], name: str) -> Arch:
    """See :func:`read_arch`."""
    preprocess = None
    if "model_cfg" in data:  # open_clip_config.json
        pre = data.get("preprocess_cfg") or {}
        data = data["model_cfg"]
        resolution = data.get("vision_cfg", {}).get("image_size", 224)
        preprocess = open_clip_preprocess(pre, resolution)
    if "vision_cfg" in data or "text_cfg" in data:
        return Arch(name, "open_clip model config", _pins_from_open_clip(data), preprocess)
    if "vision_config" in data or "text_config" in data:
        from specs_metric.models.weights.hf import config_from_hf

        return Arch(name, "HF CLIP config.json", config_from_hf(data).to_dict())
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown model-config fields {unknown}")
    return Arch(name, "model config", dict(data))


def open_clip_preprocess(pre: Mapping[str, Any], resolution: int) -> PreprocessConfig:
    """open_clip's ``preprocess_cfg``: resize shorter side + centre crop ("shortest"), with
    its mean/std and interpolation. Other resize modes are refused."""
    mode = pre.get("resize_mode", "shortest")
    if mode != "shortest":
        raise ConfigError(f"open_clip resize_mode {mode!r} is not supported (only 'shortest')")
    size = pre.get("size", resolution)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return PreprocessConfig(
        resize=int(size),
        interpolation=pre.get("interpolation", "bicubic"),
        mean=tuple(pre.get("mean", CLIP_MEAN)),
        std=tuple(pre.get("std", CLIP_STD)),
    )

"""Hugging Face ``transformers`` CLIP checkpoints, read and written without ``transformers``.

A ``save_pretrained`` folder of a ``CLIPModel`` holds ``config.json``, the weights
(``model.safetensors``, possibly sharded, or ``pytorch_model.bin``) and usually
``preprocessor_config.json``. This module maps its keys to the OpenAI/LongCLIP layout and
back, turns ``config.json`` into a :class:`~specs_metric.models.config.ModelConfig` (with the
defaults ``transformers`` applies to missing fields) and ``preprocessor_config.json`` into a
:class:`~specs_metric.models.config.PreprocessConfig`.

Positions: HF keeps one positional table (77 rows, or 248 for LongCLIP ports). In the
LongCLIP layout a 248-row table becomes both ``positional_embedding`` and
``positional_embedding_res`` (the same forward); going back, the LongCLIP table is merged
(rows < 20 from the first, the rest from the second).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from specs_metric.errors import ConfigError
from specs_metric.models.config import ModelConfig
from specs_metric.processing.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
KEPT_POSITIONS = 20

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, applied to missing fields.
_TEXT_DEFAULTS = {
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
_PIL_RESAMPLE = {3: "bicubic", 2: "bilinear", 0: "nearest"}


# --- config.json ------------------------------------------------------------------------------


def _tower(data: Mapping[str, Any], name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    sub = data.get(f"{name}_config") or data.get(f"{name}_config_dict") or {}
    return {**defaults, **{k: v for k, v in sub.items() if v is not None}}


def _activation(value: str, tower: str) -> str:
    if value not in _ACTIVATIONS:
        raise ConfigError(
            f"config.json: {tower} hidden_act {value!r} is not supported "
            f"(one of {sorted(_ACTIVATIONS)})"
        )
    return _ACTIVATIONS[value]


def config_from_hf(data: Mapping[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from an HF ``CLIPModel`` ``config.json`` (as a dict)."""
    model_type = data.get("model_type", "clip")
    if model_type != "clip":
        raise ConfigError(f"config.json: model_type {model_type!r} is not a CLIP model")
    text = _tower(data, "text", _TEXT_DEFAULTS)
    vision = _tower(data, "vision", _VISION_DEFAULTS)
    text_act = _activation(text["hidden_act"], "text")
    vision_act = _activation(vision["hidden_act"], "vision")
    if text_act != vision_act:
        raise ConfigError(
            f"config.json: the towers use different activations ({vision_act} / {text_act}), "
            "which this package does not support"
        )
    for tower, cfg in (("text", text), ("vision", vision)):
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ConfigError(
                f"config.json: {tower} hidden_size {cfg['hidden_size']} is not divisible by "
                f"num_attention_heads {cfg['num_attention_heads']}"
            )
    if vision.get("num_channels", 3) != 3:
        raise ConfigError("config.json: only 3-channel images are supported")
    return ModelConfig(
        embed_dim=data.get("projection_dim", 512),
        image_resolution=vision["image_size"],
        vision_layers=vision["num_hidden_layers"],
        vision_width=vision["hidden_size"],
        vision_patch_size=vision["patch_size"],
        context_length=text["max_position_embeddings"],
        vocab_size=text["vocab_size"],
        text_width=text["hidden_size"],
        text_layers=text["num_hidden_layers"],
        vision_head_width=vision["hidden_size"] // vision["num_attention_heads"],
        text_head_width=text["hidden_size"] // text["num_attention_heads"],
        activation=text_act,
        vision_mlp_width=vision["intermediate_size"],
        text_mlp_width=text["intermediate_size"],
        vision_layer_norm_eps=float(vision["layer_norm_eps"]),
        text_layer_norm_eps=float(text["layer_norm_eps"]),
    )


def hf_config(config: ModelConfig, logit_scale: float | None = None) -> dict[str, Any]:
    """The ``config.json`` of a ``CLIPModel`` with ``config``'s architecture."""
    common = {"hidden_act": config.activation, "attention_dropout": 0.0, "dropout": 0.0}
    out: dict[str, Any] = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": 2.6592 if logit_scale is None else logit_scale,
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_size": config.text_width,
            "intermediate_size": config.text_mlp_width,
            "num_hidden_layers": config.text_layers,
            "num_attention_heads": config.text_heads,
            "max_position_embeddings": config.context_length,
            "vocab_size": config.vocab_size,
            "layer_norm_eps": config.text_layer_norm_eps,
            "projection_dim": config.embed_dim,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
            **common,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": config.vision_width,
            "intermediate_size": config.vision_mlp_width,
            "num_hidden_layers": config.vision_layers,
            "num_attention_heads": config.vision_heads,
            "image_size": config.image_resolution,
            "patch_size": config.vision_patch_size,
            "num_channels": 3,
            "layer_norm_eps": config.vision_layer_norm_eps,
            "projection_dim": config.embed_dim,
            **common,
        },
    }
    return out


# --- preprocessor_config.json -------------------------------------------------------------------


def _square(value: Any, what: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if value.get("height") == value.get("width") and value.get("height"):
            return int(value["height"])
    raise ConfigError(f"{PREPROCESSOR_FILE}: unsupported {what} {value!r}")


def preprocess_from_hf(data: Mapping[str, Any], resolution: int) -> PreprocessConfig:
    """A :class:`PreprocessConfig` from an HF ``CLIPImageProcessor`` config.

    HF centre-crops at ``floor((size - crop) / 2)``; the reference rounds.
    """
    for flag in ("do_resize", "do_center_crop", "do_rescale"):
        if data.get(flag, True) is False:
            raise ConfigError(f"{PREPROCESSOR_FILE}: {flag}=false is not supported")
    if abs(float(data.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise ConfigError(f"{PREPROCESSOR_FILE}: only rescale_factor 1/255 is supported")
    resample = data.get("resample", 3)
    if resample not in _PIL_RESAMPLE:
        raise ConfigError(f"{PREPROCESSOR_FILE}: unsupported resample {resample!r}")
    normalize = data.get("do_normalize", True)
    return PreprocessConfig(
        resize=_square(data.get("size", resolution), "size"),
        crop=_square(data.get("crop_size", resolution), "crop_size"),
        interpolation=_PIL_RESAMPLE[resample],
        crop_rounding="floor",
        mean=tuple(data.get("image_mean", CLIP_MEAN)) if normalize else (0.0, 0.0, 0.0),
        std=tuple(data.get("image_std", CLIP_STD)) if normalize else (1.0, 1.0, 1.0),
    )


def hf_preprocessor_config(pre: PreprocessConfig) -> dict[str, Any]:
    """A ``CLIPImageProcessor`` config for ``pre`` (HF always floors the crop offsets)."""
    resample = {v: k for k, v in _PIL_RESAMPLE.items()}[pre.interpolation]
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": pre.resize},
        "resample": resample,
        "do_center_crop": True,
        "crop_size": {"height": pre.crop, "width": pre.crop},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
        "do_convert_rgb": True,
    }


# --- key mapping -------------------------------------------------------------------------------

# (OpenAI-layout name inside a residual block, HF name inside an encoder layer)
_BLOCK = (
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("ln_1.weight", "layer_norm1.weight"),
    ("ln_1.bias", "layer_norm1.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
    ("ln_2.weight", "layer_norm2.weight"),
    ("ln_2.bias", "layer_norm2.bias"),
)
_TOP = (
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("ln_final.weight", "text_model.final_layer_norm.weight"),
    ("ln_final.bias", "text_model.final_layer_norm.bias"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
    ("logit_scale", "logit_scale"),
)
_TOWERS = (
    ("transformer.resblocks", "text_model.encoder.layers"),
    ("visual.transformer.resblocks", "vision_model.encoder.layers"),
)
_TRANSPOSED = (
    ("text_projection", "text_projection.weight"),
    ("visual.proj", "visual_projection.weight"),
)
_TEXT_POSITIONS = "text_model.embeddings.position_embedding.weight"


def _layers(state: Mapping[str, torch.Tensor], prefix: str, suffix: str) -> int:
    return sum(1 for k in state if k.startswith(prefix + ".") and k.endswith(suffix))


def hf_to_openai(state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> dict:
    """Map an HF ``CLIPModel`` state dict to the OpenAI/LongCLIP key layout.

    Raises:
        ConfigError: keys that are not a ``CLIPModel``'s, or missing ones.
    """
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ConfigError(f"{source}: not an HF CLIPModel state dict (missing {key!r})")
        used.add(key)
        return state[key]

    for ours, theirs in _TOP:
        out[ours] = take(theirs)
    for ours, theirs in _TRANSPOSED:
        out[ours] = take(theirs).t().contiguous()
    table = take(_TEXT_POSITIONS)
    out["positional_embedding"] = table
    if table.shape[0] > 77:
        out["positional_embedding_res"] = table.clone()
    for ours, theirs in _TOWERS:
        for i in range(_layers(state, theirs, ".self_attn.q_proj.weight")):
            src, dst = f"{theirs}.{i}", f"{ours}.{i}"
            for part in ("weight", "bias"):
                out[f"{dst}.attn.in_proj_{part}"] = torch.cat(
                    [take(f"{src}.self_attn.{p}_proj.{part}") for p in "qkv"]
                )
            for a, b in _BLOCK:
                out[f"{dst}.{a}"] = take(f"{src}.{b}")
    extra = sorted(set(state) - used)
    if extra:
        raise ConfigError(
            f"{source}: tensors that are not part of a CLIPModel: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}"
        )
    return out


def openai_to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict:
    """Map an OpenAI/LongCLIP-layout state dict to an HF ``CLIPModel`` one."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP:
        out[theirs] = state[ours]
    for ours, theirs in _TRANSPOSED:
        out[theirs] = state[ours].t().contiguous()
    table = state["positional_embedding"]
    if config.is_long:
        res = state["positional_embedding_res"]
        table = torch.cat([table[:KEPT_POSITIONS], res[KEPT_POSITIONS:]])
    out[_TEXT_POSITIONS] = table
    towers = (
        (_TOWERS[0], config.text_layers, config.text_width),
        (_TOWERS[1], config.vision_layers, config.vision_width),
    )
    for (ours, theirs), layers, width in towers:
        for i in range(layers):
            src, dst = f"{ours}.{i}", f"{theirs}.{i}"
            for part in ("weight", "bias"):
                q, k, v = state[f"{src}.attn.in_proj_{part}"].split(width)
                for name, t in zip("qkv", (q, k, v), strict=True):
                    out[f"{dst}.self_attn.{name}_proj.{part}"] = t.contiguous()
            for a, b in _BLOCK:
                out[f"{dst}.{b}"] = state[f"{src}.{a}"]
    return out


# --- folders ----------------------------------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of a ``save_pretrained`` folder (shards in index order)."""
    for index_name in SHARD_INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{index}: not a readable shard index ({exc})") from exc
            names = list(dict.fromkeys(weight_map.values()))
            if any("/" in n or "\\" in n or n.startswith(".") for n in names):
                raise ConfigError(f"{index}: shard names must be plain file names")
            return [folder / n for n in names]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise ConfigError(
        f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)} next to "
        f"{CONFIG_FILE})"
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def write_folder(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    config: ModelConfig,
    preprocess: PreprocessConfig,
) -> Path:
    """Write an OpenAI-layout model as a ``save_pretrained``-style folder (safetensors)."""
    from specs_metric.models.weights.checkpoint import save_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    hf_state = openai_to_hf(state, config)
    save_state_dict(hf_state, folder / WEIGHT_FILES[0], metadata={"format": "pt"})
    logit_scale = float(state["logit_scale"]) if "logit_scale" in state else None
    (folder / CONFIG_FILE).write_text(
        json.dumps(hf_config(config, logit_scale), indent=2) + "\n", encoding="utf-8"
    )
    (folder / PREPROCESSOR_FILE).write_text(
        json.dumps(hf_preprocessor_config(preprocess), indent=2) + "\n", encoding="utf-8"
    )
    return folder

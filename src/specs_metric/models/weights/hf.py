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
from specs_metric.limits import MAX_CONTEXT, MAX_IMAGE_SIZE, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH
from specs_metric.models.config import ModelConfig
from specs_metric.models.weights.limits import layer_count
from specs_metric.models.weights.validation import (
    Where,
    preprocess_config,
    read_json_file,
    require_bool,
    require_float,
    require_int,
    require_numbers,
    require_object,
    require_str,
    show,
)
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


def _tower(data: Mapping[str, Any], name: str, where: Where) -> tuple[dict[str, Any], Where]:
    """A tower's config (``<name>_config``, or the older ``<name>_config_dict``), checked to
    be an object, and where it sits in the file."""
    key = f"{name}_config"
    if data.get(key) in (None, {}) and data.get(f"{key}_dict") is not None:
        key = f"{key}_dict"
    sub = require_object(data, key, where, default={})
    return {k: v for k, v in sub.items() if v is not None}, where / key


def _tower_sizes(
    sub: Mapping[str, Any], where: Where, defaults: Mapping[str, Any], own: Mapping[str, int]
) -> dict[str, Any]:
    """The fields of a tower this package reads, each checked for type and range (missing
    ones get transformers' defaults); ``own`` maps the tower's own fields to their maxima."""

    def size(key: str, high: int = MAX_WIDTH) -> int:
        return require_int(sub, key, where, high=high, default=defaults[key])

    out = {
        "hidden_size": size("hidden_size"),
        "intermediate_size": size("intermediate_size"),
        "num_hidden_layers": size("num_hidden_layers", MAX_LAYERS),
        "num_attention_heads": size("num_attention_heads"),
        "hidden_act": require_str(sub, "hidden_act", where, choices=_ACTIVATIONS,
                                  default=defaults["hidden_act"]),
        "layer_norm_eps": require_float(sub, "layer_norm_eps", where, low=0.0, high=1.0,
                                        low_open=True, default=defaults["layer_norm_eps"]),
        **{key: size(key, high) for key, high in own.items()},
    }  # fmt: skip
    if out["hidden_size"] % out["num_attention_heads"]:
        raise where.error(
            "hidden_size",
            f"{out['hidden_size']} is not divisible by num_attention_heads "
            f"{out['num_attention_heads']}",
        )
    return out


def config_from_hf(data: Mapping[str, Any], where: str = CONFIG_FILE) -> ModelConfig:
    """A :class:`ModelConfig` from an HF ``CLIPModel`` ``config.json`` (as a dict).

    Every field read is checked for type and range first (``where`` names the file in
    messages).

    Raises:
        ConfigError: a field of the wrong type, out of range or unsupported.
    """
    top = Where(str(where))
    model_type = require_str(data, "model_type", top, default="clip")
    if model_type != "clip":
        raise top.error("model_type", f"{model_type!r} is not a CLIP model")
    text_sub, text_at = _tower(data, "text", top)
    vision_sub, vision_at = _tower(data, "vision", top)
    text = _tower_sizes(
        text_sub, text_at, _TEXT_DEFAULTS,
        {"max_position_embeddings": MAX_CONTEXT, "vocab_size": MAX_VOCAB},
    )  # fmt: skip
    vision = _tower_sizes(
        vision_sub, vision_at, _VISION_DEFAULTS,
        {"image_size": MAX_IMAGE_SIZE, "patch_size": MAX_IMAGE_SIZE},
    )  # fmt: skip
    text_act, vision_act = _ACTIVATIONS[text["hidden_act"]], _ACTIVATIONS[vision["hidden_act"]]
    if text_act != vision_act:
        raise ConfigError(
            f"{where}: the towers use different activations ({vision_act} / {text_act}), "
            "which this package does not support"
        )
    if require_int(vision_sub, "num_channels", vision_at, high=1 << 10, default=3) != 3:
        raise vision_at.error("num_channels", "must be 3: only RGB images are supported")
    return ModelConfig(
        embed_dim=require_int(data, "projection_dim", top, default=512),
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
        vision_layer_norm_eps=vision["layer_norm_eps"],
        text_layer_norm_eps=text["layer_norm_eps"],
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


def _square(data: Mapping[str, Any], key: str, where: Where, default: int) -> int:
    """An image size: an integer, ``{"shortest_edge": n}`` or ``{"height": n, "width": n}``."""
    value = data.get(key)
    if not isinstance(value, Mapping):
        return require_int(data, key, where, high=MAX_IMAGE_SIZE, default=default)
    at = where / key
    if "shortest_edge" in value:
        return require_int(value, "shortest_edge", at, high=MAX_IMAGE_SIZE)
    if "height" in value or "width" in value:
        height = require_int(value, "height", at, high=MAX_IMAGE_SIZE)
        if require_int(value, "width", at, high=MAX_IMAGE_SIZE) == height:
            return height
    raise where.error(key, f"{show(value)} is not supported (only square sizes)")


def preprocess_from_hf(
    data: Mapping[str, Any], resolution: int, where: str = PREPROCESSOR_FILE
) -> PreprocessConfig:
    """A :class:`PreprocessConfig` from an HF ``CLIPImageProcessor`` config.

    HF centre-crops at ``floor((size - crop) / 2)``; the reference rounds. Every field read is
    checked for type and range first (``where`` names the file in messages).

    Raises:
        ConfigError: a field of the wrong type, out of range or unsupported.
    """
    at = Where(str(where))
    for flag in ("do_resize", "do_center_crop", "do_rescale"):
        if not require_bool(data, flag, at, default=True):
            raise at.error(flag, "= false is not supported")
    rescale = require_float(data, "rescale_factor", at, low=0.0, high=1.0, default=1 / 255)
    if abs(rescale - 1 / 255) > 1e-12:
        raise at.error("rescale_factor", "must be 1/255 (the only one supported)")
    resample = require_int(data, "resample", at, low=0, high=5, default=3)
    if resample not in _PIL_RESAMPLE:
        raise at.error("resample", f"{resample} is not supported (one of {sorted(_PIL_RESAMPLE)})")
    normalize = require_bool(data, "do_normalize", at, default=True)
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if normalize:
        mean = require_numbers(data, "image_mean", at, length=3, low=-1e3, high=1e3,
                               default=CLIP_MEAN)
        std = require_numbers(data, "image_std", at, length=3, low=0.0, high=1e3,
                              low_open=True, default=CLIP_STD)
    return preprocess_config(
        at,
        resize=_square(data, "size", at, resolution),
        crop=_square(data, "crop_size", at, resolution),
        interpolation=_PIL_RESAMPLE[resample],
        crop_rounding="floor",
        mean=mean,
        std=std,
    )  # fmt: skip


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
        try:
            layers = layer_count(state, theirs)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        for i in range(layers):
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


def _shard_names(index: Path) -> list[str]:
    """The shard files a ``*.index.json`` names, in order: its ``weight_map`` must map tensor
    names to plain file names inside the folder."""
    weight_map = require_object(read_json_file(index, "shard index"), "weight_map", index)
    names: list[str] = []
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise ConfigError(f"{index}: weight_map[{show(key)}] must be a file name, not "
                              f"{show(name)}")
        if (
            not name
            or name.startswith(".")  # also "..", and hidden files
            or any(c in name for c in "/\\\0:")
            or Path(name).is_absolute()
        ):
            raise ConfigError(f"{index}: weight_map[{show(key)}] is {show(name)}; shard names "
                              "must be plain file names in the folder")
        names.append(name)
    return list(dict.fromkeys(names))


def weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of a ``save_pretrained`` folder (shards in index order).

    Raises:
        ConfigError: a shard index that is malformed, names a file outside the folder or one
            that is not there, or a folder without weights.
    """
    for index_name in SHARD_INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            names = _shard_names(index)
            if not names:
                raise ConfigError(f"{index}: weight_map names no shard files")
            for name in names:
                if not (folder / name).is_file():
                    raise ConfigError(f"{index}: weight_map names {name!r}, which is not a "
                                      f"file in {folder}")
            return [folder / n for n in names]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise ConfigError(
        f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)} next to "
        f"{CONFIG_FILE})"
    )


def read_json(path: Path) -> dict[str, Any]:
    """A model description file as a JSON object, read bounded
    (:func:`specs_metric.models.weights.validation.read_json_file`)."""
    return read_json_file(path, "JSON file")


def write_folder(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    config: ModelConfig,
    preprocess: PreprocessConfig,
) -> Path:
    """Write an OpenAI-layout model as a ``save_pretrained``-style folder (safetensors)."""
    from specs_metric.io.writing import write_text
    from specs_metric.models.weights.checkpoint import save_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    hf_state = openai_to_hf(state, config)
    save_state_dict(hf_state, folder / WEIGHT_FILES[0], metadata={"format": "pt"})
    logit_scale = float(state["logit_scale"]) if "logit_scale" in state else None
    write_text(folder / CONFIG_FILE, json.dumps(hf_config(config, logit_scale), indent=2) + "\n")
    write_text(
        folder / PREPROCESSOR_FILE,
        json.dumps(hf_preprocessor_config(preprocess), indent=2) + "\n",
    )
    return folder

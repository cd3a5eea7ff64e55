"""Model configurations as data.

:class:`ModelConfig` describes a CLIP-family ViT model completely: sizes, head widths,
activation, LayerNorm epsilon and the layout of the text positions. Most of it can be read
from tensor shapes (:func:`config_from_state_dict`); the activation and the head width
cannot. For an OpenAI-layout state dict those follow the OpenAI/LongCLIP convention
(QuickGELU, 64-wide heads) unless an architecture says otherwise: a name from
:data:`specs_metric.models.archs.ARCHS` (``--arch ViT-H-14``) or a JSON file (ours, an open_clip
model config or an HF ``config.json``), read by :mod:`specs_metric.models.archs`. Whatever an
architecture states that the tensors can check is checked: a contradiction is an error,
never a guess.

The image pipeline is described by
:class:`~specs_metric.processing.preprocess.PreprocessConfig`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from specs_metric.errors import ConfigError
from specs_metric.processing.preprocess import PreprocessConfig

ACTIVATIONS = ("quick_gelu", "gelu")
POSITIONAL_LAYOUTS = ("split", "plain")
OPENAI_HEAD_WIDTH = 64
# Vision/text widths that no OpenAI or LongCLIP model has but open_clip's large towers do
# (ViT-H/14, ViT-g/14, ViT-bigG/14). Their head width and activation are not the OpenAI
# convention, so without an architecture such a file is refused rather than misread.
OPEN_CLIP_ONLY_WIDTHS = {"vision_width": (1280, 1408, 1664), "text_width": (1024, 1280)}



@dataclass(frozen=True)
class ModelConfig:
    """Sizes and numerics of a CLIP / LongCLIP ViT model.

    ``positional`` is ``"split"`` for LongCLIP's two tables (rows < 20 from
    ``positional_embedding``, the rest from ``positional_embedding_res``) and ``"plain"`` for
    one table; by default split for more than 77 positions. MLP widths default to 4x.
    """

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int
    vision_head_width: int = OPENAI_HEAD_WIDTH
    text_head_width: int = OPENAI_HEAD_WIDTH
    activation: str = "quick_gelu"
    vision_mlp_width: int = 0  # 0: 4 x vision_width
    text_mlp_width: int = 0  # 0: 4 x text_width
    vision_layer_norm_eps: float = 1e-5
    text_layer_norm_eps: float = 1e-5
    positional: str = ""  # "": split above 77 positions, else plain

    def __post_init__(self) -> None:
        if not self.positional:
            object.__setattr__(self, "positional", "split" if self.context_length > 77 else "plain")
        if not self.vision_mlp_width:
            object.__setattr__(self, "vision_mlp_width", 4 * self.vision_width)
        if not self.text_mlp_width:
            object.__setattr__(self, "text_mlp_width", 4 * self.text_width)
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"activation {self.activation!r} is not supported (one of {ACTIVATIONS})"
            )
        if self.positional not in POSITIONAL_LAYOUTS:
            raise ConfigError(f"positional layout must be one of {POSITIONAL_LAYOUTS}")
        for tower in ("vision", "text"):
            width, head = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_head_width")
            if head <= 0 or width % head:
                raise ConfigError(
                    f"{tower} width {width} is not a multiple of the head width {head}"
                )

    @property
    def vision_heads(self) -> int:
        return self.vision_width // self.vision_head_width

    @property
    def text_heads(self) -> int:
        return self.text_width // self.text_head_width

    @property
    def is_long(self) -> bool:
        """True for LongCLIP's split positional tables (``positional_embedding_res``)."""
        return self.positional == "split"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Fields the tensors determine, and those only a description can give.
SHAPE_FIELDS = (
    "embed_dim",
    "image_resolution",
    "vision_layers",
    "vision_width",
    "vision_patch_size",
    "context_length",
    "vocab_size",
    "text_width",
    "text_layers",
    "vision_mlp_width",
    "text_mlp_width",
    "positional",
)
DESCRIBED_FIELDS = (
    "vision_head_width",
    "text_head_width",
    "activation",
    "vision_layer_norm_eps",
    "text_layer_norm_eps",
)


# --- inference from tensors -----------------------------------------------------------------


# Dimensions of the tensors the sizes are read from (a 1-d text_projection must be an error,
# not an IndexError).
_SHAPE_KEYS = {
    "visual.conv1.weight": 4,
    "visual.positional_embedding": 2,
    "visual.proj": 2,
    "text_projection": 2,
    "token_embedding.weight": 2,
    "positional_embedding": 2,
    "ln_final.weight": 1,
}


def shapes_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The :data:`SHAPE_FIELDS` of an OpenAI-layout state dict.

    Raises:
        ValueError: ResNet image towers, missing keys, a non-square patch grid.
    """
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in state_dict):
        raise ValueError(
            "this is a ResNet-tower CLIP checkpoint (keys 'visual.layer1.*', "
            "'visual.attnpool.*'); only ViT image towers are supported"
        )
    missing = [k for k in _SHAPE_KEYS if k not in state_dict]
    if missing:
        raise ValueError(f"not a CLIP/LongCLIP ViT state dict: missing keys {missing}")
    for key, dims in _SHAPE_KEYS.items():
        if state_dict[key].dim() != dims:
            raise ValueError(
                f"{key} has shape {tuple(state_dict[key].shape)}; expected {dims} dimensions"
            )
    from specs_metric.models.weights.limits import layer_count

    conv = state_dict["visual.conv1.weight"]
    patch = conv.shape[-1]
    rows = state_dict["visual.positional_embedding"].shape[0]
    grid = math.isqrt(max(rows - 1, 0))
    if grid * grid + 1 != rows:
        raise ValueError("visual.positional_embedding does not hold a square grid plus a class row")

    def mlp(prefix: str, width: int) -> int:
        weight = state_dict.get(f"{prefix}resblocks.0.mlp.c_fc.weight")
        return weight.shape[0] if weight is not None and weight.dim() else 4 * width

    vision_width, text_width = conv.shape[0], state_dict["ln_final.weight"].shape[0]
    return {
        "embed_dim": state_dict["text_projection"].shape[1],
        "image_resolution": patch * grid,
        "vision_layers": layer_count(state_dict, "visual.transformer.resblocks"),
        "vision_width": vision_width,
        "vision_patch_size": patch,
        "context_length": state_dict["positional_embedding"].shape[0],
        "vocab_size": state_dict["token_embedding.weight"].shape[0],
        "text_width": text_width,
        "text_layers": layer_count(state_dict, "transformer.resblocks"),
        "vision_mlp_width": mlp("visual.transformer.", vision_width),
        "text_mlp_width": mlp("transformer.", text_width),
        "positional": "split" if "positional_embedding_res" in state_dict else "plain",
    }


def config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    pins: Mapping[str, Any] | None = None,
    *,
    source: str = "the checkpoint",
    pinned_by: str = "the architecture",
) -> ModelConfig:
    """The architecture of an OpenAI-layout state dict.

    Shapes come from the tensors; activation, head widths and LayerNorm epsilon from
    ``pins`` (default: the OpenAI/LongCLIP convention). Every pinned value the tensors can
    check must agree with them.

    Raises:
        ValueError: unsupported layout or missing keys.
        ConfigError: ``pins`` contradict the tensors, or a shape that only open_clip's large
            towers have with no architecture given.
    """
    shapes = shapes_from_state_dict(state_dict)
    pins = dict(pins or {})
    wrong = [
        f"{k}: {pinned_by} says {pins[k]}, the weights have {shapes[k]}"
        for k in SHAPE_FIELDS
        if k in pins and pins[k] != shapes[k]
    ]
    if wrong:
        raise ConfigError(f"{source}: the weights contradict {pinned_by}: " + "; ".join(wrong))
    if not pins:
        for key, widths in OPEN_CLIP_ONLY_WIDTHS.items():
            if shapes[key] in widths:
                raise ConfigError(
                    f"{source}: {key.replace('_', ' ')} {shapes[key]} is an open_clip "
                    "architecture (ViT-H/g/bigG) whose head width and activation the file "
                    "does not record; pass --arch (e.g. ViT-H-14, see `specs models --archs`)"
                )
    described = {k: pins[k] for k in DESCRIBED_FIELDS if k in pins}
    unknown = sorted(set(pins) - set(SHAPE_FIELDS) - set(DESCRIBED_FIELDS))
    if unknown:
        raise ConfigError(f"{pinned_by}: unknown fields {unknown}")
    try:
        config = ModelConfig(**shapes, **described)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc} ({pinned_by})") from exc
    _check_consistency(config, state_dict)
    return config


def _check_consistency(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse sizes the model cannot run with, naming the tensor they come from.

    Shapes that merely disagree with the inferred config are caught when the weights are
    loaded; these are the ones that would load and then fail (or index out of range) later.
    """
    from specs_metric.processing.tokenizer import VOCAB_SIZE

    if config.vocab_size != VOCAB_SIZE:
        raise ValueError(
            f"token_embedding.weight has {config.vocab_size} rows, but the CLIP BPE "
            f"tokenizer has {VOCAB_SIZE} ids: this checkpoint uses another vocabulary"
        )
    sizes = {
        "text_projection (embedding size)": config.embed_dim,
        "visual.conv1.weight (vision width)": config.vision_width,
        "visual.conv1.weight (patch size)": config.vision_patch_size,
        "visual.positional_embedding (patch grid)": config.image_resolution,
        "ln_final.weight (text width)": config.text_width,
        "visual.transformer.resblocks (layers)": config.vision_layers,
        "transformer.resblocks (layers)": config.text_layers,
    }
    for what, size in sizes.items():
        if size < 1:
            raise ValueError(f"{what} is {size}; it must be at least 1")
    conv = state_dict["visual.conv1.weight"]
    if conv.dim() != 4 or conv.shape[2] != conv.shape[3]:
        raise ValueError(
            f"visual.conv1.weight has shape {tuple(conv.shape)}; expected (width, 3, p, p)"
        )
    positions = state_dict["positional_embedding"]
    if positions.dim() != 2 or positions.shape[1] != config.text_width:
        raise ValueError(
            f"positional_embedding has shape {tuple(positions.shape)}; expected "
            f"(context, {config.text_width})"
        )
    if config.context_length < 2:
        raise ValueError(
            f"positional_embedding has {config.context_length} rows; a caption needs at "
            "least 2 (start and end tokens)"
        )
    res = state_dict.get("positional_embedding_res")
    if res is not None and tuple(res.shape) != tuple(positions.shape):
        raise ValueError(
            f"positional_embedding_res has shape {tuple(res.shape)} but positional_embedding "
            f"has {tuple(positions.shape)}; the two tables must match"
        )
    for key, value in state_dict.items():
        if not (value.is_floating_point() and not value.is_complex()):
            raise ValueError(f"{key} holds {value.dtype} values; model weights must be floats")


def check_against(config: ModelConfig, pins: Mapping[str, Any], *, source: str, by: str) -> None:
    """Raise :class:`ConfigError` if ``pins`` disagree with a complete ``config``."""
    wrong = [
        f"{k}: {by} says {v}, {source} has {getattr(config, k)}"
        for k, v in pins.items()
        if getattr(config, k) != v
    ]
    if wrong:
        raise ConfigError(f"{source} contradicts {by}: " + "; ".join(wrong))


# Metadata keys of safetensors files written by this package.
CONFIG_METADATA_KEY = "specs_model_config"
PREPROCESS_METADATA_KEY = "specs_preprocess"


def config_metadata(
    config: ModelConfig, preprocess: PreprocessConfig | None = None
) -> dict[str, str]:
    """safetensors metadata recording a model's config (and preprocessing)."""
    out = {CONFIG_METADATA_KEY: json.dumps(config.to_dict(), sort_keys=True)}
    if preprocess is not None:
        out[PREPROCESS_METADATA_KEY] = json.dumps(preprocess.to_dict(), sort_keys=True)
    return out


def check_preprocess_size(pre: PreprocessConfig, config: ModelConfig) -> PreprocessConfig:
    """Check a preprocessing crop against the model's input size."""
    if pre.crop != config.image_resolution:
        raise ConfigError(
            f"preprocessing crops {pre.crop} px but the model takes {config.image_resolution}"
        )
    return pre

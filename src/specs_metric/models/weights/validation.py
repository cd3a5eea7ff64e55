"""One validator for the files that describe a model, applied before anything is built.

Model files are untrusted. Every value the loader takes from a description (an HF
``config.json`` or ``preprocessor_config.json``, a shard index, an ``open_clip_config.json``,
an ``--arch`` file, the config our safetensors files record in their metadata) goes through
the typed readers here (:func:`require_int`, :func:`require_float`, :func:`require_str`,
:func:`require_bool`, :func:`require_object`, :func:`require_numbers`): the right JSON type,
within range, or a one-line :class:`~specs_metric.errors.ConfigError` naming the file and the
field. JSON files are read bounded (:func:`read_json_file`: size and nesting depth, see
:mod:`specs_metric.models.weights.limits`).

What the tensors imply is checked before a model is constructed: layer indices must run
0..L-1 with L bounded (:func:`layer_count`), and the parameters a config implies must be
supplied by the file's tensors and stay under the absolute cap (:func:`check_model_size`), so
a small file cannot make the loader build a large model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from specs_metric.errors import CheckpointError, ConfigError
from specs_metric.io.reading import open_regular, parse_json
from specs_metric.limits import (
    MAX_CONTEXT,
    MAX_IMAGE_SIZE,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_LAYERS,
    MAX_RESIZE_RATIO,
    MAX_VOCAB,
    MAX_WIDTH,
)
from specs_metric.models.config import ACTIVATIONS, POSITIONAL_LAYOUTS, ModelConfig
from specs_metric.models.weights.limits import max_checkpoint_bytes
from specs_metric.processing.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    CROP_ROUNDINGS,
    INTERPOLATIONS,
    PreprocessConfig,
)

_REQUIRED: Any = object()


@dataclass(frozen=True)
class Where:
    """A JSON object being read: its file, and its dotted path inside the file (messages
    name both)."""

    file: str
    path: str = ""

    def __truediv__(self, key: str) -> Where:
        return Where(self.file, self.field(key))

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, problem: str) -> ConfigError:
        """The error for field ``key`` of this object."""
        return ConfigError(f"{self.file}: {self.field(key)} {problem}")


def _where(where: Where | str | Path) -> Where:
    return where if isinstance(where, Where) else Where(str(where))


def show(value: Any) -> str:
    """A value for a message, cut short (a hostile file may hold long ones)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(obj: Mapping[str, Any], key: str, where: Where, default: Any) -> Any:
    # null counts as absent, as transformers reads it.
    value = obj.get(key)
    if value is None and default is _REQUIRED:
        raise where.error(key, "is required")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # a JSON integer with hundreds of digits
        return None
    return number if math.isfinite(number) else None


def require_int(
    obj: Mapping[str, Any],
    key: str,
    where: Where | str,
    *,
    low: int = 1,
    high: int = MAX_WIDTH,
    default: Any = _REQUIRED,
) -> int:
    """``obj[key]`` as an integer in ``[low, high]`` (``default`` when absent or null)."""
    where = _where(where)
    value = _get(obj, key, where, default)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise where.error(key, f"must be an integer from {low} to {high}, not {show(value)}")
    return value


def _range_text(low: float, high: float, low_open: bool) -> str:
    return f"{'>' if low_open else '>='} {low:g} and <= {high:g}"


def require_float(
    obj: Mapping[str, Any],
    key: str,
    where: Where | str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    default: Any = _REQUIRED,
) -> float:
    """``obj[key]`` as a finite number in ``[low, high]`` (``(low, high]`` with
    ``low_open``)."""
    where = _where(where)
    value = _get(obj, key, where, default)
    if value is None:
        return default
    number = _finite(value)
    if number is None or not (low < number if low_open else low <= number) or number > high:
        raise where.error(
            key, f"must be a number {_range_text(low, high, low_open)}, not {show(value)}"
        )
    return number


def require_str(
    obj: Mapping[str, Any],
    key: str,
    where: Where | str,
    *,
    choices: Iterable[str] | None = None,
    default: Any = _REQUIRED,
) -> str:
    """``obj[key]`` as a string, one of ``choices`` when given."""
    where = _where(where)
    value = _get(obj, key, where, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise where.error(key, f"must be a string, not {show(value)}")
    if choices is not None and value not in (options := tuple(choices)):
        raise where.error(key, f"{show(value)} is not supported (one of {list(options)})")
    return value


def require_bool(
    obj: Mapping[str, Any], key: str, where: Where | str, *, default: Any = _REQUIRED
) -> bool:
    """``obj[key]`` as ``true`` or ``false`` (a string "false" is not false)."""
    where = _where(where)
    value = _get(obj, key, where, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise where.error(key, f"must be true or false, not {show(value)}")
    return value


def require_object(
    obj: Mapping[str, Any], key: str, where: Where | str, *, default: Any = _REQUIRED
) -> dict[str, Any]:
    """``obj[key]`` as a JSON object (``default`` when absent or null)."""
    where = _where(where)
    value = _get(obj, key, where, default)
    if value is None:
        return dict(default)
    if not isinstance(value, dict):
        raise where.error(key, f"must be a JSON object, not {show(value)}")
    return value


def require_numbers(
    obj: Mapping[str, Any],
    key: str,
    where: Where | str,
    *,
    length: int,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    default: Any = _REQUIRED,
) -> tuple[float, ...]:
    """``obj[key]`` as a list of ``length`` finite numbers, each in range."""
    where = _where(where)
    value = _get(obj, key, where, default)
    if value is None:
        return tuple(default)
    numbers = [_finite(v) for v in value] if isinstance(value, list) else []
    if (
        len(numbers) != length
        or None in numbers
        or not all((low < v if low_open else low <= v) and v <= high for v in numbers)
    ):
        raise where.error(
            key,
            f"must be a list of {length} numbers {_range_text(low, high, low_open)}, "
            f"not {show(value)}",
        )
    return tuple(numbers)  # type: ignore[arg-type]


# --- JSON files ---------------------------------------------------------------------------


def read_json_file(path: str | Path, what: str = "JSON file") -> dict[str, Any]:
    """A JSON object from a model's description file, read bounded: at most
    :data:`~specs_metric.limits.MAX_JSON_BYTES` bytes and
    :data:`~specs_metric.limits.MAX_JSON_DEPTH` levels.

    Raises:
        ConfigError: unreadable, too large, too deep, not JSON or not an object.
    """
    path = Path(path)
    try:
        with open_regular(path, what=what, error=ConfigError) as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)  # never more, whatever the file claims
    except OSError as exc:
        raise ConfigError(f"{path}: not a readable {what} ({exc})") from exc
    if len(raw) > MAX_JSON_BYTES:
        raise ConfigError(f"{path}: over {MAX_JSON_BYTES} bytes; too large for a {what}")
    data = parse_json(raw, str(path), ConfigError, MAX_JSON_DEPTH)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} holds a JSON object, not {type(data).__name__}")
    return data


# --- model and preprocessing descriptions --------------------------------------------------

# The range of every ModelConfig field a description may state.
_INT_FIELDS = {
    "embed_dim": (1, MAX_WIDTH),
    "image_resolution": (1, MAX_IMAGE_SIZE),
    "vision_layers": (1, MAX_LAYERS),
    "vision_width": (1, MAX_WIDTH),
    "vision_patch_size": (1, MAX_IMAGE_SIZE),
    "context_length": (1, MAX_CONTEXT),
    "vocab_size": (1, MAX_VOCAB),
    "text_width": (1, MAX_WIDTH),
    "text_layers": (1, MAX_LAYERS),
    "vision_head_width": (1, MAX_WIDTH),
    "text_head_width": (1, MAX_WIDTH),
    "vision_mlp_width": (0, MAX_WIDTH),  # 0: 4 x width
    "text_mlp_width": (0, MAX_WIDTH),
}
_EPS_FIELDS = ("vision_layer_norm_eps", "text_layer_norm_eps")
_STR_FIELDS = {"activation": ACTIVATIONS, "positional": ("", *POSITIONAL_LAYOUTS)}
MODEL_FIELDS = (*_INT_FIELDS, *_EPS_FIELDS, *_STR_FIELDS)


def check_model_fields(data: Mapping[str, Any], where: Where | str) -> dict[str, Any]:
    """Check a flat :class:`ModelConfig` description (an ``--arch`` file, our safetensors
    metadata): known fields only, each of its type and in range. Returns the fields given."""
    where = _where(where)
    unknown = sorted(set(data) - set(MODEL_FIELDS))
    if unknown:
        raise ConfigError(f"{where.file}: unknown model-config fields {unknown[:10]}")
    out: dict[str, Any] = {}
    for key in data:
        if key in _INT_FIELDS:
            low, high = _INT_FIELDS[key]
            out[key] = require_int(data, key, where, low=low, high=high)
        elif key in _EPS_FIELDS:
            out[key] = require_float(data, key, where, low=0.0, high=1.0, low_open=True)
        else:
            out[key] = require_str(data, key, where, choices=_STR_FIELDS[key])
    return out


def preprocess_config(where: Where | str, **values: Any) -> PreprocessConfig:
    """A :class:`PreprocessConfig` of checked values; what they contradict (a crop larger
    than the resize) is an error that names the file. The resize may be at most
    :data:`~specs_metric.limits.MAX_RESIZE_RATIO` times the crop: each image is
    resized before it is cropped, so a huge resize would allocate per image."""
    where = _where(where)
    inside = f"{where.path}: " if where.path else ""
    try:
        pre = PreprocessConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where.file}: {inside}{exc}") from exc
    if pre.resize > MAX_RESIZE_RATIO * pre.crop:
        raise ConfigError(
            f"{where.file}: {inside}resize {pre.resize} is more than {MAX_RESIZE_RATIO}x the "
            f"crop {pre.crop}"
        )
    return pre


def check_preprocess_fields(data: Mapping[str, Any], where: Where | str) -> PreprocessConfig:
    """A :class:`PreprocessConfig` from its flat description (our safetensors metadata)."""
    where = _where(where)
    known = {f.name for f in fields(PreprocessConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where.file}: unknown preprocessing fields {unknown[:10]}")
    return preprocess_config(
        where,
        resize=require_int(data, "resize", where, high=MAX_IMAGE_SIZE),
        crop=require_int(data, "crop", where, low=0, high=MAX_IMAGE_SIZE, default=0),
        interpolation=require_str(data, "interpolation", where, choices=INTERPOLATIONS,
                                  default="bicubic"),
        crop_rounding=require_str(data, "crop_rounding", where, choices=CROP_ROUNDINGS,
                                  default="round"),
        mean=require_numbers(data, "mean", where, length=3, default=CLIP_MEAN),
        std=require_numbers(data, "std", where, length=3, low=0.0, low_open=True,
                            default=CLIP_STD),
    )  # fmt: skip


# --- what the tensors imply ----------------------------------------------------------------

def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes :class:`~specs_metric.models.model.LongCLIP` has for
    ``config``, worked out from its sizes without building anything (the tests compare them
    with a built model's)."""
    out: dict[str, tuple[int, ...]] = {}

    def norm(prefix: str, width: int) -> None:
        out[f"{prefix}.weight"] = out[f"{prefix}.bias"] = (width,)

    def tower(prefix: str, width: int, mlp: int, layers: int) -> None:
        for i in range(layers):
            p = f"{prefix}.{i}"
            out[f"{p}.attn.in_proj_weight"] = (3 * width, width)
            out[f"{p}.attn.in_proj_bias"] = (3 * width,)
            out[f"{p}.attn.out_proj.weight"] = (width, width)
            out[f"{p}.attn.out_proj.bias"] = (width,)
            norm(f"{p}.ln_1", width)
            out[f"{p}.mlp.c_fc.weight"] = (mlp, width)
            out[f"{p}.mlp.c_fc.bias"] = (mlp,)
            out[f"{p}.mlp.c_proj.weight"] = (width, mlp)
            out[f"{p}.mlp.c_proj.bias"] = (width,)
            norm(f"{p}.ln_2", width)

    vw, tw, embed = config.vision_width, config.text_width, config.embed_dim
    patch = config.vision_patch_size
    grid = config.image_resolution // patch
    out["positional_embedding"] = (config.context_length, tw)
    if config.is_long:
        out["positional_embedding_res"] = (config.context_length, tw)
    out["text_projection"] = (tw, embed)
    out["logit_scale"] = ()
    out["visual.class_embedding"] = (vw,)
    out["visual.positional_embedding"] = (grid * grid + 1, vw)
    out["visual.proj"] = (vw, embed)
    out["visual.conv1.weight"] = (vw, 3, patch, patch)
    norm("visual.ln_pre", vw)
    tower("visual.transformer.resblocks", vw, config.vision_mlp_width, config.vision_layers)
    norm("visual.ln_post", vw)
    tower("transformer.resblocks", tw, config.text_mlp_width, config.text_layers)
    out["token_embedding.weight"] = (config.vocab_size, tw)
    norm("ln_final", tw)
    return out


def parameter_count(config: ModelConfig) -> int:
    """How many parameters (elements) :class:`~specs_metric.models.model.LongCLIP` has for
    ``config``."""
    return sum(math.prod(shape) for shape in expected_shapes(config).values())


def _mismatch(
    shapes: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor]
) -> list[str]:
    """What differs between the keys and shapes a model has and a state dict's."""
    missing = sorted(set(shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(shapes))
    wrong = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {shape}"
        for k, shape in shapes.items()
        if k in state_dict and tuple(state_dict[k].shape) != shape
    ]
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        parts.append(f"wrong shapes {wrong[:3]}")
    return parts


def check_model_size(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    *,
    exact: bool = False,
) -> None:
    """Refuse, before any module is built, a model the file's tensors cannot fill.

    Every parameter is loaded from the state dict, so a config that implies more elements
    than the tensors hold (thousands of extra layer keys with tiny tensors, say) would only
    allocate a model and then fail. Refused: more than
    :data:`~specs_metric.limits.MAX_LAYERS` layers, more parameters than the
    absolute cap allows (``SPECS_MAX_CHECKPOINT_BYTES``, counted as fp32), more parameters
    than the tensors hold, and with ``exact`` any key or shape that is not the model's.

    Raises:
        CheckpointError: naming ``source``.
    """
    described = (
        f"{config.vision_layers}+{config.text_layers} layers, widths "
        f"{config.vision_width}/{config.text_width}"
    )
    if max(config.vision_layers, config.text_layers) > MAX_LAYERS:
        raise CheckpointError(
            f"{source}: its architecture ({described}) is beyond the limit of {MAX_LAYERS} "
            "layers per tower"
        )
    shapes = expected_shapes(config)  # at most MAX_LAYERS blocks: a small table
    expected = sum(math.prod(shape) for shape in shapes.values())
    cap = max_checkpoint_bytes()
    if 4 * expected > cap:
        raise CheckpointError(
            f"{source}: its architecture ({described}) has {expected} parameters, "
            f"{4 * expected} bytes in fp32, over the limit of {cap} bytes "
            "(SPECS_MAX_CHECKPOINT_BYTES)"
        )
    if exact:
        parts = _mismatch(shapes, state_dict)
        if parts:
            raise CheckpointError(
                f"{source}: tensors do not match the inferred {config}: " + "; ".join(parts)
            )
        return
    present = sum(t.numel() for t in state_dict.values())
    if expected > present:
        raise CheckpointError(
            f"{source}: its architecture ({described}) has {expected} parameters, but the "
            f"file's tensors hold only {present} values; refusing to build it ("
            + "; ".join(_mismatch(shapes, state_dict))
            + ")"
        )

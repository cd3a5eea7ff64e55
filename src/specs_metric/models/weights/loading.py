"""One path from a model name, file or folder to weights, architecture and preprocessing.

:func:`read_checkpoint` resolves the name once, reads the weights once and hashes them once.
It accepts:

- registry names (``specs models``) and ``hf:org/repo[@revision]``;
- OpenAI / LongCLIP-layout files (``.pt``, TorchScript, ``.safetensors``): the architecture
  follows the OpenAI/LongCLIP convention unless the file records its own (safetensors
  written by this package keep the config in their metadata) or ``arch`` says otherwise;
- HF ``transformers`` ``CLIPModel`` folders (``save_pretrained`` or a hub snapshot), read as
  their ``config.json`` and ``preprocessor_config.json`` describe them;
- open_clip files (``open_clip_pytorch_model.bin``, ``open_clip_model.safetensors``) with
  their ``open_clip_config.json`` next to them, or with ``arch``; without either they are
  refused, since their activation and head width are not in the weights.

Every command that takes ``--model`` goes through here.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from specs_metric.errors import CheckpointError, ConfigError
from specs_metric.io.reading import parse_json
from specs_metric.limits import MAX_JSON_DEPTH
from specs_metric.models.archs import ARCHS, Arch, arch_from_json, read_arch
from specs_metric.models.config import (
    CONFIG_METADATA_KEY,
    PREPROCESS_METADATA_KEY,
    ModelConfig,
    check_against,
    check_preprocess_size,
    config_from_state_dict,
)
from specs_metric.models.weights.checkpoint import (
    CLIP_CONTEXT,
    LONG_CONTEXT,
    clip_to_longclip,
    read_state_dict,
)
from specs_metric.models.weights.limits import check_safetensors_header
from specs_metric.models.weights.pretrained import (
    REGISTRY,
    PretrainedModel,
    file_sha256,
    lookup,
    resolve,
)
from specs_metric.models.weights.validation import (
    Where,
    check_model_fields,
    check_model_size,
    check_preprocess_fields,
)
from specs_metric.processing.preprocess import PreprocessConfig

OPEN_CLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
OPEN_CLIP_CONFIG = "open_clip_config.json"


@dataclass(frozen=True)
class Checkpoint:
    """Weights in the OpenAI/LongCLIP layout, with what they need to run.

    Attributes:
        state_dict: flat tensors keyed like the reference state dict.
        config: the architecture (checked against the tensors' shapes).
        preprocess: the image preprocessing.
        name: the registry name, or the path that was given.
        path: the file (or folder) the weights were read from.
        sha256: sha256 of the weights file (of the shard hashes for sharded folders).
        layout: ``"openai"`` or ``"hf"``.
        stretched: a 77-position model stretched to 248 positions on loading.
    """

    state_dict: dict[str, torch.Tensor]
    config: ModelConfig
    preprocess: PreprocessConfig
    name: str
    path: Path
    sha256: str
    layout: str
    stretched: bool = False


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, from its checked header (nothing else of
    the file is read)."""
    if path.suffix != ".safetensors" or not path.is_file() or path.stat().st_size == 0:
        return {}  # read_state_dict reports missing and empty files
    return check_safetensors_header(path).get("__metadata__", {})


def _json_field(meta: dict[str, str], key: str, path: Path) -> dict[str, Any] | None:
    """A JSON object our files keep in one metadata string (nested no deeper than JSON
    configs allow)."""
    if key not in meta:
        return None
    value = parse_json(meta[key], f"{path}: __metadata__.{key}", CheckpointError, MAX_JSON_DEPTH)
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{path}: __metadata__.{key} must hold a JSON object, not {type(value).__name__}"
        )
    return value


def _read_hf_folder(folder: Path, source: str) -> tuple[dict, ModelConfig, PreprocessConfig]:
    from specs_metric.models.weights.hf import (
        CONFIG_FILE,
        PREPROCESSOR_FILE,
        config_from_hf,
        hf_to_openai,
        preprocess_from_hf,
        read_json,
        weight_files,
    )

    # The descriptions are checked before any weights are read (config.json's image size
    # is the model's: the weights are checked against it below).
    described = config_from_hf(read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE))
    pre_file = folder / PREPROCESSOR_FILE
    preprocess = (
        preprocess_from_hf(read_json(pre_file), described.image_resolution, str(pre_file))
        if pre_file.is_file()
        else PreprocessConfig.reference(described.image_resolution)
    )
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        state.update(read_state_dict(file))
    state = hf_to_openai(state, source=source)
    pins = {k: v for k, v in described.to_dict().items() if k != "positional"}
    config = config_from_state_dict(state, pins, source=source, pinned_by=f"{folder / CONFIG_FILE}")
    return state, config, preprocess


def _open_clip_arch(path: Path, arch: Arch | None) -> Arch | None:
    """The architecture of an open_clip file: ``arch``, or its open_clip_config.json."""
    if arch is not None or path.name not in OPEN_CLIP_FILES:
        return arch
    sidecar = path.parent / OPEN_CLIP_CONFIG
    if not sidecar.is_file():
        raise ConfigError(
            f"{path}: an open_clip checkpoint records neither its activation (GELU or "
            f"QuickGELU) nor its head width; keep its {OPEN_CLIP_CONFIG} next to it or pass "
            "--arch NAME (see `specs models --archs`)"
        )
    from specs_metric.models.weights.hf import read_json

    return arch_from_json(read_json(sidecar), str(sidecar))


def _hash(files: list[Path]) -> str:
    if len(files) == 1:
        return file_sha256(files[0])
    combined = hashlib.sha256()
    for file in files:
        combined.update(file_sha256(file).encode())
    return combined.hexdigest()


def _read_file(
    location: Path, source: str, entry: PretrainedModel | None, chosen: Arch | None
) -> tuple[dict[str, torch.Tensor], ModelConfig, PreprocessConfig]:
    """Weights, architecture and own preprocessing of a checkpoint file: the config recorded
    in its metadata (checked against ``chosen``), else the architecture ``chosen``, the
    open_clip config next to it or the registry entry's, else what the tensors say."""
    # Descriptions (recorded metadata, an open_clip sidecar) are checked before the tensors
    # are read.
    meta = _safetensors_metadata(location)
    recorded = _json_field(meta, CONFIG_METADATA_KEY, location)
    recorded_pre = _json_field(meta, PREPROCESS_METADATA_KEY, location)
    own_pre: PreprocessConfig | None = None
    if recorded_pre is not None:
        at = Where(str(location), f"__metadata__.{PREPROCESS_METADATA_KEY}")
        own_pre = check_preprocess_fields(recorded_pre, at)
    if recorded is not None:
        at = Where(str(location), f"__metadata__.{CONFIG_METADATA_KEY}")
        pins = {k: v for k, v in check_model_fields(recorded, at).items() if k != "positional"}
        state = read_state_dict(location)
        config = config_from_state_dict(state, pins, source=source, pinned_by="its recorded config")
        if chosen is not None:
            check_against(config, chosen.pins, source=source, by=f"--arch {chosen.name}")
    else:
        chosen = _open_clip_arch(location, chosen)
        if chosen is None and entry is not None:
            chosen = ARCHS[entry.arch]
        state = read_state_dict(location)
        config = config_from_state_dict(
            state,
            chosen.pins if chosen is not None else None,
            source=source,
            pinned_by=f"architecture {chosen.name}" if chosen else "the architecture",
        )
    if own_pre is None and chosen is not None:
        own_pre = chosen.preprocess
    return state, config, own_pre or PreprocessConfig.reference(config.image_resolution)


def read_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    arch: str | os.PathLike[str] | None = None,
    preprocess: str | os.PathLike[str] = "auto",
    longclip: bool = False,
) -> Checkpoint:
    """Read a model's weights, architecture and preprocessing (see the module docstring).

    Args:
        name_or_path: registry name, ``hf:org/repo[@rev]``, checkpoint file or HF folder.
        arch: architecture name (:data:`specs_metric.models.archs.ARCHS`) or JSON file. For an
            OpenAI-layout file it replaces the OpenAI convention; for a file or folder that
            describes itself it must agree with the description.
        preprocess: ``"auto"`` (the model's own: HF ``preprocessor_config.json``, recorded
            metadata, or the reference pipeline), ``"reference"``, or an HF
            ``preprocessor_config.json`` path.
        longclip: stretch a 77-position model to LongCLIP's 248 positions.

    Raises:
        CheckpointError: unreadable or unsupported weights, or weights that contradict the
            architecture.
        ModelNotAvailableError / FileNotFoundError: from resolving the name.
    """
    source = str(name_or_path)
    entry = lookup(source)
    location = resolve(source)
    chosen = read_arch(arch) if arch is not None else None
    try:
        if location.is_dir():
            from specs_metric.models.weights.hf import weight_files

            state, config, own_pre = _read_hf_folder(location, source)
            files, layout = weight_files(location), "hf"
            if chosen is not None:
                check_against(config, chosen.pins, source=source, by=f"--arch {chosen.name}")
        else:
            state, config, own_pre = _read_file(location, source, entry, chosen)
            files, layout = [location], "openai"
        # Before anything is built from the config: its tensors must be able to fill it.
        check_model_size(config, state, source)
        if entry is not None and layout == "hf" and entry.name in REGISTRY:
            known = ARCHS[entry.arch]
            check_against(config, known.pins, source=source, by=f"registry arch {known.name}")
        pre = _choose_preprocess(preprocess, own_pre, config)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    except ValueError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{source}: {exc}") from exc

    stretched = False
    if longclip and config.context_length == CLIP_CONTEXT and not config.is_long:
        state = clip_to_longclip(state)
        config = replace(config, context_length=LONG_CONTEXT, positional="split")
        stretched = True
    sha = entry.sha256 if entry is not None and entry.sha256 else _hash(files)
    return Checkpoint(
        state_dict=state,
        config=config,
        preprocess=pre,
        name=source if entry is not None else str(location),
        path=location,
        sha256=sha,
        layout=layout,
        stretched=stretched,
    )


def _choose_preprocess(
    choice: str | os.PathLike[str], own: PreprocessConfig, config: ModelConfig
) -> PreprocessConfig:
    if str(choice) == "auto":
        pre = own
    elif str(choice) == "reference":
        pre = PreprocessConfig.reference(config.image_resolution)
    else:
        from specs_metric.models.weights.hf import preprocess_from_hf, read_json

        path = Path(choice)
        if not path.is_file():
            raise ConfigError(
                f"--preprocess {choice!r}: expected auto, reference or a "
                "preprocessor_config.json file"
            )
        pre = preprocess_from_hf(read_json(path), config.image_resolution, str(path))
    return check_preprocess_size(pre, config)

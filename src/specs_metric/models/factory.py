"""Build a :class:`~specs_metric.models.model.LongCLIP` from a state dict or a read checkpoint."""

from __future__ import annotations

import os

import torch

from specs_metric.errors import CheckpointError, ConfigError
from specs_metric.models.config import ModelConfig
from specs_metric.models.model import LongCLIP, config_from_state_dict, is_fp16_rounded
from specs_metric.models.weights.loading import Checkpoint, read_checkpoint
from specs_metric.models.weights.validation import check_model_size


def load_state_dict(
    name_or_path: str | os.PathLike[str], *, longclip: bool = False
) -> dict[str, torch.Tensor]:
    """Read the OpenAI/LongCLIP-layout state dict of a named model, file or HF folder.

    Args:
        name_or_path: registry name (see ``specs models``), ``hf:org/repo``, a file path or
            a ``save_pretrained`` folder.
        longclip: stretch a 77-position CLIP checkpoint to 248 positions.
    """
    return read_checkpoint(name_or_path, longclip=longclip).state_dict


def round_like_reference(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Round the weights the reference loader keeps in fp16 (docs/models.md,
    "Exactness and reference quirks") and return fp32.

    The reference builds the model, casts Conv/Linear/projection weights to fp16, loads the
    state dict into them, and on CPU casts back to fp32: scores equal these rounded weights
    computed in fp32.
    """
    return {
        k: v.to(torch.float16).to(torch.float32)
        if is_fp16_rounded(k) and v.is_floating_point()
        else v.float()
        if v.is_floating_point()
        else v
        for k, v in state_dict.items()
    }


def build_model(
    state_dict: dict[str, torch.Tensor],
    *,
    reference_rounding: bool = True,
    source: str = "state dict",
    config: ModelConfig | None = None,
) -> LongCLIP:
    """Build a model in eval mode (fp32, CPU).

    Args:
        state_dict: flat reference-layout state dict.
        config: the architecture (default: inferred from the tensors with the OpenAI /
            LongCLIP convention for what they cannot tell).
        reference_rounding: round weights as the reference loader does (default, so scores
            match published ones); ``False`` keeps full precision (training, conversion).
        source: name of the file, for error messages.

    Raises:
        CheckpointError: unsupported architecture, tensors that do not fit it, or a config
            the tensors could not fill (refused before the model is allocated).
    """
    if config is None:
        try:
            config = config_from_state_dict(state_dict, source=source)
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from exc
        except (ValueError, KeyError, IndexError) as exc:
            raise CheckpointError(f"{source}: {exc}") from exc
    # Keys and shapes are compared with the config's before a module is allocated.
    check_model_size(config, state_dict, source, exact=True)
    model = LongCLIP(config)
    weights = (
        round_like_reference(state_dict)
        if reference_rounding
        else {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    )
    model.load_state_dict(weights)
    return model.eval()


def model_from_checkpoint(checkpoint: Checkpoint, *, reference_rounding: bool = True) -> LongCLIP:
    """The model of a :func:`~specs_metric.models.weights.loading.read_checkpoint` result
    (eval, CPU)."""
    return build_model(
        checkpoint.state_dict,
        reference_rounding=reference_rounding,
        source=checkpoint.name,
        config=checkpoint.config,
    )

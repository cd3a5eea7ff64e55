"""Options shared by the commands: validated argument types and the model options (light:
imports no torch until a value is checked)."""

from __future__ import annotations

import argparse

from specs_metric.runtime.policy import INFERENCE_PRECISIONS


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (batch sizes, chunk sizes, counts)."""
    return _bounded_int(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (worker counts, where 0 means "in this process")."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (confidence levels)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return value


def device_name(text: str) -> str:
    """argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ...).

    Checked when the command line is read, so a typo or a CUDA device on a machine (or a
    torch build) without CUDA is one line, not a traceback in the middle of a job.
    """
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r} (expected cpu, cuda, cuda:N, mps ...)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no usable GPU"
            raise argparse.ArgumentTypeError(
                f"device {text!r} requested but CUDA is not available ({build}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(
                f"device {text!r} requested but this machine has {count} CUDA device(s)"
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise argparse.ArgumentTypeError(f"device {text!r} requested but MPS is not available")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(
            f"unsupported device {text!r} (expected cpu, cuda, cuda:N or mps)"
        )
    return text


def add_device_option(p: argparse.ArgumentParser, help: str = "default: auto") -> None:
    """``--device``, validated by :func:`device_name`."""
    p.add_argument(
        "--device", default=None, type=device_name, help=f"cpu, cuda, cuda:1 ... ({help})"
    )


def add_architecture_options(p: argparse.ArgumentParser) -> None:
    """``--arch`` and ``--preprocess``: how a checkpoint is read."""
    p.add_argument(
        "--arch",
        default=None,
        help="architecture of an OpenAI-layout file that is not the OpenAI convention "
        "(QuickGELU, 64-wide heads): a name such as ViT-B-32 (open_clip GELU) or ViT-H-14, "
        "or a JSON config (see `specs models --archs`); checked against self-describing "
        "files",
    )
    p.add_argument(
        "--preprocess",
        default="auto",
        help="image preprocessing: auto (the model's own: an HF folder's "
        "preprocessor_config.json, else the reference), reference, or a "
        "preprocessor_config.json file",
    )


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--precision``, ``--full-precision-weights``, ``--long-captions``,
    ``--arch``, ``--preprocess``."""
    add_device_option(p)
    p.add_argument(
        "--precision",
        default="fp32",
        choices=INFERENCE_PRECISIONS,
        help="fp32 = exact reference numerics (default); bf16 / fp16 (CUDA) = fast "
        "(bf16 on a CPU without AMX or AVX-512-BF16 falls back to fp32)",
    )
    p.add_argument(
        "--full-precision-weights",
        action="store_true",
        help="do not round weights to fp16 like the reference loader",
    )
    p.add_argument(
        "--long-captions",
        default="truncate",
        choices=["truncate", "error"],
        help="captions over the context: truncate (keep EOT, default) or error",
    )
    add_architecture_options(p)


def load_scorer(args: argparse.Namespace, name: str, device=None):
    """Load ``name`` with the options of :func:`add_model_options`."""
    from specs_metric.scoring.scorer import load

    return load(
        name,
        device=device if device is not None else args.device,
        precision=args.precision,
        reference_rounding=not args.full_precision_weights,
        long_captions=args.long_captions,
        arch=getattr(args, "arch", None),
        preprocess=getattr(args, "preprocess", "auto"),
    )


def model_meta(scorer) -> dict:
    """What identifies a loaded model in a results file."""
    return {
        "model": scorer.name,
        "checkpoint_sha256": scorer.checkpoint_sha256,
        "precision": scorer.precision,
        "reference_rounding": scorer.reference_rounding,
        "long_captions": scorer.long_captions,
        "device": str(scorer.device),
    }

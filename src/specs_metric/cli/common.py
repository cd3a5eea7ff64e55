"""Options shared by the commands that load a scoring model."""

from __future__ import annotations

import argparse


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
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
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
    from specs_metric.scorer import load

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

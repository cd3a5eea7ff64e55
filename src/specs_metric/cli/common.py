"""Options shared by the commands that load a model (light: imports no torch)."""

from __future__ import annotations

import argparse

from specs_metric.runtime import INFERENCE_PRECISIONS


def add_device_option(p: argparse.ArgumentParser) -> None:
    """``--device`` (resolved by :func:`specs_metric.runtime.resolve_device`)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--precision``, ``--full-precision-weights``, ``--long-captions``."""
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


def load_scorer(args: argparse.Namespace, name: str, device=None):
    """Load ``name`` with the options of :func:`add_model_options`."""
    from specs_metric.scorer import load

    return load(
        name,
        device=device if device is not None else args.device,
        precision=args.precision,
        reference_rounding=not args.full_precision_weights,
        long_captions=args.long_captions,
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

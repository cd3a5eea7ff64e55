"""``specs convert IN OUT``: CLIP -> LongCLIP, and any checkpoint -> .safetensors / .pt."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint (OpenAI CLIP -> LongCLIP; any -> .safetensors or .pt)",
        description="Read any supported checkpoint (or model name) and write OUT: "
        ".safetensors by extension, otherwise a reference-layout .pt state dict. A 77-position "
        "CLIP checkpoint is stretched to LongCLIP's 248 positions unless --keep-context.",
    )
    p.add_argument("input", help="checkpoint path or model name")
    p.add_argument("output", type=Path)
    p.add_argument(
        "--keep-context",
        action="store_true",
        help="do not stretch a 77-position CLIP checkpoint to 248 positions",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specs_metric.checkpoint import save_state_dict
    from specs_metric.factory import build_model, load_state_dict

    state = load_state_dict(args.input, longclip=not args.keep_context)
    # Building the model checks every tensor against the inferred architecture.
    build_model(state, reference_rounding=False, source=str(args.input))
    save_state_dict(state, args.output)
    print(
        f"wrote {args.output} ({len(state)} tensors, "
        f"{'LongCLIP' if 'positional_embedding_res' in state else 'CLIP'})"
    )
    return 0

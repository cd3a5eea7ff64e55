"""``specs convert IN OUT``: between the LongCLIP/OpenAI layout and HF ``transformers``
folders; CLIP -> LongCLIP stretching; any checkpoint -> .safetensors / .pt."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specs_metric.cli.common import (
    add_architecture_options,
    add_overwrite_option,
    add_progress_options,
    check_new_outputs,
    register_inputs,
)
from specs_metric.errors import UsageError

FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint (HF <-> LongCLIP/OpenAI layout; CLIP -> LongCLIP)",
        description="Read any supported model (name, file, HF folder, hf:ORG/REPO) and write "
        "OUT. A file name ending in .safetensors/.pt/.pth/.bin gets the LongCLIP/OpenAI "
        "layout (.safetensors keeps the model config in its metadata); any other OUT is an HF "
        "transformers CLIPModel folder (config.json, preprocessor_config.json, "
        "model.safetensors). For the LongCLIP layout a 77-position CLIP model is stretched "
        "to 248 positions unless --keep-context.",
    )
    p.add_argument("input", help="model name, checkpoint file, HF folder or hf:ORG/REPO")
    p.add_argument("output", type=Path, nargs="?", metavar="OUT", help="what to write")
    p.add_argument(
        "--output", dest="output_option", type=Path, metavar="OUT", help="the same as OUT"
    )
    p.add_argument(
        "--to",
        choices=("auto", "longclip", "hf"),
        default="auto",
        help="output layout (auto: by OUT's suffix, see above)",
    )
    p.add_argument(
        "--keep-context",
        action="store_true",
        help="do not stretch a 77-position CLIP checkpoint to 248 positions",
    )
    add_architecture_options(p)
    add_overwrite_option(p)
    add_progress_options(p)  # accepted like everywhere; a conversion shows no progress
    p.set_defaults(func=run)


def _is_openai_convention(config) -> bool:
    return (
        config.activation == "quick_gelu"
        and config.vision_head_width == config.text_head_width == 64
        and config.vision_layer_norm_eps == config.text_layer_norm_eps == 1e-5
    )


def run(args: argparse.Namespace) -> int:
    from specs_metric.models.config import config_metadata
    from specs_metric.models.factory import model_from_checkpoint
    from specs_metric.models.weights.checkpoint import save_state_dict
    from specs_metric.models.weights.hf import write_folder
    from specs_metric.models.weights.loading import read_checkpoint

    if (args.output is None) == (args.output_option is None):
        raise UsageError("give the output once: as OUT or as --output OUT")
    args.output = args.output or args.output_option
    to = args.to
    if to == "auto":
        to = "longclip" if args.output.suffix.lower() in FILE_SUFFIXES else "hf"
    if to == "hf" and args.output.is_file():
        raise UsageError(f"{args.output}: an HF model is a folder, and this is a file")
    register_inputs(args.input)
    check_new_outputs("OUT", [args.output], args.overwrite)
    checkpoint = read_checkpoint(
        args.input,
        arch=args.arch,
        preprocess=args.preprocess,
        longclip=to == "longclip" and not args.keep_context,
    )
    # Building the model checks every tensor against the architecture.
    model_from_checkpoint(checkpoint, reference_rounding=False)
    config, state = checkpoint.config, checkpoint.state_dict
    if to == "hf":
        write_folder(args.output, state, config, checkpoint.preprocess)
        if checkpoint.preprocess.crop_rounding == "round":
            print(
                "note: HF's CLIPImageProcessor floors centre-crop offsets where this model's "
                "pipeline rounds them (a one-pixel shift on some images); this package "
                "reads the folder with floor, or with --preprocess reference",
                file=sys.stderr,
            )
        print(f"wrote {args.output}/ (HF CLIPModel, {config.context_length} positions)")
        return 0
    metadata = config_metadata(config, checkpoint.preprocess)
    save_state_dict(state, args.output, metadata=metadata)
    if args.output.suffix != ".safetensors" and not _is_openai_convention(config):
        print(
            f"note: a .pt file cannot record the architecture ({config.activation}, head "
            f"widths {config.vision_head_width}/{config.text_head_width}); load it with "
            "--arch, or write .safetensors, which keeps it",
            file=sys.stderr,
        )
    print(f"wrote {args.output} ({len(state)} tensors, {'LongCLIP' if config.is_long else 'CLIP'})")
    return 0

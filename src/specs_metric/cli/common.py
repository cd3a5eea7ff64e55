"""Options shared by the commands: validated argument types and the model options (light:
imports no torch until a value is checked)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specs_metric.errors import NothingScoredError, OutputError, SpecsError
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


# --- the command-line conventions (docs/cli-conventions.md) -------------------------------

DEFAULT_MODEL = "specs-b32"
MODEL_HELP = f"model name (see `specs models`) or path (default {DEFAULT_MODEL})"
QUIET_HELP = "no progress bars or progress lines (results, warnings and errors still print)"
BATCH_HELP = (
    "images per forward pass (default: by device, 1 on a CPU so that each embedding is "
    "independent of its batch mates, 256 on CUDA)"
)


def add_progress_options(p: argparse.ArgumentParser) -> None:
    """``--quiet`` and its synonym ``--no-progress`` (one flag, one meaning: ``args.quiet``)."""
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true", help=QUIET_HELP)


def add_output_option(
    p: argparse.ArgumentParser,
    help: str,
    *,
    required: bool = False,
    aliases: tuple[str, ...] = (),
    default: Path | None = None,
) -> None:
    """``--output`` (a file or a folder), with the option's former names (``--out``,
    ``--json``) kept as hidden aliases of the same ``args.output`` for one release."""
    where = p.add_mutually_exclusive_group(required=required) if aliases else p
    where.add_argument("--output", type=Path, default=default, required=required and not aliases,
                       help=help)  # fmt: skip
    for alias in aliases:
        where.add_argument(alias, dest="output", type=Path, help=argparse.SUPPRESS)


def add_overwrite_option(p: argparse.ArgumentParser, resume: bool = False) -> None:
    """``--overwrite``: replace an existing output (without it, a command refuses one)."""
    keep = ", --resume continues or keeps it" if resume else ""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace an existing output (default: refuse it{keep})",
    )


def add_batch_size_option(p: argparse.ArgumentParser) -> None:
    """``--batch-size``: images per forward pass, by device unless given."""
    p.add_argument("--batch-size", type=positive_int, default=None, help=BATCH_HELP)


def warn(command: str, message: str) -> None:
    """One warning line on stderr: ``specs COMMAND: warning: MESSAGE``."""
    print(f"specs {command}: warning: {' '.join(message.split())}", file=sys.stderr)


def refuse_existing(
    option: str, path: Path, state: str, *, resume: bool | None = None
) -> None:
    """Refuse to replace an output silently: one line naming what is there and the flag
    that says what to do with it (``--overwrite``; ``--resume`` where the command has it).

    Args:
        state: what is at ``path``, e.g. "already exists" or "holds an interrupted run".
        resume: None when the command cannot resume; else whether the earlier run is
            unfinished (``--resume`` continues it) or complete (``--resume`` keeps it).
    """
    if resume is None:
        todo = "pass --overwrite to replace it, or choose another " + option
    elif resume:
        todo = "pass --resume to continue it, or --overwrite to start over"
    else:
        todo = "pass --overwrite to replace it, or --resume to keep it"
    raise OutputError(f"{option} {path} {state}; {todo}")


def register_inputs(*specs) -> None:
    """Register what a command reads (files, globs, brace ranges, dataset folders) as inputs
    before it checks its outputs, so that an output that is one of them (by any path: a link,
    a hard link, a glob's file) is refused as such, first, even with ``--overwrite``."""
    from specs_metric.data.sources import protect_inputs
    from specs_metric.io.writing import protect

    for spec in specs:
        if spec is None:
            continue
        if isinstance(spec, (list, tuple)):
            register_inputs(*spec)
        elif Path(spec).is_dir() and not (Path(spec) / "state.json").is_file():
            continue  # a folder of images or data: its files are registered as read
        else:
            try:
                protect_inputs(spec)
            except (SpecsError, OSError):
                protect(spec)  # not an input spec the data layer reads (a model, a table)


def check_new_outputs(option: str, paths, overwrite: bool) -> None:
    """Refuse (one line) the first of ``paths`` that is an input of this command, even with
    ``overwrite`` (see :func:`register_inputs`), or that exists, unless ``overwrite``."""
    from specs_metric.io.writing import check_not_input

    for path in paths:
        if path is not None:
            check_not_input(path, option)
    if overwrite:
        return
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_symlink() or path.exists():
            if path.is_dir() and not any(path.iterdir()):
                continue  # an empty folder holds nothing to lose
            refuse_existing(option, path, "already exists")


def rows_exit_status(command: str, summary: dict, strict: bool) -> int:
    """The exit status of a command that writes one output row per input row (``specs
    score``, ``specs explain``, ``specs sweep``), once its output is written.

    0 when every row was scored; with row errors a warning line, and 1 under ``--strict``.
    When rows were read but none could be scored, nothing useful was made: a
    :class:`~specs_metric.errors.NothingScoredError` (one line, exit status 2), whatever
    ``--strict`` says. An input without rows gets a warning (an empty output is right).
    """
    n_rows, n_errors = summary["n_rows"], summary["n_errors"]
    where = summary.get("output") or summary.get("output_dir")
    first = summary.get("first_error")
    if n_rows == 0:
        warn(command, f"the input has no rows; {where} is empty")
        return 0
    if n_errors >= n_rows:
        example = f" (the first: {first})" if first else ""
        raise NothingScoredError(
            f"no row could be scored: all {n_rows} rows have an error{example}; see the "
            f"error column of {where}"
        )
    if not n_errors:
        return 0
    example = f" (the first: {first})" if first else ""
    if strict:
        warn(command, f"{n_errors} of {n_rows} rows in {where} had errors{example} (--strict: "
                      "exit 1)")  # fmt: skip
        return 1
    warn(command, f"{n_errors} of {n_rows} rows in {where} could not be scored{example}; "
                  "their error column says why (--strict makes this exit 1)")  # fmt: skip
    return 0


INPUT_HELP = (
    "rows: .jsonl, .csv, .json (clipscore mapping or COCO results list), webdataset .tar "
    "shards, .parquet, .arrow, an HF datasets folder; globs, brace ranges ({00000..00009}) "
    "and fsspec URLs (s3://, hf://, ...) name several files"
)


def add_source_options(p: argparse.ArgumentParser) -> None:
    """Where rows keep their image, caption and id, and where image paths resolve: the same
    options for every command that reads scoring rows (score, explain)."""
    p.add_argument("--image-column", default="image", help="tables: image column (default image)")
    p.add_argument(
        "--caption-column", default="caption", help="tables: caption column (default caption)"
    )
    p.add_argument("--id-column", default="id", help="tables: id column (default id)")
    p.add_argument(
        "--caption-key",
        help="webdataset: take the caption from this field of the .json member "
        "(default: the .txt member, else the json field 'caption')",
    )
    p.add_argument(
        "--image-pattern",
        help="COCO results: image file name from the entry, e.g. "
        "'COCO_val2014_{image_id:012d}.jpg' (default: <image_id>.<ext>)",
    )
    p.add_argument(
        "--image-root",
        type=Path,
        help="folder for relative image paths (default: the folder of the file that names them)",
    )
    p.add_argument(
        "--confine-images",
        action="store_true",
        help="image paths must stay inside the image root (no absolute paths, no ~, no .. or "
        "links out of it): for services that score rows they do not trust",
    )


def source_options(args: argparse.Namespace):
    """The :class:`~specs_metric.data.rows.SourceOptions` of :func:`add_source_options`."""
    from specs_metric.data.rows import SourceOptions

    return SourceOptions(
        image_column=args.image_column,
        caption_column=args.caption_column,
        id_column=args.id_column,
        caption_key=args.caption_key,
        image_pattern=args.image_pattern,
        confine_images=args.confine_images,
    )

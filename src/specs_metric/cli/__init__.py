"""The ``specs`` command line: one module per command, each with a ``register`` function.

``register(subparsers)`` adds the command's parser and sets ``func`` (called with the parsed
namespace, returning an exit code). Commands under ``specs bench`` register on the bench
sub-parsers instead.

Start-up stays fast because command modules load lazily: :data:`COMMANDS` and
:data:`BENCH_COMMANDS` name each command, its module and its help line, so ``specs --help``
imports no command module (and no torch), and a command line imports only the module of the
command it names. To add a command, write ``cli/<name>.py`` with ``register`` and add a row
to the table.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from specs_metric.cli.interrupts import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Terminated,
    resume_hint,
    sigterm_as_interrupt,
)
from specs_metric.errors import InterruptedJobError, SpecsError
from specs_metric.io.writing import protection_scope

# (command, module under specs_metric.cli, help line), in the order ``specs --help`` lists
# them. The help line is the one the module's ``register`` gives (a test keeps them equal).
COMMANDS: list[tuple[str, str, str]] = [
    ("score", "score",
     "score image-caption rows (JSONL, CSV, JSON, webdataset shards, parquet, ...)"),
    ("models", "models", "list named models (and which are cached) or --arch names"),
    ("convert", "convert",
     "convert a checkpoint (HF <-> LongCLIP/OpenAI layout; CLIP -> LongCLIP)"),
    ("prepare", "prepare", "build a training set (captions, cumulative captions, negatives)"),
    ("train", "train", "fine-tune a LongCLIP checkpoint with the SPECS objective"),
    ("compare", "compare",
     "compare two `specs score` outputs: two scoring models or two captioners (B - A)"),
    ("sweep", "sweep",
     "score a captioner's checkpoints (one caption file each) and test each step"),
    ("explain", "explain", "which segments of each caption raise or lower its score"),
    ("synth", "synth",
     "generate synthetic scenes with known facts (sDCI layout + graded captions)"),
    ("serve", "serve",
     "score image-caption pairs over HTTP for many clients (dynamic batching)"),
]  # fmt: skip
# Sub-commands of ``specs bench``.
BENCH_COMMANDS: list[tuple[str, str, str]] = [
    ("human", "bench_human",
     "correlation of SPECS, CLIP-S and text metrics with human judgments"),
    ("intrinsic", "bench_intrinsic",
     "intrinsic specificity: do added details raise and wrong details lower the score?"),
    ("retrieval", "bench_retrieval", "image-text retrieval Recall@1/5/10 in both directions"),
    ("zeroshot", "bench_zeroshot",
     "zero-shot classification top-1/top-5 accuracy with prompt templates"),
    ("details", "bench_details",
     "per-sentence attribution on a synthetic world: AUROC of -delta, false vs true"),
]  # fmt: skip


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and exit 2, as argparse does)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _chosen(argv: Sequence[str] | None) -> list[str] | None:
    """The positional words of ``argv`` (the command path), or None for "load everything"."""
    if argv is None:
        return None
    return [a for a in argv if not a.startswith("-")]


def _add_commands(
    sub: argparse._SubParsersAction, table: list[tuple[str, str, str]], chosen: str | None,
    load_all: bool,
) -> None:
    for name, module, help_line in table:
        if load_all or name == chosen:
            importlib.import_module(f"specs_metric.cli.{module}").register(sub)
        else:  # listed in the help, never parsed: the command line names another command
            sub.add_parser(name, help=help_line, add_help=False)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specs-metric")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0+local"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``specs`` argument parser.

    Args:
        argv: the command line it will parse: only the module of the command it names is
            imported (none for ``specs --help``). ``None`` builds every command's parser.
    """
    words = _chosen(argv)
    load_all = words is None
    parser = OneLineParser(
        prog="specs",
        description="SPECS: reference-free, specificity-aware scoring of long image captions.",
    )
    parser.add_argument("--version", action="version", version=f"specs-metric {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_commands(sub, COMMANDS, words[0] if words else None, load_all)
    if BENCH_COMMANDS:
        bench = sub.add_parser(
            "bench", help="benchmarks: intrinsic, human, retrieval, zeroshot, details"
        )
        bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
        in_bench = bool(words) and words[0] == "bench" and len(words) > 1
        _add_commands(bench_sub, BENCH_COMMANDS, words[1] if in_bench else None, load_all)
    return parser


# Options naming what a command writes, for errors that carry no file name (ENOSPC).
_OUTPUT_OPTIONS = ("output", "out", "json")


def _command_name(args: argparse.Namespace) -> str:
    bench = getattr(args, "bench_command", None)
    return f"{args.command} {bench}" if bench else str(args.command)


def describe_os_error(exc: OSError, args: argparse.Namespace | None = None) -> str:
    """One line for an operating-system error: what failed and on which file.

    A failed ``write`` (disk full, quota) carries no file name; the command's output
    option then names where it was writing.
    """
    if exc.errno is None or not exc.strerror:
        return str(exc)
    what = exc.strerror
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what += " (the output must go to a folder you can write to)"
    elif exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        what += " (free some space or write elsewhere)"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        what += " (a part of the path is a file, not a folder)"
    if exc.filename is not None:
        names = [os.fsdecode(exc.filename)]
        if exc.filename2 is not None:
            names.append(os.fsdecode(exc.filename2))
        return f"{what} ({' -> '.join(names)})"
    outputs = [
        str(getattr(args, name))
        for name in _OUTPUT_OPTIONS
        if isinstance(getattr(args, name, None), (str, Path))
    ]
    return f"{what} (while writing {', '.join(outputs)})" if outputs else what


def check_output_locations(args: argparse.Namespace) -> None:
    """Before any work: every output option must lie under a folder that can be written.

    A long job would otherwise compute everything and then fail on its first write. Only
    existing ancestors are checked; missing folders are created by the command later.
    """
    for name in _OUTPUT_OPTIONS:
        value = getattr(args, name, None)
        if not isinstance(value, (str, Path)) or not str(value):
            continue
        folder = Path(value).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``specs`` console script.

    Errors caused by the user's input or the machine (a
    :class:`~specs_metric.errors.SpecsError` of any kind: a bad value, an unusable file or
    checkpoint, a model that cannot be downloaded; or an ``OSError``: a missing file, a
    read-only or full disk) print one line and exit with status 2; any other exception,
    a plain ``ValueError`` included, is a bug and keeps its traceback. Set ``SPECS_DEBUG=1``
    for the traceback of every error.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "torch" not in sys.modules:
        # OpenMP threads that spin while the main process waits for its decoding workers
        # cost CPU and slow the workers down (measured: 0.54 -> 0.35 CPU ms per row of the
        # host benchmark with one worker; matrix products no slower). Read when torch loads,
        # so only set here, before any command imports it; an explicit setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from specs_metric.runtime.policy import leave_process_group, process_group_open

    group_was_open = process_group_open()  # a caller's group is the caller's to close
    succeeded = False
    try:
        with sigterm_as_interrupt(), protection_scope():
            check_output_locations(args)
            code = int(args.func(args) or 0)
        succeeded = True
        return code
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        if os.environ.get("SPECS_DEBUG") == "1":
            raise
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"
        print(f"specs {_command_name(args)}: {how}; {resume_hint(args, argv)}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except (SpecsError, OSError) as exc:
        if os.environ.get("SPECS_DEBUG") == "1":
            raise
        message = describe_os_error(exc, args) if isinstance(exc, OSError) else str(exc)
        if isinstance(exc, InterruptedJobError):
            message += f"; {resume_hint(args, argv)}"
        # One line: a message that spans lines (a wrapped library error) is joined.
        message = " ".join(message.split())
        print(f"specs {_command_name(args)}: error: {message}", file=sys.stderr)
        return 2
    finally:
        # Under torchrun, ranks leave together so that none aborts on a closed connection.
        if not group_was_open:
            leave_process_group(wait=succeeded)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

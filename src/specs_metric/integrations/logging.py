"""Experiment logging for ``specs sweep`` and ``specs compare`` (``--log-to``).

``--log-to tensorboard`` and ``--log-to wandb`` (repeatable) send a command's numbers,
its table and its plot to the experiment trackers a training team already watches:

- **TensorBoard** (``pip install 'specs-metric[logging]'``): an events file under
  ``OUT/tensorboard``; scalars, the plot as an image and the table as markdown text;
- **Weights & Biases**: a run (project ``$WANDB_PROJECT``, default ``specs-metric``; name
  ``$WANDB_NAME``, default the command and ``OUT``'s name) whose local files go under
  ``OUT``; scalars, the plot as a ``wandb.Image``, the table as a ``wandb.Table`` and the
  settings as its config. ``WANDB_MODE=offline`` logs without a network (``wandb sync``
  uploads later).

``specs sweep`` logs one step per checkpoint (the number at the end of its label when every
label has one, e.g. ``ckpt-2000``, else its position): ``sweep/mean``, ``sweep/ci_low``,
``sweep/ci_high``, ``sweep/n`` and, from the second checkpoint on,
``sweep/vs_previous/mean_diff`` and ``sweep/vs_previous/p_value``; then ``sweep/plot`` and
``sweep/checkpoints`` (the table). ``specs compare`` logs ``compare/mean_a``,
``compare/mean_b``, ``compare/mean_diff``, ``compare/ci_low``, ``compare/ci_high``,
``compare/p_value``, ``compare/wins``, ``compare/ties``, ``compare/losses``, the plot
``compare/distributions`` and the table ``compare/top_changes``.

The trackers write their own files (event files, W&B run folders), inside ``OUT``.
This module imports neither tracker until it logs, so the command line stays fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from specs_metric.errors import UsageError
from specs_metric.integrations import require

LOGGERS = ("tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def log_target(text: str) -> str:
    """argparse type of ``--log-to``: a tracker whose package is installed (checked when
    the command line is read, before any work)."""
    if text not in LOGGERS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOGGERS)}, got {text!r}")
    package = _PACKAGES[text]
    if importlib.util.find_spec(package) is None:
        raise argparse.ArgumentTypeError(
            f"--log-to {text} needs {package}: pip install 'specs-metric[logging]'"
        )
    return text


class _TensorBoard:
    def __init__(self, folder: Path) -> None:
        require("tensorboard", "logging", "--log-to tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def table(self, tag: str, columns: list[str], rows: list[list], step: int) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        self.writer.add_text(tag, "\n".join(lines), step)

    def close(self) -> str:
        self.writer.close()
        return f"TensorBoard: {self.folder}"


class _Wandb:
    def __init__(self, folder: Path, name: str, job_type: str, config: dict) -> None:
        self.wandb = require("wandb", "logging", "--log-to wandb")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.run = self.wandb.init(
                project=os.environ.get("WANDB_PROJECT", "specs-metric"),
                name=os.environ.get("WANDB_NAME", name),
                job_type=job_type,
                dir=str(folder),
                config=config,
            )
        except Exception as exc:  # wandb's own errors: not logged in, no network, ...
            message = " ".join(str(exc).split())
            raise UsageError(
                f"--log-to wandb: cannot start a W&B run ({message}); "
                "`wandb login`, or WANDB_MODE=offline to log locally"
            ) from exc

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def table(self, tag: str, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({tag: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> str:
        where = f"W&B run {self.run.name} ({self.run.dir})"
        self.run.finish()
        return where


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def _open(targets: Sequence[str], out: Path, name: str, job_type: str, config: dict) -> list:
    sinks = []
    for target in dict.fromkeys(targets):  # each tracker once
        if target == "tensorboard":
            sinks.append(_TensorBoard(out / "tensorboard"))
        elif target == "wandb":
            sinks.append(_Wandb(out, name, job_type, config))
        else:
            raise UsageError(f"--log-to: unknown tracker {target!r}")
    return sinks


def _close(sinks: list) -> None:
    for sink in sinks:
        print(f"logged to {sink.close()}", file=sys.stderr)


def checkpoint_steps(names: Sequence[str]) -> list[int]:
    """The step of each checkpoint: the number its label ends with when every label has
    a different one, else its position.

    >>> checkpoint_steps(["ckpt-1000", "ckpt-2000"]), checkpoint_steps(["a", "b2"])
    ([1000, 2000], [0, 1])
    """
    found = [re.search(r"(\d+)$", n) for n in names]
    numbers = [int(m.group(1)) for m in found if m]
    if len(numbers) == len(names) and len(set(numbers)) == len(numbers):
        return numbers
    return list(range(len(names)))


def log_sweep(result: dict, out: Path, targets: Sequence[str]) -> None:
    """Send a ``specs sweep`` result (the contents of ``OUT/sweep.json``) and
    ``OUT/sweep.png`` to the trackers."""
    if not targets:
        return
    out = Path(out)
    config = {k: result.get(k) for k in ("model", "checkpoint_sha256", "scale", "level",
                                         "n_boot", "n_perm", "seed", "images")}  # fmt: skip
    sinks = _open(targets, out, f"sweep {out.name}", "sweep", config)
    checkpoints = result["checkpoints"]
    steps = checkpoint_steps([c["name"] for c in checkpoints])
    rows = []
    for step, ck in zip(steps, checkpoints, strict=True):
        values = {"sweep/mean": ck["mean"], "sweep/ci_low": ck["ci_low"],
                  "sweep/ci_high": ck["ci_high"], "sweep/n": ck["n"]}  # fmt: skip
        previous = ck.get("vs_previous")
        if previous:
            values["sweep/vs_previous/mean_diff"] = previous["mean_diff"]
            values["sweep/vs_previous/p_value"] = previous["p_value"]
        for sink in sinks:
            sink.scalars(values, step)
        rows.append([ck["name"], step, ck["n"], ck["mean"], ck["ci_low"], ck["ci_high"],
                     previous["mean_diff"] if previous else None,
                     previous["p_value"] if previous else None])  # fmt: skip
    last = steps[-1]
    columns = ["checkpoint", "step", "n", "mean", "ci_low", "ci_high", "vs_previous",
               "p_value"]  # fmt: skip
    plot = out / "sweep.png"
    for sink in sinks:
        sink.table("sweep/checkpoints", columns, rows, last)
        if plot.is_file():
            sink.image("sweep/plot", plot, last)
    _close(sinks)


def log_compare(result: dict, out: Path | None, targets: Sequence[str]) -> None:
    """Send a ``specs compare`` result (its ``report.json``) and ``OUT/distributions.png``
    to the trackers.

    Raises:
        UsageError: no ``--out`` folder to log into.
    """
    if not targets:
        return
    if out is None:
        raise UsageError("--log-to needs --out (the trackers' files go there)")
    out = Path(out)
    keys = ("mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value", "wins", "ties",
            "losses")  # fmt: skip
    config = {k: result.get(k) for k in ("file_a", "file_b", "model_a", "model_b", "scale",
                                         "pair_by", "unit", "level", "n_boot", "n_perm",
                                         "seed")}  # fmt: skip
    sinks = _open(targets, out, f"compare {out.name}", "compare", config)
    values = {f"compare/{k}": result[k] for k in keys}
    values["compare/n_used"] = result.get("n_used")
    columns = ["id", "image", "caption", "caption_b", "score_a", "score_b", "diff"]
    rows = [[row.get(k) for k in columns] for row in result.get("top_changes") or []]
    plot = out / "distributions.png"
    for sink in sinks:
        sink.scalars(values, 0)
        if rows:
            sink.table("compare/top_changes", columns, rows, 0)
        if plot.is_file():
            sink.image("compare/distributions", plot, 0)
    _close(sinks)

"""The training logs: the per-update CSV (``OUTPUT/train_log.csv``) and, when installed,
TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

from specs_metric.errors import TrainError, reading
from specs_metric.io.reading import open_text
from specs_metric.io.writing import create_empty, open_append

LOG_COLUMNS = (
    "step", "epoch", "lr", "loss", "contrastive", "detail", "negative", "margin",
    "logit_scale", "images", "skipped_images", "seconds",
)


class CsvLog:
    """The per-update CSV log; on resume rows after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        rows = []
        if resume_step is not None and path.is_file():
            fh = open_text(path, what="training log", error=TrainError, newline="", protect=False)
            with fh, reading(path, TrainError, "cannot resume the log"):
                reader = csv.DictReader(fh)
                if "step" not in (reader.fieldnames or ()):
                    raise TrainError(f"{path}: no 'step' column; remove it to start a new log")
                rows = [r for r in reader if int(r["step"] or "") <= resume_step]
        create_empty(path, "training log")  # never through a link planted at its name
        self.fh = open_append(path, "training log")
        self.writer = csv.DictWriter(self.fh, fieldnames=LOG_COLUMNS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.fh.flush()

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def tensorboard_writer(output: Path, enabled: bool):
    """A TensorBoard ``SummaryWriter`` under ``OUTPUT/tensorboard``, or None (disabled or
    not installed)."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output / "tensorboard"))

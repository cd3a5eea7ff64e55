"""Training examples for the specificity objective, decoded in DataLoader workers.

One example (docs/training.md, "Objective"; as the reference's collate function builds it)
is the image, the full caption ``C`` (the ``caption`` column), and for an index ``i``
drawn uniformly from ``0 .. len(captions) - 2``: the base ``B = captions[i]``, the detail
``D = captions[i + 1]`` and the negative ``N = neg_captions[i]``. Rows with fewer than two
cumulative captions are left out, as the reference filters them when loading. Texts longer
than the context are truncated with a final EOT, like the reference's
``tokenize(..., truncate=True)``.

Unlike the reference, which draws ``i`` from the Python ``random`` state of whichever
process runs the collate function, ``i`` comes from a generator seeded with
``(seed, epoch, row)``: the same row gets the same ``i`` whatever the number of workers or
processes, which makes resumed and multi-process runs reproduce single-process ones.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from specs_metric.data.images import image_source
from specs_metric.errors import DataError, ImageError, TrainError
from specs_metric.processing.tokenizer import Tokenizer, default_tokenizer, truncate_ids
from specs_metric.processing.transform import open_image, preprocess
from specs_metric.training.examples import read_table

log = logging.getLogger(__name__)

TEXT_FIELDS = ("caption", "base", "detail", "negative")


def training_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """Training preprocessing of one decoded image: converted to RGB *first*, then resized,
    cropped and normalised like scoring.

    This is the reference's training recipe: its SPECS training script decodes every image
    file straight to RGB (torchvision's RGB read mode) and only then applies its resize /
    crop / normalise transform, while its scoring pipeline converts to RGB after resizing
    (:func:`specs_metric.processing.transform.preprocess`). The two agree on RGB images; on RGBA
    images (PIL resizes them with premultiplied alpha) and palette images (PIL resizes
    them with nearest-neighbour) they differ, and training keeps the reference's order.
    """
    return preprocess(image.convert("RGB"), resolution)


def detail_index(seed: int, epoch: int, row: int, n_captions: int) -> int:
    """The index ``i`` (uniform in ``0 .. n_captions - 2``) used for ``row`` in ``epoch``."""
    rng = np.random.default_rng([seed, epoch, row])
    return int(rng.integers(n_captions - 1))


class SpecificityDataset(Dataset):
    """Rows of a prepared training table (see :mod:`specs_metric.training.prepare`).

    Args:
        table: an Arrow table, or a parquet file / ``datasets`` directory to read.
        resolution: image side after preprocessing (the model's resolution).
        context_length: token positions of the text tower.
        details: build ``B``, ``D``, ``N`` (the specificity objective). When False only
            ``image`` and ``caption`` are needed (contrastive pre-training).
        seed: seed of the per-row index draw.
        image_root: folder relative image paths resolve against (default: the folder of
            the data file, or the working folder for an in-memory table).
        tokenizer: the tokenizer (default: the project tokenizer).

    Items are dicts with ``pixels`` (3, R, R), ``row``, and LongTensor token ids for each of
    :data:`TEXT_FIELDS` (only ``caption`` when ``details`` is False), or None for an image
    that cannot be decoded (dropped by :func:`collate_examples`, which counts it).
    """

    def __init__(
        self,
        table: pa.Table | str | Path,
        *,
        resolution: int,
        context_length: int = 248,
        details: bool = True,
        seed: int = 0,
        image_root: str | Path | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        source = str(table) if not isinstance(table, pa.Table) else "training table"
        # Relative image paths resolve like every other input's: against the image root,
        # else the data file's folder (a datasets folder: itself), else the working folder.
        if image_root is not None:
            self.image_root = Path(image_root)
        elif not isinstance(table, pa.Table):
            path = Path(table)
            self.image_root = path if path.is_dir() else path.parent
        else:
            self.image_root = Path.cwd()
        if not isinstance(table, pa.Table):
            table = read_table(table)
        needed = ["image", "caption"] + (["captions", "neg_captions"] if details else [])
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise DataError(f"{source}: missing column(s) {missing}; build it with `specs prepare`")
        self.table = table.select(needed)
        if details:
            lengths = pc.list_value_length(self.table.column("captions")).to_numpy(
                zero_copy_only=False
            )
            self.rows = np.flatnonzero(lengths > 1)
        else:
            self.rows = np.arange(self.table.num_rows)
        if len(self.rows) == 0:
            raise DataError(f"{source}: no usable rows")
        self.resolution = resolution
        self.context_length = context_length
        self.details = details
        self.seed = seed
        self.tokenizer = tokenizer or default_tokenizer()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the index draw of every row)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def _cell(self, column: str, row: int):
        return self.table.column(column)[row].as_py()

    def image_source(self, index: int) -> str | bytes:
        """Item ``index``'s image, as a path or encoded bytes.

        Raises:
            DataError: a cell that names no image.
        """
        row = int(self.rows[index])
        return image_source(self._cell("image", row), self.image_root, f"row {row}")

    def _ids(self, text: str) -> torch.Tensor:
        ids = truncate_ids(self.tokenizer.token_ids(text), self.context_length)
        return torch.tensor(ids, dtype=torch.long)

    def __getitem__(self, index: int) -> dict | None:
        row = int(self.rows[index])
        try:
            pixels = training_pixels(open_image(self.image_source(index)), self.resolution)
        except (DataError, ImageError) as exc:
            log.warning("row %d: skipping image: %s", row, exc)
            return None
        item = {"row": row, "pixels": pixels, "caption": self._ids(self._cell("caption", row))}
        if self.details:
            captions = self._cell("captions", row)
            negatives = self._cell("neg_captions", row)
            i = detail_index(self.seed, self.epoch, row, len(captions))
            if i >= len(negatives):
                raise DataError(
                    f"row {row}: {len(captions)} captions but only {len(negatives)} negatives"
                )
            item["base"] = self._ids(captions[i])
            item["detail"] = self._ids(captions[i + 1])
            item["negative"] = self._ids(negatives[i])
        return item


@dataclass
class Batch:
    """A collated batch: pixels (B, 3, R, R), tokens per text field (B, L) trimmed to the
    longest row of the batch, dataset rows, and how many items were dropped (bad images)."""

    pixels: torch.Tensor
    tokens: dict[str, torch.Tensor]
    rows: list[int]
    skipped: int

    def __len__(self) -> int:
        return len(self.rows)


def pad_ids(sequences: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Zero-pad 1-D id tensors to (N, length)."""
    out = torch.zeros(len(sequences), length, dtype=torch.long)
    for k, seq in enumerate(sequences):
        out[k, : len(seq)] = seq
    return out


def collate_examples(items: Sequence[dict | None]) -> Batch:
    """Stack items, dropping (and counting) the None of undecodable images."""
    kept = [item for item in items if item is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return Batch(torch.zeros(0), {}, [], skipped)
    fields = [f for f in TEXT_FIELDS if f in kept[0]]
    length = max(len(item[f]) for item in kept for f in fields)
    return Batch(
        pixels=torch.stack([item["pixels"] for item in kept]),
        tokens={f: pad_ids([item[f] for item in kept], length) for f in fields},
        rows=[item["row"] for item in kept],
        skipped=skipped,
    )


class ResumableSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler` that can start part-way into an epoch.

    ``start`` (set with :meth:`set_position`) is the number of this replica's samples of the
    current epoch already consumed; iteration resumes after them without touching the data.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_position(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


# Images tried before training starts: one that decodes is enough to go on.
PROBE_IMAGES = 256


def check_images_readable(dataset: SpecificityDataset, limit: int = PROBE_IMAGES) -> None:
    """Refuse a data set none of whose first ``limit`` images can be read: training would
    skip every batch and save an unchanged model.

    Raises:
        TrainError: naming the first failure and where relative paths resolve.
    """
    first = None
    tried = min(limit, len(dataset))
    for index in range(tried):
        try:
            open_image(dataset.image_source(index))
            return
        except (DataError, ImageError) as exc:
            first = first or str(exc)
    raise TrainError(
        f"none of the {tried} image(s) tried can be read (first: {first}); relative image "
        f"paths resolve against --image-root, else the data file's folder ({dataset.image_root})"
    )

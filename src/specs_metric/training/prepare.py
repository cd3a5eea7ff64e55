"""Building the SPECS training set from image/long-caption pairs.

Each kept row gets

- ``image``: the image (a path string resolved against the image root, or encoded bytes
  when the input embeds them),
- ``caption``: the full caption, unchanged,
- ``captions``: cumulative captions ``c_1 .. c_n`` (``c_{k+1}`` = ``c_k`` + one segment),
- ``neg_captions``: ``n_1 .. n_{n-1}`` with ``n_k`` = ``c_k`` + a segment of another image.

Negatives follow the reference data preparation (docs/training.md, "Negatives") with a seeded
:class:`random.Random`: rows are visited in input order; for each segment index ``i`` of a
row (all but its last segment) a random row with a different image is drawn (again until the
image differs and it has a segment; the reference would crash on a row without segments) and
its segment ``i`` (or its last one, if it has fewer) is taken. For the first
``floor(shuffle_fraction * n)`` rows (``n`` rows with a readable image, in input order) the
words of that segment are shuffled; the rest keep it intact. Cumulative captions grow while
both the caption and its negative stay within ``context_length`` tokens (SOT and EOT
included) of the project tokenizer. Rows left without a negative are dropped.

Reading the input rows is :mod:`specs_metric.training.examples`.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from specs_metric.errors import PrepareError, UsageError
from specs_metric.io.writing import atomic_write, write_text
from specs_metric.processing.segmentation import DEFAULT_SEGMENTER, Segmenter, get_segmenter
from specs_metric.processing.tokenizer import Tokenizer, clean_text, default_tokenizer
from specs_metric.training.examples import Example, image_problem, iter_examples, resolve_image

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "missing_image",
    "unreadable_image",
    "empty_caption",
    "too_few_segments",
    "too_long",
    "no_negative",
)
DEFAULT_SHUFFLE_FRACTION = 0.9
CONTEXT_LENGTH = 248
OUTPUT_COLUMNS = ("image", "caption", "captions", "neg_captions")


@dataclass
class PrepareReport:
    """What :func:`prepare_dataset` did.

    Attributes:
        rows: input rows read.
        kept: rows written.
        skipped: count per reason (see :data:`SKIP_REASONS`).
        examples: up to five skipped row numbers per reason.
        output: the written file or directory.
        segments_per_row: mean number of cumulative captions of kept rows.
    """

    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    output: Path | None = None
    segments_per_row: float = 0.0

    def skip(self, reason: str, row: int) -> None:
        self.skipped[reason] += 1
        rows = self.examples.setdefault(reason, [])
        if len(rows) < 5:
            rows.append(row)

    def summary(self) -> str:
        lines = [f"read {self.rows} rows, kept {self.kept} -> {self.output}"]
        for reason in SKIP_REASONS:
            if self.skipped[reason]:
                rows = ", ".join(map(str, self.examples.get(reason, [])))
                lines.append(f"  skipped {self.skipped[reason]:>8}  {reason}  (rows {rows} ...)")
        if self.kept:
            lines.append(f"  cumulative captions per kept row: {self.segments_per_row:.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "skipped": {r: self.skipped[r] for r in SKIP_REASONS},
            "example_rows": self.examples,
            "output": str(self.output),
            "segments_per_row": self.segments_per_row,
        }


# ----------------------------------------------------------------------------- building


def shuffle_words(text: str, rng: random.Random) -> str:
    """The words of ``text`` (split on whitespace) in a random order."""
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def draw_negative_details(
    segments: list[list[str]],
    images: list[Any],
    shuffle_fraction: float = DEFAULT_SHUFFLE_FRACTION,
    seed: int = 42,
) -> list[list[str] | None]:
    """Negative detail segments for every row (docs/training.md, "Negatives").

    Args:
        segments: detail segments of each row (rows with a readable image, in order).
        images: each row's image (rows with equal images never give each other negatives).
        shuffle_fraction: leading fraction of rows whose negative segments are word-shuffled.
        seed: seed of the random generator.

    Returns:
        Per row, ``len(segments) - 1`` negative segments, or None when no other row with a
        different image and at least one segment exists.
    """
    rng = random.Random(seed)
    n = len(segments)
    shuffled_rows = int(n * shuffle_fraction)
    donors = [k for k in range(n) if segments[k]]
    out: list[list[str] | None] = []
    for row, own in enumerate(segments):
        if len(own) < 2:
            out.append([])
            continue
        if not any(images[k] != images[row] for k in donors):
            out.append(None)
            continue
        negatives = []
        for i in range(len(own) - 1):
            while True:
                other = rng.randrange(n)
                if images[other] != images[row] and segments[other]:
                    break
            segment = segments[other][min(i, len(segments[other]) - 1)].strip()
            negatives.append(shuffle_words(segment, rng) if row < shuffled_rows else segment)
        out.append(negatives)
    return out


class TokenCounter:
    """Exact token counts, ``len(tokenizer.token_ids(text))``, for many overlapping texts.

    The text is cleaned as a whole (as the tokenizer does); BPE ids are then counted per
    space-separated word with a memo. Pre-tokenisation never spans a space, so the pieces of
    a cleaned text are those of its words, and the count is exact. Words that cleaning would
    change again fall back to encoding the whole text.
    """

    MAX_MEMO = 2_000_000

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self.tokenizer = tokenizer or default_tokenizer()
        self._words: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        total = 2  # SOT and EOT
        for word in clean_text(text).split(" "):
            n = self._words.get(word)
            if n is None:
                n = len(self.tokenizer.encode(word)) if clean_text(word) == word else -1
                if len(self._words) < self.MAX_MEMO:
                    self._words[word] = n
            if n < 0:
                return len(self.tokenizer.token_ids(text))
            total += n
        return total


def cumulative_captions(
    segments: list[str],
    negative_details: list[str],
    count_tokens: Callable[[str], int] | None = None,
    context_length: int = CONTEXT_LENGTH,
) -> tuple[list[str], list[str]]:
    """Cumulative captions and their negatives, cut where either would exceed the context.

    Args:
        segments: detail segments of a caption.
        negative_details: a negative segment for each segment but the last.
        count_tokens: token count of a text, SOT and EOT included (default: the project
            tokenizer's, via :class:`TokenCounter`).
        context_length: the largest allowed count.

    Example:
        >>> captions, negatives = cumulative_captions(["A dog.", "It runs."], ["cat blue."])
        >>> captions, negatives
        (['A dog.', 'A dog. It runs.'], ['A dog. cat blue.'])
    """
    count_tokens = count_tokens or TokenCounter()
    captions = [segments[0].strip()]
    negatives: list[str] = []
    for segment, negative in zip(segments[1:], negative_details, strict=False):
        caption = f"{captions[-1]} {segment.strip()}"
        negative = f"{captions[-1]} {negative.strip()}"
        if count_tokens(caption) > context_length or count_tokens(negative) > context_length:
            break
        captions.append(caption)
        negatives.append(negative)
    return captions, negatives


_worker_counter: TokenCounter | None = None
_worker_context = CONTEXT_LENGTH


def _init_build_worker(context_length: int) -> None:
    global _worker_counter, _worker_context
    _worker_counter = TokenCounter()
    _worker_context = context_length


def _build_in_worker(job: tuple[list[str], list[str]]) -> tuple[list[str], list[str]]:
    return cumulative_captions(job[0], job[1], _worker_counter, _worker_context)


def build_all(
    jobs: list[tuple[list[str], list[str]]],
    count_tokens: Callable[[str], int] | None = None,
    context_length: int = CONTEXT_LENGTH,
    workers: int = 1,
    progress: bool = True,
) -> list[tuple[list[str], list[str]]]:
    """:func:`cumulative_captions` for every (segments, negatives) job, in order."""
    bar = dict(desc="building", total=len(jobs), disable=not progress, unit="row")
    if workers > 1 and count_tokens is None:
        with _pool(workers, _init_build_worker, (context_length,)) as pool:
            return list(tqdm(pool.imap(_build_in_worker, jobs, chunksize=64), **bar))
    count_tokens = count_tokens or TokenCounter()
    return [cumulative_captions(s, n, count_tokens, context_length) for s, n in tqdm(jobs, **bar)]


def _pool(workers: int, initializer, initargs):
    # fork starts workers without re-importing the package; the work is pure Python.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return context.Pool(workers, initializer=initializer, initargs=initargs)


_worker_segmenter: Segmenter | None = None


def _init_worker(name: str) -> None:
    global _worker_segmenter
    _worker_segmenter = get_segmenter(name)


def _segment_in_worker(caption: str) -> list[str]:
    return _clean_segments(_worker_segmenter(caption))


def _clean_segments(segments: list[str]) -> list[str]:
    return [s for s in segments if s and s.strip()]


def segment_all(
    captions: list[str],
    segmenter: str | Segmenter = DEFAULT_SEGMENTER,
    workers: int = 1,
    progress: bool = True,
) -> list[list[str]]:
    """Segment every caption (in ``workers`` processes when a segmenter name is given)."""
    bar = dict(desc="segmenting", total=len(captions), disable=not progress, unit="caption")
    if isinstance(segmenter, str):
        if workers > 1:
            get_segmenter(segmenter)  # fail here, with a clear message, not in a worker
            with _pool(workers, _init_worker, (segmenter,)) as pool:
                return list(tqdm(pool.imap(_segment_in_worker, captions, chunksize=64), **bar))
        segmenter = get_segmenter(segmenter)
    return [_clean_segments(segmenter(c)) for c in tqdm(captions, **bar)]


def _rows_with_images(
    input_path: Path, root: Path, check_images: bool, progress: bool, report: PrepareReport
) -> list[Example]:
    """The input rows whose image resolves (and opens, with ``check_images``); the others
    are counted in ``report`` by reason."""
    rows: list[Example] = []
    for example in tqdm(iter_examples(input_path), desc="checking", disable=not progress,
                        unit="row"):
        report.rows += 1
        example.image = resolve_image(example.image, root)
        problem = image_problem(example.image) if check_images else (
            "missing_image" if example.image is None else None
        )
        if problem:
            report.skip(problem, example.row)
            continue
        rows.append(example)
    return rows


def _buildable(
    rows: list[Example], texts: list[str], segments: list, negatives: list,
    report: PrepareReport,
) -> list[tuple[Example, list, list]]:
    """(row, segments, negative details) of the rows that can make a training example:
    a caption, at least two segments and a negative (the others counted in ``report``)."""
    candidates = []
    for example, text, segs, negs in zip(rows, texts, segments, negatives, strict=True):
        if not text.strip():
            report.skip("empty_caption", example.row)
        elif len(segs) < 2:
            report.skip("too_few_segments", example.row)
        elif negs is None:
            report.skip("no_negative", example.row)
        else:
            candidates.append((example, segs, negs))
    return candidates


def prepare_dataset(
    input_path: str | Path,
    output_path: str | Path,
    *,
    image_root: str | Path | None = None,
    segmenter: str | Segmenter = DEFAULT_SEGMENTER,
    seed: int = 42,
    shuffle_fraction: float = DEFAULT_SHUFFLE_FRACTION,
    context_length: int = CONTEXT_LENGTH,
    check_images: bool = True,
    workers: int = 1,
    progress: bool = True,
    tokenizer: Tokenizer | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> PrepareReport:
    """Build the training set and write it (``.parquet`` file or ``datasets`` directory).

    Args:
        input_path: JSON / JSONL / CSV / parquet file or ``datasets`` directory.
        output_path: ``*.parquet`` for a parquet file; any other path is written as a
            ``datasets`` directory (needs the ``datasets`` package).
        image_root: directory relative image paths are joined to (default: the input
            file's directory).
        segmenter: ``clause`` (default), ``sentence``, ``chunk`` or a callable.
        seed: seed of the negative sampling and word shuffling.
        shuffle_fraction: leading fraction of rows whose negative segments are shuffled.
        context_length: token limit of cumulative captions and negatives.
        check_images: open each image's header; rows with missing or unreadable images are
            skipped (when False only embedded-bytes and missing paths are not checked).
        workers: processes for segmentation and for building cumulative captions.
        progress: show progress bars.
        tokenizer: the tokenizer measuring lengths (default: the project tokenizer; a
            custom one disables the building worker processes).
        log_fn: where to print the summary (default: the module logger).

    Returns:
        The :class:`PrepareReport` (also written next to the output as ``*.report.json``).
    """
    if not 0.0 <= shuffle_fraction <= 1.0:
        raise UsageError(f"shuffle_fraction must be in [0, 1], got {shuffle_fraction}")
    input_path, output_path = Path(input_path), Path(output_path)
    root = Path(image_root) if image_root is not None else (
        input_path if input_path.is_dir() else input_path.parent
    )
    report = PrepareReport()

    rows = _rows_with_images(input_path, root, check_images, progress, report)
    texts = [c if isinstance(c, str) else "" for c in (r.caption for r in rows)]
    segments = segment_all(texts, segmenter, workers, progress)
    image_keys = [r.image for r in rows]
    negatives = draw_negative_details(segments, image_keys, shuffle_fraction, seed)
    candidates = _buildable(rows, texts, segments, negatives, report)

    out: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
    count_tokens = TokenCounter(tokenizer) if tokenizer is not None else None
    built = build_all([(segs, negs) for _, segs, negs in candidates], count_tokens,
                      context_length, workers, progress)
    for (example, _, _), (captions, neg_captions) in zip(candidates, built, strict=True):
        if not neg_captions:
            report.skip("too_long", example.row)
            continue
        out["image"].append(example.image)
        out["caption"].append(example.caption)
        out["captions"].append(captions)
        out["neg_captions"].append(neg_captions)

    report.kept = len(out["caption"])
    if report.kept:
        report.segments_per_row = sum(map(len, out["captions"])) / report.kept
    report.output = write_training_table(out, output_path)
    report_file = output_path.with_name(output_path.name + ".report.json")
    write_text(report_file, json.dumps(report.to_dict(), indent=2))
    (log_fn or log.info)(report.summary())
    return report


def write_training_table(columns: dict[str, list], output_path: str | Path) -> Path:
    """Write the columns as parquet (``*.parquet``) or a ``datasets`` directory."""
    output_path = Path(output_path)
    images = columns["image"]
    image_type = pa.binary() if images and isinstance(images[0], bytes) else pa.string()
    schema = pa.schema([
        ("image", image_type),
        ("caption", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("neg_captions", pa.list_(pa.string())),
    ])
    table = pa.Table.from_pydict({k: columns[k] for k in OUTPUT_COLUMNS}, schema=schema)
    if output_path.suffix == ".parquet":
        output_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(output_path, "wb") as out:
            pq.write_table(table, out)
        return output_path
    try:
        import datasets
    except ImportError as exc:
        raise PrepareError(
            f"{output_path}: writing a datasets directory needs the 'datasets' package "
            "(pip install datasets); or give an output path ending in .parquet"
        ) from exc
    datasets.Dataset.from_dict({k: columns[k] for k in OUTPUT_COLUMNS}).save_to_disk(
        str(output_path)
    )
    return output_path

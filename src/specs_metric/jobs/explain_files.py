"""``specs explain`` over a file: rows in, one explanation per row out (JSONL, CSV or
parquet, by the output's extension).

The attribution itself is :mod:`specs_metric.scoring.explain`; this module reads the rows as
``specs score`` does (bad rows become row errors naming their line), embeds each distinct
image once through :class:`~specs_metric.scoring.image_embeddings.ImageEncoder`, and writes each
chunk's records to ``<output>.part`` (JSON lines) as it finishes, which becomes the output in
its format at the end (:func:`~specs_metric.jobs.outputs.write_output`: in CSV the nested
``segments`` column is JSON text, in parquet a list of structs).
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from specs_metric.data.rows import SourceOptions
from specs_metric.data.sources import count_rows, read_rows
from specs_metric.errors import CaptionTooLongError, UsageError
from specs_metric.io.jsonio import dumps, write_json
from specs_metric.io.writing import check_not_input, create_empty, open_append, publish
from specs_metric.jobs.outputs import output_format, write_output
from specs_metric.processing.segmentation import SEGMENTERS, Segmenter
from specs_metric.processing.tokenizer import literal_special_warning
from specs_metric.runtime.policy import device_policy
from specs_metric.scoring.explain import (
    ATTRIBUTIONS,
    DEFAULT_CHAINS_PER_BATCH,
    DEFAULT_SEGMENTER,
    NEUTRAL_SENTENCE,
    CaptionPlan,
    explain_embedded,
    plan_caption,
    resolve_segmenter,
)
from specs_metric.scoring.image_embeddings import DEFAULT_MEMORY_CACHE_SIZE, ImageEncoder
from specs_metric.scoring.scales import check_scale

OUTPUT_FIELDS = (
    "id",
    "image",
    "caption",
    "score",
    "cosine",
    "tokens",
    "truncated",
    "warning",
    "segments",
    "error",
)


@dataclass
class ExplainConfig:
    """Settings of one ``specs explain`` run."""

    input: Path
    output: Path
    image_root: Path | None = None
    segmenter: str = DEFAULT_SEGMENTER
    attribution: str = "prefix"
    scale: str = "specs"
    neutral: str = NEUTRAL_SENTENCE
    chunk_rows: int = 64  # rows prepared and written together
    batch_size: int | None = None  # images per image batch; None: by device (1 on a CPU)
    chains_per_batch: int = DEFAULT_CHAINS_PER_BATCH
    memory_cache_size: int = DEFAULT_MEMORY_CACHE_SIZE  # image embeddings kept in memory
    show_progress: bool = True
    source: SourceOptions = field(default_factory=SourceOptions)  # columns, caption key...


def _explain_chunk(
    scorer, rows: list, config: ExplainConfig, segmenter: Segmenter, images: ImageEncoder
) -> list[dict]:
    records = []
    todo: list[tuple[dict, CaptionPlan, Path, int]] = []
    for row in rows:
        rec = {k: None for k in OUTPUT_FIELDS}
        rec.update(id=row.id, image=row.image, caption=row.caption, error=row.error)
        records.append(rec)
        if row.error is not None:
            continue
        try:
            plan = plan_caption(
                row.caption,
                segmenter,
                config.attribution,
                scorer.tokenizer,
                scorer.context_length,
                scorer.long_captions,
                config.neutral,
            )
        except CaptionTooLongError as exc:
            rec["error"] = f"{row.label}: {exc}"
            ids = scorer.tokenizer.token_ids(row.caption)
            rec.update(tokens=len(ids), truncated=True, warning=literal_special_warning(ids))
            continue
        todo.append((rec, plan, row.image_source, row.label))
    embedded = images.embed([t[2] for t in todo])
    errors = dict(embedded.errors)
    ready = []
    for i, (rec, plan, _, label) in enumerate(todo):
        if i in errors:
            rec["error"] = f"{label}: {errors[i]}"
            rec.update(tokens=plan.tokens, truncated=plan.truncated, warning=plan.warning)
        else:
            ready.append((rec, plan, embedded.embeddings[i]))
    if ready:
        stacked = torch.stack([e for _, _, e in ready])
        results = explain_embedded(
            scorer, stacked, [p for _, p, _ in ready], config.scale, config.chains_per_batch
        )
        for (rec, _, _), ex in zip(ready, results, strict=True):
            rec.update(ex.to_dict())
    return records


class _Tally:
    """The counts and mean of explain records, added chunk by chunk."""

    def __init__(self) -> None:
        self.rows = self.scored = self.segments = self.beyond = self.warnings = 0
        self.total = 0.0
        self.first_error: str | None = None

    def add(self, records: Sequence[dict]) -> None:
        for r in records:
            self.rows += 1
            if r.get("error") is not None:
                self.first_error = self.first_error or r["error"]
                continue
            self.scored += 1
            self.total += r["score"]
            self.segments += len(r["segments"])
            self.beyond += sum(bool(s["beyond_context"]) for s in r["segments"])
            self.warnings += bool(r.get("warning"))

    def summary(self) -> dict:
        return {
            "n_rows": self.rows,
            "n_scored": self.scored,
            "n_errors": self.rows - self.scored,
            "n_segments": self.segments,
            "n_beyond_context": self.beyond,
            "n_warnings": self.warnings,
            "mean": self.total / self.scored if self.scored else None,
            "first_error": self.first_error,
        }


def summarize_records(records: Sequence[dict]) -> dict:
    """Counts and mean score of explain records (``mean`` is None when none was scored;
    ``first_error`` is the error of the first failed row, as in ``specs score``)."""
    tally = _Tally()
    tally.add(records)
    return tally.summary()


def explain_file(
    scorer, config: ExplainConfig, keep: int | None = None
) -> tuple[dict, list[dict]]:
    """Explain every row of ``config.input`` into ``config.output`` (JSONL, CSV or parquet,
    by its extension).

    Rows are read and explained a chunk at a time (any input ``specs score`` reads, with its
    source options), and written to ``<output>.part`` as each chunk finishes, which becomes
    the output when the run completes. Bad rows become row errors naming their row, as in
    ``specs score``. Memory does not grow with the input: only the first ``keep`` records
    are kept to return (None: all of them, for callers that want every record in memory).

    Returns:
        The summary (also written to ``<output>.summary.json``) and the kept records.
    """
    check_scale(config.scale)
    fmt = output_format(config.output)
    if config.attribution not in ATTRIBUTIONS:
        raise UsageError(
            f"unknown attribution {config.attribution!r}; choose one of {ATTRIBUTIONS}"
        )
    if isinstance(config.segmenter, str) and config.segmenter not in SEGMENTERS:
        raise UsageError(
            f"unknown segmenter {config.segmenter!r}; choose one of {', '.join(SEGMENTERS)}"
        )
    started = time.perf_counter()
    segmenter = resolve_segmenter(config.segmenter)
    total = count_rows(config.input, config.image_root, config.source)
    rows = read_rows(config.input, config.image_root, config.source)
    config.output.parent.mkdir(parents=True, exist_ok=True)
    part = config.output.with_name(config.output.name + ".part")
    batch_size = config.batch_size or device_policy(scorer.device).image_batch
    images = ImageEncoder(scorer, batch_size, config.memory_cache_size)
    kept: list[dict] = []
    tally = _Tally()
    bar = tqdm(
        total=total,
        unit="row",
        file=sys.stderr,
        disable=not config.show_progress,
        desc="explaining",
    )
    check_not_input(config.output, "--output")
    create_empty(part)
    with open_append(part) as out:
        while chunk_rows := list(itertools.islice(rows, config.chunk_rows)):
            chunk = _explain_chunk(scorer, chunk_rows, config, segmenter, images)
            out.write("".join(dumps(r, ensure_ascii=False) + "\n" for r in chunk))
            out.flush()
            tally.add(chunk)
            kept += chunk if keep is None else chunk[: max(0, keep - len(kept))]
            bar.update(len(chunk))
    bar.close()
    if fmt == "jsonl":
        publish(part, config.output)
    else:
        write_output([part], config.output, OUTPUT_FIELDS)
        part.unlink()
    summary = tally.summary()
    summary.update(
        {
            "segmenter": config.segmenter if isinstance(config.segmenter, str) else "custom",
            "attribution": config.attribution,
            "scale": config.scale,
            **scorer.summary_fields(),
            "images_encoded": images.encoded,
            "seconds": round(time.perf_counter() - started, 3),
            "output": str(config.output),
        }
    )
    if config.attribution == "neutral":
        summary["neutral"] = config.neutral
    summary_path = config.output.with_name(config.output.name + ".summary.json")
    write_json(summary_path, summary)
    return summary, kept

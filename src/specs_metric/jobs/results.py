"""The result files of a scoring job: the output rows' columns and JSON lines, the part
files a job appends to and cuts back on resume, the final output made from them (only with
one row per input row), and reading an output back with its summary.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from pathlib import Path

from specs_metric.data.scorefiles import SCORE_FIELDS, read_score_rows
from specs_metric.errors import JobError
from specs_metric.io.jsonio import write_json
from specs_metric.io.reading import open_regular, read_json
from specs_metric.io.writing import truncate
from specs_metric.jobs.outputs import write_output
from specs_metric.limits import MAX_METADATA_BYTES
from specs_metric.scoring.scales import corpus_from_mean

OUTPUT_FIELDS = SCORE_FIELDS  # the columns of a score file, in order


def finite_or_none(value: object) -> object:
    """``value`` with every non-finite float (at any depth) replaced by ``None``: JSON has no
    NaN or Infinity, and a NaN in an input row's id or caption must not leak into ours."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def json_line(rec: dict) -> str:
    out = {k: finite_or_none(rec.get(k)) for k in OUTPUT_FIELDS}
    line = json.dumps(out, ensure_ascii=False, allow_nan=False) + "\n"
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (legal in JSON input): write it escaped
        line = json.dumps(out, ensure_ascii=True, allow_nan=False) + "\n"
    return line


def part_path(output: Path, rank: int, world_size: int) -> Path:
    return output.with_name(f"{output.name}.part-{rank}-of-{world_size}.jsonl")


def job_path(output: Path) -> Path:
    return output.with_name(f"{output.name}.job.json")


def resume_point(path: Path, chunk_rows: int, shard_rows: int) -> int:
    """Rows of ``path`` to keep on resume: its whole chunks of sound JSON lines.

    A crash can leave a torn last line, or a chunk written only in part (a chunk's text
    may reach the file in several writes). Both are cut off, so that the resumed run starts
    at a chunk boundary and forms the same batches as an uninterrupted run.
    """
    if not path.exists():
        return 0
    count, keep_rows, keep_bytes = 0, 0, 0
    with open_regular(path, what="part file", error=JobError, protect=False) as fh:
        offset = 0
        for line in fh:
            offset += len(line)
            if not line.endswith(b"\n") or count >= shard_rows:
                break
            try:
                json.loads(line)
            except ValueError:
                break
            count += 1
            if count % chunk_rows == 0 or count == shard_rows:
                keep_rows, keep_bytes = count, offset
    truncate(path, keep_bytes)
    return keep_rows


def write_final(output: Path, world_size: int, total: int) -> None:
    """Concatenate the part files (input order) into ``output``, in its format.

    The output appears (by rename) only if it holds exactly ``total`` rows; otherwise the
    part files stay for ``--resume`` and nothing else is left behind.
    """
    parts = [part_path(output, r, world_size) for r in range(world_size)]
    rows = 0
    for part in parts:
        with open_regular(part, what="part file", error=JobError, protect=False) as fh:
            rows += sum(1 for _ in fh)
    if rows != total:
        raise JobError(
            f"{output}: the part files hold {rows} rows but the input has {total}; "
            "kept them, run again with --resume"
        )
    write_output(parts, output, OUTPUT_FIELDS)
    for part in parts:
        part.unlink()


def _id_key(value: object) -> int:
    """A 64-bit hash of an id (type-aware: the JSON ids ``1`` and ``"1"`` differ)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def summarize(path: Path) -> dict:
    """Counts, mean and std of the scores of an output file (one streaming pass).

    ``mean`` and ``std`` are ``None`` when no row was scored. ``n_duplicate_ids`` counts rows
    whose id an earlier row already had (ids are compared by 64-bit hashes); ``n_warnings``
    counts rows with a ``warning`` (e.g. a literal special token in the caption).
    """
    n = n_err = n_trunc = n_dup = n_warn = 0
    total = total_sq = 0.0
    seen: set[int] = set()
    first_duplicate = first_error = None
    for rec in read_score_rows(path, protect=False):  # the job's own output
        key = _id_key(rec["id"])
        if key in seen:
            n_dup += 1
            first_duplicate = rec["id"] if first_duplicate is None else first_duplicate
        seen.add(key)
        if rec["error"]:
            n_err += 1
            first_error = rec["error"] if first_error is None else first_error
            continue
        n += 1
        total += rec["score"]
        total_sq += rec["score"] ** 2
        n_trunc += bool(rec["truncated"])
        n_warn += bool(rec.get("warning"))
    mean = total / n if n else None
    std = math.sqrt(max(total_sq / n - mean * mean, 0.0)) if n else None
    return {
        "n_rows": n + n_err,
        "n_scored": n,
        "n_errors": n_err,
        "n_truncated": n_trunc,
        "n_duplicate_ids": n_dup,
        "first_duplicate_id": first_duplicate,
        "n_warnings": n_warn,
        "mean": mean,
        "std": std,
        "first_error": first_error,
    }


# The keys of a job's summary, in order, from every engine (local, torchrun, Ray): the counts
# of summarize() (less the first repeated id), then what ran. ``images_encoded_rank0`` is
# null where the engine does not count them (Ray).
SUMMARY_KEYS = (
    "n_rows", "n_scored", "n_errors", "n_truncated", "n_duplicate_ids", "n_warnings", "mean",
    "std", "first_error", "corpus_score", "scale", "model", "checkpoint_sha256", "version",
    "precision", "reference_rounding", "long_captions", "device", "engine", "world_size",
    "images_encoded_rank0", "seconds", "output",
)  # fmt: skip


def summary_path(output: Path) -> Path:
    return output.with_name(output.name + ".summary.json")


def job_summary(output: Path, scale: str, run: dict, warn) -> dict:
    """The summary of a finished job, written to ``<output>.summary.json``: the
    :data:`SUMMARY_KEYS`, the same from every engine.

    Args:
        run: the keys after the counts, corpus score and scale (the model's
            ``summary_fields()``, the engine, ...).
        warn: prints a warning line (a repeated id).
    """
    summary = summarize(output)
    first_duplicate = summary.pop("first_duplicate_id")
    if summary["n_duplicate_ids"]:
        warn(
            f"{summary['n_duplicate_ids']} row(s) repeat the id of an earlier row (first: "
            f"{json.dumps(first_duplicate, ensure_ascii=False)}); `specs compare` needs "
            "unique ids"
        )
    mean = summary["mean"]
    summary["corpus_score"] = None if mean is None else corpus_from_mean(mean, scale)
    summary["scale"] = scale
    summary.update(run)
    if set(summary) != set(SUMMARY_KEYS):  # one schema for every engine: a bug otherwise
        raise RuntimeError(f"summary keys differ: {sorted(set(summary) ^ set(SUMMARY_KEYS))}")
    summary = {key: summary[key] for key in SUMMARY_KEYS}
    write_json(summary_path(output), summary)
    return summary


def partial_files(output: Path) -> list[Path]:
    """The part files of an unfinished job at ``output`` (of any world size)."""
    return sorted(output.parent.glob(f"{glob.escape(output.name)}.part-*-of-*.jsonl"))


def earlier_run(output: Path) -> str | None:
    """What an earlier job left at ``output``: None (nothing), ``"partial"`` (part files with
    rows in them, which ``--resume`` continues) or ``"complete"`` (its output). A job that
    stopped before its first row (a missing column, say) left nothing to lose."""
    if any(part.stat().st_size for part in partial_files(output)):
        return "partial"
    if output.is_symlink() or output.exists():
        return "complete"
    return None


def check_resumable(previous: dict, identity: dict, output: Path) -> None:
    """Refuse to resume ``output`` when its job record (``previous``) names other settings
    than ``identity``: rows scored with other settings must not meet in one output.

    Raises:
        JobError: naming the settings that differ.
    """
    settings = {k: v for k, v in previous.items() if k != "complete"}
    if settings != identity:
        keys = settings.keys() | identity.keys()
        changed = sorted(k for k in keys if settings.get(k) != identity.get(k))
        raise JobError(
            f"--resume: the output {output} was made with other settings "
            f"({', '.join(changed)}); remove it or run without --resume"
        )


def read_job_record(path: Path) -> dict | None:
    """The settings a job recorded in ``<output>.job.json`` (None if there is none).

    Raises:
        JobError: the record is not a JSON object (it is written atomically, so only a
            hand edit or another program makes it so).
    """
    if not path.exists():
        return None
    try:
        record = read_json(
            path, MAX_METADATA_BYTES, what="job record", error=JobError, protect=False
        )
    except (OSError, JobError) as exc:
        raise JobError(
            f"{path}: cannot read the job record ({exc}); remove it to start over"
        ) from None
    if not isinstance(record, dict):
        raise JobError(f"{path}: the job record is not a JSON object; remove it to start over")
    return record

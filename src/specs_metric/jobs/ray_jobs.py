"""``specs score --engine ray``: the local job's files and guarantees, scored on Ray Data.

Each job (one per input, or per shard with ``--output-dir``) keeps the local job's result
files (:mod:`specs_metric.jobs.results`): rows are appended to its part file as they stream back
in input order, the output appears only with one row per input row, and ``.job.json``
records the settings, so ``--resume`` keeps a complete output, continues an unfinished one
from the whole chunks of its part file, and refuses one made with other settings. The
scoring itself is :func:`specs_metric.jobs.ray.score`.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from specs_metric.data.locations import expand, is_plain_file
from specs_metric.data.rows import SourceOptions
from specs_metric.data.sources import count_rows, protect_inputs, read_rows
from specs_metric.io.jsonio import write_json
from specs_metric.io.writing import check_not_input, create_empty, open_append
from specs_metric.jobs import results
from specs_metric.jobs.job import job_identity
from specs_metric.jobs.ray import RayOptions, load_scorer, require_ray, score
from specs_metric.scoring.scales import check_scale

if TYPE_CHECKING:
    from specs_metric.jobs.job import JobConfig


def _file_rows(item: dict[str, Any], image_root: str | None, source: dict) -> list[dict]:
    """The rows of one input file from its row ``skip`` on, as Ray rows (ids and captions as
    JSON text)."""
    out = []
    rows = read_rows(item["file"], image_root, SourceOptions(**source))
    for row in itertools.islice(rows, item.get("skip", 0), None):  # skip: kept on resume
        out.append(
            {
                "job": item["job"],
                "id_json": json.dumps(row.id),
                "image": {"bytes": row.data, "path": str(row.path) if row.path else None},
                "image_json": json.dumps(row.image),
                "caption": row.caption if isinstance(row.caption, str) else None,
                "caption_json": json.dumps(row.caption),
                "error": row.error,
                "label": row.label,
            }
        )
    return out


def run_ray_job(config: JobConfig, options: RayOptions) -> dict:
    """:func:`specs_metric.jobs.job.run_job` on Ray: same output, summary and ``.job.json``."""
    return run_ray_jobs([config], options)[0]


def _job_items(config: JobConfig, number: int, done: int) -> list[dict]:
    """The input files of job ``number`` as pipeline items, without its first ``done`` rows
    (kept from an interrupted run): files wholly done are left out, and the file where that
    run stopped starts at its first missing row (``skip``)."""
    spec = config.input
    files = [os.fspath(spec)] if is_plain_file(spec) else expand(spec)
    items = []
    for file in files:
        if done and len(files) > 1:
            rows = count_rows(file, config.image_root, config.source)
            if rows <= done:
                done -= rows
                continue
        items.append({"file": file, "job": number, "skip": done})
        done = 0
    return items


def run_ray_jobs(configs: list[JobConfig], options: RayOptions) -> list[dict]:
    """Several jobs (e.g. one per shard) through one Ray pipeline; returns their summaries.

    The rows stream back in input order, job after job, and are appended to each job's part
    file (flushed after every batch); a job's output is finished as soon as its last row is
    in. With ``resume``, as in the local job: a complete output with the same settings is
    kept and its input not read again; an unfinished one keeps the whole chunks of its part
    file and only the rows after them are scored; a partial output made with other settings
    is refused.
    """
    started = time.perf_counter()
    check_scale(configs[0].scale)
    probe = load_scorer(options, "cpu")
    jobs = _RayJobs(configs, probe)
    pending = iter(jobs.todo)  # jobs whose rows are still to come, in order
    if jobs.items:  # none when every unfinished job has all its rows already
        current, handle = None, None
        for batch in _scored_rows(jobs.items, configs[0], options):
            for rec in batch.to_pylist():
                while rec["job"] != current:  # this job's rows are in; so are empty ones'
                    if handle is not None:
                        jobs.finish(current, handle)
                    current = next(pending)
                    handle = jobs.append(current)
                for key in ("id", "image", "caption"):
                    rec[key] = json.loads(rec[f"{key}_json"])
                handle.write(results.json_line(rec))
            if handle is not None:
                handle.flush()  # a killed run keeps what it scored, for --resume
        if handle is not None:
            jobs.finish(current, handle)
    for number in pending:  # jobs after the last row: empty or wholly resumed inputs
        jobs.finish(number, jobs.append(number))
    return [_summary(config, probe, options, started) for config in configs]


class _RayJobs:
    """The jobs of one Ray run: which are still to do, from which row, and their records."""

    def __init__(self, configs: list[JobConfig], probe) -> None:
        self.configs = configs
        self.identities: list[dict] = []
        self.todo: list[int] = []  # job numbers with rows still to write
        self.items: list[dict] = []  # the files (and first rows) Ray reads
        self.totals: dict[int, int] = {}  # rows of the jobs counted already (to resume them)
        for config in configs:
            protect_inputs(config.input)
        for number, config in enumerate(configs):
            config.output.parent.mkdir(parents=True, exist_ok=True)
            check_not_input(config.output, "--output")
            identity = {**job_identity(config, probe, 1), "engine": "ray"}
            self.identities.append(identity)
            done = self._resume_point(number, identity)
            if done is None:
                continue  # complete, with the same settings
            write_json(results.job_path(config.output), {**identity, "complete": False}, indent=1)
            if not done:
                create_empty(results.part_path(config.output, 0, 1))
            self.todo.append(number)
            self.items.extend(_job_items(config, number, done))

    def _resume_point(self, number: int, identity: dict) -> int | None:
        """Rows of job ``number`` kept from an earlier run (None: the job is complete)."""
        config = self.configs[number]
        if not config.resume:
            return 0
        previous = results.read_job_record(results.job_path(config.output))
        if previous is None:
            return 0
        results.check_resumable(previous, identity, config.output)
        if previous.get("complete", False) and config.output.exists():
            return None
        part = results.part_path(config.output, 0, 1)
        if not part.exists():
            return 0
        self.totals[number] = self._total(number)
        return results.resume_point(part, config.chunk_rows, self.totals[number])

    def _total(self, number: int) -> int:
        if number not in self.totals:
            config = self.configs[number]
            self.totals[number] = count_rows(config.input, config.image_root, config.source)
        return self.totals[number]

    def append(self, number: int):
        return open_append(results.part_path(self.configs[number].output, 0, 1))

    def finish(self, number: int, handle) -> None:
        handle.close()
        output = self.configs[number].output
        # the output appears only with one row per input row, as in the local job
        results.write_final(output, 1, self._total(number))
        write_json(results.job_path(output), {**self.identities[number], "complete": True}, 1)


def _scored_rows(items: list[dict], first: JobConfig, options: RayOptions):
    """Ray's scored rows of ``items`` (files and first rows), as pyarrow batches in order."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
    rows = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
        _file_rows,
        fn_kwargs={
            "image_root": os.fspath(first.image_root) if first.image_root else None,
            "source": first.source.as_dict(),
        },
    )
    scored = score(
        rows,
        options.model,
        image_column="image",
        id_column="id_json",
        scale=first.scale,
        rows_per_batch=first.chunk_rows,
        batch_size=first.batch_size,
        token_budget=first.token_budget,
        max_text_rows=first.max_text_rows,
        workers=options.workers,
        num_gpus_per_worker=options.num_gpus_per_worker,
        precision=options.precision,
        reference_rounding=options.reference_rounding,
        long_captions=options.long_captions,
        device=options.device,
    )
    return scored.iter_batches(batch_format="pyarrow", batch_size=None)


def _summary(config: JobConfig, probe, options: RayOptions, started: float) -> dict:
    """The job's summary, with the keys of the local job's (:data:`results.SUMMARY_KEYS`)."""
    run = {
        **probe.summary_fields(),
        "device": options.device or ("cuda" if options.num_gpus_per_worker > 0 else "cpu"),
        "engine": "ray",
        "world_size": 1,  # one process writes the output, as in the identity
        "images_encoded_rank0": None,  # the actors do not report it
        "seconds": round(time.perf_counter() - started, 3),
        "output": str(config.output),
    }
    return results.job_summary(config.output, config.scale, run, _warn)


def _warn(message: str) -> None:
    print(f"specs score: warning: {message}", file=sys.stderr)

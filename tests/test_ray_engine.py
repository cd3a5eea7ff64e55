"""``specs score --engine ray`` and ``specs_metric.jobs.ray.score`` on a local 2-CPU Ray cluster."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from specs_metric.cli import main
from specs_metric.data.scorefiles import read_score_rows
from test_datasets import N_PAIRS, _jsonl, _same, _score, _table, world  # noqa: F401

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _single_thread_reference(world, src, out):  # noqa: F811
    # Ray gives each 1-CPU actor one torch thread; a one-thread run of the job does the same
    # float32 arithmetic, so the scores can be compared for identity.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _score(world[0], src, out)
    finally:
        torch.set_num_threads(threads)


def test_ray_engine_equals_the_local_job(world, cluster, tmp_path):  # noqa: F811
    d, pairs = world
    src = _jsonl(world, tmp_path / "in.jsonl")
    with open(src, "a") as fh:  # bad rows keep their place and their message
        fh.write(json.dumps({"id": "missing", "image": "nope.png", "caption": "x"}) + "\n")
        fh.write(json.dumps({"id": "empty", "image": "img0.png", "caption": " "}) + "\n")
    reference = _single_thread_reference(world, src, tmp_path / "ref.jsonl")
    code = main(
        [
            "score",
            "--model",
            str(d / "tiny.pt"),
            "--input",
            str(src),
            "--output",
            str(tmp_path / "ray.parquet"),
            "--engine",
            "ray",
            "--no-progress",
        ]
    )
    assert code == 0
    result = list(read_score_rows(tmp_path / "ray.parquet"))
    assert len(result) == N_PAIRS + 2
    _same(result[:N_PAIRS], reference[:N_PAIRS], exact=True)
    assert result[N_PAIRS:] == reference[N_PAIRS:]
    summary = json.loads((tmp_path / "ray.parquet.summary.json").read_text())
    assert summary["engine"] == "ray" and summary["n_errors"] == 2
    # the same summary keys, in the same order, as the local engine's (docs say they match)
    local = json.loads((tmp_path / "ref.jsonl.summary.json").read_text())
    assert list(summary) == list(local) and local["engine"] == "local"
    assert {k: summary[k] for k in ("n_rows", "n_scored", "first_error", "model", "device")} == {
        k: local[k] for k in ("n_rows", "n_scored", "first_error", "model", "device")
    }


def test_python_api_scores_a_ray_dataset(world, cluster, tmp_path):  # noqa: F811
    import specs_metric.jobs.ray

    d, pairs = world
    reference = _score(d, _jsonl(world, tmp_path / "in.jsonl"), tmp_path / "ref.jsonl")
    table = _table(world, struct=True).rename_columns(["id", "image", "caption"])
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=5)
    dataset = ray.data.read_parquet(str(tmp_path / "t.parquet"))
    scored = specs_metric.jobs.ray.score(dataset, model=str(d / "tiny.pt"), rows_per_batch=8)
    rows = scored.take_all()
    assert set(rows[0]) == {"id", "caption", "score", "cosine", "tokens", "truncated", "error"}
    # other batches than the job's chunk and more threads: equal to float32 rounding
    _same(rows, reference, exact=False)


def test_ray_output_dir_streams_all_shards_through_one_pipeline(world, cluster, tmp_path):  # noqa: F811
    from test_datasets import _shards, _tar

    d, pairs = world
    paths = _shards(world, tmp_path / "wds", per_shard=5)
    _tar(tmp_path / "wds" / "00003.tar", [])  # an empty shard still gets its files
    base = ["score", "--model", str(d / "tiny.pt"), "--input", f"{tmp_path}/wds/*.tar",
            "--no-progress", "--output-format", "parquet"]  # fmt: skip
    assert main([*base, "--workers", "0", "--output-dir", str(tmp_path / "local")]) == 0
    assert main([*base, "--engine", "ray", "--output-dir", str(tmp_path / "ray")]) == 0
    names = [f"{n:05d}.parquet" for n in range(len(paths) + 1)]
    for name in names:
        local = list(read_score_rows(tmp_path / "local" / name))
        remote = list(read_score_rows(tmp_path / "ray" / name))
        _same(remote, local, exact=False)
        assert json.loads((tmp_path / "ray" / f"{name}.job.json").read_text())["complete"]
    assert list(read_score_rows(tmp_path / "ray" / names[-1])) == []
    combined = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert combined["n_scored"] == N_PAIRS
    # --resume with every shard complete reads nothing and changes nothing
    before = {n: (tmp_path / "ray" / n).stat().st_mtime_ns for n in names}
    assert main([*base, "--engine", "ray", "--output-dir", str(tmp_path / "ray"), "--resume"]) == 0
    assert before == {n: (tmp_path / "ray" / n).stat().st_mtime_ns for n in names}


def test_ray_resume_keeps_whole_chunks_and_scores_only_the_rest(world, cluster, tmp_path, capsys):  # noqa: F811
    from specs_metric.jobs.results import json_line, part_path

    d, pairs = world
    src = _jsonl(world, tmp_path / "in.jsonl")

    def ray_score(out, *extra):
        args = ["--output", str(out), "--engine", "ray", "--chunk-rows", "4", "--no-progress"]
        return main(["score", "--model", str(d / "tiny.pt"), "--input", str(src), *args, *extra])

    assert ray_score(tmp_path / "full.jsonl") == 0  # the uninterrupted run
    full_lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    full = [json.loads(line) for line in full_lines]
    record = json.loads((tmp_path / "full.jsonl.job.json").read_text())
    marked = [json_line({**rec, "score": 1000.0 + i}) for i, rec in enumerate(full)]

    def interrupted(name, kept, tail="", **settings):
        """The files a Ray run leaves when killed after writing ``kept``: its part file
        (rows marked by their score, so a kept row shows it was not scored again) and its
        job record."""
        out = tmp_path / name
        part_path(out, 0, 1).write_text("".join(kept) + tail)
        job = {**record, **settings, "complete": False}
        (tmp_path / f"{name}.job.json").write_text(json.dumps(job))
        return out

    # a partial output made with other settings is refused, and left as it was
    out = interrupted("other.jsonl", marked[:4], chunk_rows=5)
    assert ray_score(out, "--resume") == 2
    assert "other settings (chunk_rows)" in capsys.readouterr().err
    assert part_path(out, 0, 1).read_text() == "".join(marked[:4]) and not out.exists()

    # killed after two whole chunks, half a chunk and a torn line: the whole chunks stay
    out = interrupted("cut.jsonl", marked[:10], tail=marked[10][:25])
    assert ray_score(out, "--resume") == 0
    lines = out.read_text().splitlines(keepends=True)
    assert lines[:8] == marked[:8]  # 8 rows kept, not scored again
    assert lines[8:] == full_lines[8:]  # 4 rows scored, as the uninterrupted run did
    assert not part_path(out, 0, 1).exists()
    finished = json.loads((tmp_path / "cut.jsonl.job.json").read_text())
    assert finished == {**record, "complete": True}
    summary = json.loads((tmp_path / "cut.jsonl.summary.json").read_text())
    assert summary["n_rows"] == N_PAIRS and summary["n_scored"] == N_PAIRS

    # killed after its last row but before the output: nothing left to score
    out = interrupted("all.jsonl", marked)
    assert ray_score(out, "--resume") == 0
    assert out.read_text() == "".join(marked)


def test_ray_job_items_leave_out_the_rows_kept_on_resume(world, tmp_path):  # noqa: F811
    from specs_metric.data.rows import SourceOptions
    from specs_metric.jobs.job import JobConfig
    from specs_metric.jobs.ray_jobs import _file_rows, _job_items

    d, pairs = world
    sizes = (4, 3, 5)
    start = 0
    for n, size in enumerate(sizes):
        with open(tmp_path / f"in-{n}.jsonl", "w") as fh:
            for key, image, caption in pairs[start : start + size]:
                fh.write(json.dumps({"id": key, "image": str(d / image), "caption": caption}))
                fh.write("\n")
        start += size
    files = [str(tmp_path / f"in-{n}.jsonl") for n in range(3)]
    config = JobConfig(input=f"{tmp_path}/in-*.jsonl", output=tmp_path / "out.jsonl")

    def items(done):
        return [(item["file"], item["skip"]) for item in _job_items(config, 7, done)]

    assert items(0) == [(files[0], 0), (files[1], 0), (files[2], 0)]
    assert items(4) == [(files[1], 0), (files[2], 0)]
    assert items(6) == [(files[1], 2), (files[2], 0)]
    assert items(7) == [(files[2], 0)]
    assert items(12) == []
    single = JobConfig(input=files[2], output=tmp_path / "out.jsonl")
    assert [item["skip"] for item in _job_items(single, 0, 3)] == [3]
    # and the rows of the items are exactly the rows after the kept ones, in order
    rows = [
        row["id_json"]
        for item in _job_items(config, 0, 6)
        for row in _file_rows(item, None, SourceOptions().as_dict())
    ]
    assert rows == [json.dumps(key) for key, _, _ in pairs[6:]]

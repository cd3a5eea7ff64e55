"""The device batch policy (``runtime.device_policy``) and how ``specs score`` takes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from factories import make_state_dict
from specs_metric.cli import main
from specs_metric.jobs.job import JobConfig
from specs_metric.models.factory import build_model
from specs_metric.runtime.policy import available_cpus, device_policy
from specs_metric.scoring.scorer import Scorer
from subprocesses import child_env


def test_cpu_policy_is_the_jobs_old_defaults():
    # The values specs score always used on a CPU (resume identities recorded them).
    policy = device_policy("cpu")
    assert (policy.image_batch, policy.token_budget, policy.max_text_rows) == (1, 2048, 512)
    assert (policy.chunk_rows, policy.workers, policy.prefetch_chunks) == (512, 1, 2)
    assert not policy.pin_memory and not policy.fixed_shape_images
    assert device_policy(torch.device("cpu")) == policy


@pytest.mark.parametrize("cpus, workers", [(1, 1), (2, 1), (8, 7), (16, 15), (96, 16)])
def test_cuda_policy_is_large_and_its_workers_follow_the_cores(cpus, workers):
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):  # no GPU needed to ask
        policy = device_policy(device, cpus=cpus)
        assert policy.workers == workers
        assert policy.image_batch >= 64 and policy.token_budget >= 16 * 2048
        assert policy.chunk_rows >= policy.image_batch
        assert policy.pin_memory and policy.fixed_shape_images


def test_available_cpus_shares_the_cores_among_local_ranks(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = available_cpus()
    assert alone == len(__import__("os").sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(alone * 4))
    assert available_cpus() == 1  # never zero


def test_runtime_still_imports_without_torch():
    code = "import sys, specs_metric.runtime.policy; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), check=True
    )
    assert out.stdout.strip() == "False"


def test_for_device_fills_only_what_was_not_given():
    config = JobConfig(input="rows.jsonl", output=Path("out.jsonl"), num_workers=0, chunk_rows=7)
    cpu = config.for_device("cpu")
    assert (cpu.batch_size, cpu.token_budget, cpu.max_text_rows) == (1, 2048, 512)
    assert (cpu.num_workers, cpu.chunk_rows, cpu.fixed_shape_images) == (0, 7, False)
    cuda = config.for_device("cuda")
    assert cuda.batch_size == device_policy("cuda").image_batch and cuda.num_workers == 0
    assert cuda.fixed_shape_images is True and cuda.for_device("cpu") == cuda  # idempotent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    torch.save(make_state_dict(seed=2), d / "tiny.pt")
    rng = np.random.default_rng(3)
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(d / f"{i}.png")
        for j in (1, 4):
            rows.append({"id": f"{i}-{j}", "image": f"{i}.png", "caption": f"shape {j} " * j})
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _score(world: Path, out: Path, *extra: str) -> int:
    base = ["score", "--model", str(world / "tiny.pt"), "--input", str(world / "rows.jsonl")]
    return main([*base, "--output", str(out), "--device", "cpu", "--no-progress", *extra])


def test_defaults_resume_an_output_made_with_the_old_explicit_values(world, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    explicit = ["--batch-size", "1", "--token-budget", "2048", "--workers", "1"]
    assert _score(world, out, *explicit, "--chunk-rows", "512") == 0
    record = json.loads((tmp_path / "scores.jsonl.job.json").read_text())
    assert (record["batch_size"], record["token_budget"], record["chunk_rows"]) == (1, 2048, 512)
    assert "fixed_shape_images" not in record
    before = out.read_bytes()
    assert _score(world, out, "--resume") == 0  # refused if the identity differed
    assert out.read_bytes() == before
    # A value the defaults do not have is another setting: refused.
    capsys.readouterr()
    assert _score(world, out, "--resume", "--token-budget", "4096") == 2
    assert "other settings (token_budget)" in capsys.readouterr().err


def test_embed_token_ids_equals_each_caption_alone():
    # Batches come back in one copy, scattered to their rows: each row is its own caption's
    # embedding, as if encoded alone (attention is causal, pooling at EOT).
    scorer = Scorer(build_model(make_state_dict(seed=5)), device="cpu")
    ids, _ = scorer.tokenizer.fit(
        ["a b c d e f", "x", "one two three", "long " * 30, "z y"], scorer.context_length
    )
    batched = scorer.embed_token_ids(ids, token_budget=40, max_rows=2)
    alone = torch.cat([scorer.model.encode_text(torch.tensor([row])) for row in ids])
    torch.testing.assert_close(batched, alone.detach(), atol=1e-5, rtol=0)
    assert scorer.embed_token_ids([], 40, 2).shape == (0, scorer.embed_dim)


def test_a_chunks_pixels_cross_the_worker_pipe_as_one_tensor_and_come_back_by_hash():
    from specs_metric.jobs.chunks import Chunk, pack_chunk, unpack_chunk

    pixels = {h: torch.full((3, 4, 4), float(k)) for k, h in enumerate(["c", "a", "b"])}
    chunk = pack_chunk(Chunk(rows=[], pixels=dict(pixels)))
    assert chunk.packed is not None and chunk.packed.shape == (3, 3, 4, 4)
    assert all(v is None for v in chunk.pixels.values())  # only the hashes travel
    back = unpack_chunk(chunk).pixels
    assert list(back) == ["c", "a", "b"] and chunk.packed is None
    assert all(torch.equal(back[h], pixels[h]) for h in pixels)
    one = unpack_chunk(pack_chunk(Chunk(rows=[], pixels={"x": pixels["a"]})))
    assert one.pixels["x"] is pixels["a"]  # a single image is sent as it is

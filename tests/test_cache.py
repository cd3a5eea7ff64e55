"""The on-disk image-embedding cache: hits skip the image tower, keys separate checkpoints,
concurrent writers and torn files are harmless."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from factories import make_state_dict
from specs_metric.cli import main
from specs_metric.data.scorefiles import read_score_rows
from specs_metric.scoring.cache import EmbeddingCache, model_fingerprint


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    torch.save(make_state_dict(seed=0), tmp_path / "a.pt")
    torch.save(make_state_dict(seed=1), tmp_path / "b.pt")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"i{i}.png"
        )
        rows.append({"id": i, "image": f"i{i}.png", "caption": f"caption number {i}"})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src, tmp_path / "cache"


def _score(tmp_path, model, src, cache, out_name, captions_suffix=""):
    out = tmp_path / out_name
    main(["score", "--model", str(tmp_path / model), "--input", str(src), "--output", str(out),
          "--workers", "0", "--no-progress", "--cache-dir", str(cache)])
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    return list(read_score_rows(out)), summary


def test_second_run_skips_image_tower_and_scores_match(tmp_path):
    src, cache = _setup(tmp_path)
    first, s1 = _score(tmp_path, "a.pt", src, cache, "o1.jsonl")
    assert s1["images_encoded_rank0"] == 6
    # new captions of the same images, same checkpoint: all images come from the cache
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    for r in rows:
        r["caption"] += " with more detail"
    src2 = tmp_path / "in2.jsonl"
    src2.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second, s2 = _score(tmp_path, "a.pt", src2, cache, "o2.jsonl")
    assert s2["images_encoded_rank0"] == 0
    uncached = tmp_path / "o3.jsonl"
    main(["score", "--model", str(tmp_path / "a.pt"), "--input", str(src2), "--output",
          str(uncached), "--workers", "0", "--no-progress"])
    for x, y in zip(second, read_score_rows(uncached), strict=True):
        assert x["score"] == y["score"]  # cached fp32 embeddings are bit-identical
    # another checkpoint never reads the first one's entries
    _, s3 = _score(tmp_path, "b.pt", src, cache, "o4.jsonl")
    assert s3["images_encoded_rank0"] == 6


def test_fingerprint_separates_settings():
    a = model_fingerprint("abc", "fp32", True, 224)
    assert a != model_fingerprint("abd", "fp32", True, 224)
    assert a != model_fingerprint("abc", "bf16", True, 224)
    assert a != model_fingerprint("abc", "fp32", False, 224)
    assert a != model_fingerprint("abc", "fp32", True, 336)


def test_torn_entry_is_a_miss_and_tmp_files_are_ignored(tmp_path):
    cache = EmbeddingCache(tmp_path, "fp")
    key = "ab" + "0" * 62
    path = cache.root / key[:2] / f"{key}.npy"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x93NUMPY")  # a write cut short
    assert cache.get(key) is None
    cache.put(key, np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(cache.get(key), np.arange(4, dtype=np.float32))
    assert not list(cache.root.rglob("*.tmp"))


def _writer(root: str, worker: int) -> None:
    cache = EmbeddingCache(root, "fp")
    for k in range(200):
        cache.put(f"{k:064x}", np.full(64, k, dtype=np.float32))
        got = cache.get(f"{(k * 7) % 200:064x}")
        assert got is None or (got == (k * 7) % 200).all()


def test_concurrent_writers_never_expose_partial_entries(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = EmbeddingCache(tmp_path, "fp")
    for k in range(200):
        assert (cache.get(f"{k:064x}") == k).all()

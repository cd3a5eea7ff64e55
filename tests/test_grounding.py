"""Grounded pre-training (specs_metric.demo.grounding) and its loss, against values
computed here: the tokenizer's ids of the captions, hand-computed losses, preprocess."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from specs_metric.demo.grounding import (
    Batches,
    Recipe,
    World,
    head,
    merge_worlds,
    pretrain_grounded,
    world_arrays,
    world_intrinsic,
)
from specs_metric.processing.tokenizer import EOT_ID, default_tokenizer
from specs_metric.processing.transform import normalize_pixels, preprocess
from specs_metric.synth import generate
from specs_metric.training.loss import grounding_loss


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("grounding-world")
    generate(out, n=20, seed=11, test_fraction=0.25)  # 64 px: the recipe model's size
    return out


def _ids(text: str) -> list[int]:
    ids = default_tokenizer().token_ids(text)
    return ids if len(ids) <= 248 else ids[:247] + [EOT_ID]


def test_grounding_loss_by_hand():
    # unit axes: cos(true_j, owner image) = 1, cos(false_j, owner image) = 0
    images = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # not unit: the loss normalises
    true = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    false = torch.tensor([[0.0, 1.0], [1.0, 0.0], [4.0, 0.0]])
    owner = torch.tensor([0, 1, 1])
    scale = torch.tensor(2.0)
    pair = math.log1p(math.exp(-2.0))  # softplus(0 - 2) for every pair
    assert grounding_loss(images, true, false, owner, scale).item() == pytest.approx(pair)
    # in-batch: each true segment's logits are 2 * [cos with image 0, cos with image 1]
    pick = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    out = grounding_loss(images, true, false, owner, scale, pair_weight=0.5, in_batch=3.0)
    assert out.item() == pytest.approx(0.5 * pair + 3.0 * pick, rel=1e-6)


def test_normalize_pixels_is_preprocess_at_the_model_size():
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    batch = normalize_pixels(torch.from_numpy(arrays))
    for i, array in enumerate(arrays):
        assert torch.allclose(batch[i], preprocess(Image.fromarray(array), 16), atol=1e-6)


def test_world_token_rows_are_the_captions_ids(world_dir):
    data = world_arrays(world_dir, "train", check=0)
    rows = pq.read_table(world_dir / "train.parquet").to_pylist()
    world = World(data)
    batches = Batches(data, torch.device("cpu"))
    assert len(world) == len(batches) == len(rows)
    for i, row in enumerate(rows):
        for k, caption in enumerate(row["captions"]):
            assert world.chain(i, k) == _ids(caption)
            if k:
                assert world.negative(i, k) == _ids(row["neg_captions"][k - 1])
        full = batches.descriptions(torch.tensor([i]))[0].tolist()
        assert [t for t in full if t] == _ids(row["captions"][-1])
        s = int(world.false_first[i])
        false_row = batches.segments[s, : int(batches.segment_len[s])].tolist()
        assert false_row == world.segment(i, 1, true=False)


def test_pairs_are_true_then_false_segments_of_their_image(world_dir):
    data = world_arrays(world_dir, "train", check=0)
    world, batches = World(data), Batches(data, torch.device("cpu"))
    idx = torch.tensor([0, 3, 5])
    rows, owner = batches.pairs(idx, 3, torch.Generator().manual_seed(0))
    n = len(owner)
    assert len(rows) == 2 * n and n == 3 * len(idx)  # every scene has >= 4 segments
    segments = {}
    for i in idx.tolist():
        for k in range(1, int(world.n_segs[i])):
            segments[(i, tuple(world.segment(i, k)))] = world.segment(i, k, true=False)
    for j in range(n):
        image = int(idx[owner[j]])
        true = [t for t in rows[j].tolist() if t]
        false = [t for t in rows[n + j].tolist() if t]
        assert segments[(image, tuple(true))] == false


def test_merge_and_head_keep_every_scene(world_dir):
    a = world_arrays(world_dir, "train", check=0)
    b = world_arrays(world_dir, "test", check=0)
    merged = World(merge_worlds([a, b]))
    second = World(b)
    n_a = len(a["n_segs"])
    for i in range(len(second)):
        last = int(second.n_segs[i]) - 1
        assert merged.chain(n_a + i, last) == second.chain(i, last)
        assert merged.negative(n_a + i, 1) == second.negative(i, 1)
    assert len(World(head(a, 2))) == 2 and len(head(a, 2)["tokens"]) == len(a["tokens"])


def test_world_intrinsic_matches_scores_computed_here(world_dir):
    data = world_arrays(world_dir, "test")
    model = Recipe().build(seed=1)
    rates = world_intrinsic(model, data)
    rows = pq.read_table(world_dir / "test.parquet").to_pylist()
    pos, neg = [], []
    with torch.no_grad():
        for i, row in enumerate(rows):
            image = model.encode_image(normalize_pixels(data["pixels"][i : i + 1])).double()
            image = image / image.norm()

            def cos(text: str) -> float:
                emb = model.encode_text(torch.tensor([_ids(text)])).double()  # noqa: B023
                return float((emb / emb.norm() * image).sum())  # noqa: B023

            c = [cos(t) for t in row["captions"]]
            n = [cos(t) for t in row["neg_captions"]]
            pos.append(np.mean([c[k] > c[k - 1] for k in range(1, len(c))]))
            neg.append(np.mean([c[k] > n[k - 1] for k in range(1, len(c))]))
    assert rates.positive == pytest.approx(100 * np.mean(pos))
    assert rates.negative == pytest.approx(100 * np.mean(neg))


def test_pretrain_grounded_runs_both_phases_on_the_schedule(world_dir):
    data = world_arrays(world_dir, "train", check=0)
    recipe = Recipe(pairs=2, in_batch=1.0, warmup=1)
    model = recipe.build(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls, lines = [], []
    pretrain_grounded(
        model, Batches(data, torch.device("cpu")), recipe, parse_steps=2, steps=3, batch=4,
        eval_every=2, on_eval=lambda phase, step: calls.append((phase, step)),
        log=lines.append, log_every=1,
    )  # fmt: skip
    assert calls == [("parse", 2), ("clip", 2), ("final", 3)]
    assert len(lines) == 5 and all("nan" not in line for line in lines)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("visual.") for k in changed)
    assert "token_embedding.weight" in changed

"""SPECSScore: per-sample clamping, accumulation, and DDP synchronisation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from factories import make_state_dict
from specs_metric.models.factory import build_model
from specs_metric.scoring.metric import SPECSScore, specs_score
from specs_metric.scoring.scorer import Scorer
from subprocesses import free_port

CAPTIONS = ["a cat", "a dog on a sofa", "three birds", "a long caption " * 10, "red", "blue"]


def _scorer() -> Scorer:
    return Scorer(build_model(make_state_dict(seed=5)), device="cpu")


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _plain_cosines(scorer: Scorer, pixels: torch.Tensor, captions: list[str]) -> np.ndarray:
    out = []
    with torch.no_grad():
        for p, c in zip(pixels, captions, strict=True):
            a = scorer.model.encode_image(p[None])[0].double()
            b = scorer.model.encode_text(scorer.tokenize([c]))[0].double()
            out.append(float(a @ b / (a.norm() * b.norm())))
    return np.array(out)


@pytest.mark.parametrize("scale", ["specs", "clip-s", "cosine", "torchmetrics"])
def test_metric_equals_mean_of_clamped_pairs(scale):
    scorer = _scorer()
    pixels = _pixels(6)
    cos = _plain_cosines(scorer, pixels, CAPTIONS)
    per_pair = {"specs": np.maximum((cos + 1) / 2, 0), "clip-s": 2.5 * np.maximum(cos, 0),
                "cosine": cos, "torchmetrics": 100 * cos}[scale]
    if scale == "torchmetrics":
        assert per_pair.mean() > 0, "this fixture checks the unclamped mean"
    atol = 1e-4 if scale == "torchmetrics" else 1e-6  # 100 * cos: 100 times the error
    metric = SPECSScore(scorer, scale=scale)
    metric.update(pixels[:4], CAPTIONS[:4])  # two updates of different sizes
    metric.update(pixels[4:], CAPTIONS[4:])
    assert metric.compute() == pytest.approx(per_pair.mean(), abs=atol)
    np.testing.assert_allclose(specs_score(scorer, pixels, CAPTIONS, scale).numpy(), per_pair,
                               atol=atol)


def test_clip_s_clamps_each_pair_before_averaging():
    scorer = _scorer()
    pixels = _pixels(6)
    cos = _plain_cosines(scorer, pixels, CAPTIONS)
    assert (cos < 0).any() and (cos > 0).any(), "the fixture needs both signs"
    metric = SPECSScore(scorer, scale="clip-s")
    metric.update(pixels, CAPTIONS)
    assert metric.compute() == pytest.approx(2.5 * np.maximum(cos, 0).mean(), abs=1e-6)
    assert metric.compute() != pytest.approx(max(2.5 * cos.mean(), 0), abs=1e-6)


def _negative_pairs(scorer: Scorer) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """The fixture's pairs with a negative cosine: their mean is below 0 on every scale."""
    pixels = _pixels(6)
    cos = _plain_cosines(scorer, pixels, CAPTIONS)
    keep = np.flatnonzero(cos < 0)
    assert len(keep) >= 2, "the fixture needs negative pairs"
    return pixels[keep], [CAPTIONS[i] for i in keep], cos[keep]


def test_torchmetrics_scale_clamps_after_averaging():
    # torchmetrics' CLIPScore: max(100 * mean cosine, 0), not the mean of clamped pairs.
    scorer = _scorer()
    pixels, captions, cos = _negative_pairs(scorer)
    metric = SPECSScore(scorer, scale="torchmetrics")
    metric.update(pixels[:1], captions[:1])
    metric.update(pixels[1:], captions[1:])
    assert metric.compute() == 0.0
    # A positive mean passes through unchanged, and per-pair scores are not clamped.
    np.testing.assert_allclose(specs_score(scorer, pixels, captions, "torchmetrics").numpy(),
                               100 * cos, atol=1e-4)
    assert (specs_score(scorer, pixels, captions, "cosine").numpy() < 0).all()


class _TorchmetricsAdapter:
    """Our model and tokenizer behind the interface torchmetrics' CLIPScore calls: the
    ``(model, processor)`` pair its ``model_name_or_path`` callable returns."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.config = type("Config", (), {})()  # no text_config: no truncation warning

    def to(self, device):
        return self

    def get_image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.scorer.model.encode_image(pixels)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask) -> torch.Tensor:
        with torch.no_grad():
            return self.scorer.model.encode_text(input_ids)

    def __call__(self, images=None, text=None, **kwargs) -> dict:
        if images is not None:
            return {"pixel_values": torch.stack(images)}
        ids = self.scorer.tokenize(list(text))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("negative", [True, False])
def test_torchmetrics_scale_matches_torchmetrics_clipscore(negative):
    clip_score = pytest.importorskip("torchmetrics.multimodal.clip_score")
    scorer = _scorer()
    if negative:
        pixels, captions, _ = _negative_pairs(scorer)
    else:
        pixels, captions = _pixels(6), CAPTIONS
    adapter = _TorchmetricsAdapter(scorer)
    theirs = clip_score.CLIPScore(model_name_or_path=lambda: (adapter, adapter))
    ours = SPECSScore(scorer, scale="torchmetrics")
    for part in (slice(0, 1), slice(1, None)):
        theirs.update(list(pixels[part]), captions[part])
        ours.update(pixels[part], captions[part])
    assert ours.compute() == pytest.approx(float(theirs.compute()), abs=1e-3)


def test_reset_and_empty():
    metric = SPECSScore(_scorer())
    with pytest.raises(RuntimeError, match="before any update"):
        metric.compute()
    metric.update(_pixels(2), CAPTIONS[:2])
    metric.reset()
    assert metric.count == 0


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    pixels = _pixels(6)
    shard = slice(rank * 3, rank * 3 + 3)
    metric = SPECSScore(_scorer())
    metric.update(pixels[shard], CAPTIONS[shard])
    queue.put((rank, metric.compute()))
    dist.destroy_process_group()


def test_state_syncs_across_ddp_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, free_port(), queue), nprocs=2,
                       start_method="spawn")
    results = dict(queue.get(timeout=60) for _ in range(2))
    single = SPECSScore(_scorer())
    single.update(_pixels(6), CAPTIONS)
    assert results[0] == pytest.approx(single.compute(), abs=1e-6)
    assert results[1] == pytest.approx(results[0], abs=1e-12)

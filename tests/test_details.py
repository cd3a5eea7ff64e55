"""``specs bench details``: the AUROC, sentence labels, calibrations and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from factories import make_state_dict
from specs_metric.cli import main
from specs_metric.evaluation.details import (
    auroc,
    caption_z,
    position_means,
    read_graded,
)
from specs_metric.synth import generate


def pair_count_auc(scores, positive):
    """P(score of a positive > score of a negative), ties half, by counting every pair."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_against_pair_counting_and_scipy():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 60))
        scores = np.round(rng.normal(size=n), 1)  # coarse: ties happen
        positive = rng.random(n) < 0.4
        if positive.all() or not positive.any():
            continue
        expected = pair_count_auc(scores.tolist(), positive.tolist())
        assert auroc(scores, positive) == pytest.approx(expected, abs=1e-12)
        u = mannwhitneyu(scores[positive], scores[~positive], alternative="two-sided").statistic
        assert auroc(scores, positive) == pytest.approx(u / (positive.sum() * (~positive).sum()))
    assert auroc([0.3, 0.2], [True, False]) == 1.0
    assert np.isnan(auroc([0.3, 0.2], [True, True]))


def test_position_means_and_caption_z():
    deltas = [np.array([1.0, 2.0, 6.0]), np.array([3.0, 4.0]), np.array([5.0])]
    # positions 0, 1, 2 have 3, 2, 1 sentences; the last position with at least min_count
    # sentences pools every later one
    np.testing.assert_allclose(position_means(deltas, min_count=1), [3.0, 3.0, 6.0])
    np.testing.assert_allclose(position_means(deltas, min_count=2), [3.0, 4.0])
    np.testing.assert_allclose(position_means(deltas, min_count=4), [3.5])
    z = caption_z([np.array([1.0, 3.0]), np.array([2.0, 2.0])])
    np.testing.assert_allclose(z[0], [-1.0, 1.0])
    np.testing.assert_allclose(z[1], [0.0, 0.0])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("details_world")
    generate(d, n=8, seed=3, test_fraction=0.5)
    return d


def test_sentence_labels_follow_the_graded_counts(world):
    # a graded candidate keeps n_correct true facts and adds n_hallucinated false ones
    captions = read_graded(world, "test")
    records = [json.loads(line) for line in (world / "graded_test.jsonl").open()]
    assert len(captions) == len(records)
    for cap, rec in zip(captions, records, strict=True):
        assert cap.caption == rec["caption"]
        assert cap.truth.count(True) == rec["n_correct"]
        assert cap.truth.count(False) == rec["n_hallucinated"]
    assert len(read_graded(world, "test", limit=5)) == 5


def test_details_command_end_to_end(world, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(make_state_dict(seed=1), ckpt)
    out = tmp_path / "details.json"
    args = ["bench", "details", "--model", str(ckpt), "--model", str(ckpt), "--data", str(world)]
    args += ["--limit", "8", "--calibration-limit", "6", "--n-boot", "20", "--json", str(out)]
    assert main([*args, "--no-progress"]) == 0
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert len(results) == 1 * 3 * 4  # one distinct model name x attributions x calibrations
    records = [json.loads(line) for line in (world / "graded_test.jsonl").open()][:8]
    n_false = sum(r["n_hallucinated"] for r in records)
    n_true = sum(r["n_correct"] for r in records)
    for r in results:
        assert (r["n_false"], r["n_true"]) == (n_false, n_true)
        assert 0.0 <= r["auroc"] <= 1.0 and r["ci_low"] <= r["ci_high"]
    assert payload["n_sentences"] == n_true + n_false
    # not a synth folder: one-line error, exit 2
    assert main(["bench", "details", "--model", str(ckpt), "--data", str(tmp_path)]) == 2

"""``benchmarks/speed.py`` on a CPU with tiny models: its JPEG mode, busy fraction and output
keys (what a GPU session runs with ``--device cuda``, checked here in seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from factories import make_state_dict
from specs_metric.data.scorefiles import read_score_rows
from specs_metric.models.factory import build_model
from specs_metric.scoring.scorer import Scorer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def speed():
    if str(BENCHMARKS) not in sys.path:  # speed.py imports its neighbour reference_style
        sys.path.append(str(BENCHMARKS))
    import speed

    return speed


def test_jpeg_mode_scores_equal_the_python_api(speed, tmp_path):
    scorer = Scorer(build_model(make_state_dict(seed=4)), device="cpu")
    root = tmp_path / "jpeg"
    result = speed.jpeg_mode(root, 5, 3, scorer, scorer, "again", workers=1, seed=2)
    assert result["images"] == 5 and result["reference_loop"]["pairs"] == 3
    for name in ("exact", "again"):
        entry = result[name]
        assert entry["pairs_per_s"] > 0 and 0 < entry["forward_busy_fraction"] <= 1
        assert entry["max_abs_delta_score_vs_reference"] < 1e-5
        rows = list(read_score_rows(root / entry["scores_file"]))
        assert [r["error"] for r in rows] == [None] * 5
        files = [root / r["image"] for r in rows]
        assert len({f.read_bytes() for f in files}) == 5  # distinct: nothing cached
        expected = scorer.score(files, [r["caption"] for r in rows])
        np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=0, atol=1e-6)


def test_forward_timer_counts_the_forward_calls_and_restores_the_model(speed):
    scorer = Scorer(build_model(make_state_dict(seed=1)), device="cpu")
    with speed.ForwardTimer(scorer) as timer:
        scorer.embed_texts(["a cat", "a dog on a mat"])
        scorer.encode_pixels(torch.zeros(2, 3, 32, 32))
    assert len(timer.marks) >= 2 and 0 < timer.busy_seconds <= timer.wall
    assert "encode_text" not in vars(scorer.model) and "encode_image" not in vars(scorer.model)


def test_main_reports_throughput_against_the_hardware(speed, tmp_path):
    out = tmp_path / "speed.json"
    argv = ["--size", "tiny", "--captions", "16", "--rounds", "1", "--jpeg-images", "3"]
    argv += ["--jpeg-reference-images", "2", "--peak-size", "128", "--peak-trials", "1"]
    argv += ["--stream-rows", "0", "--stream-full-rows", "0", "--json", str(out)]
    results = speed.main(argv)
    assert results["captions"] == 16 and results["device_policy"]["image_batch"] == 1
    for mode in ("exact", "fast_bf16"):
        entry = results[mode]
        assert set(entry["matmul_peak_fraction"]) == {"model_shaped_gemm", "gemm_128"}
        assert 0 < entry["forward_busy_fraction"]["best_round"] <= 1
        assert entry["speedup"]["best"] > 0
    assert set(results["matmul_peak_gflops"]) == {"fp32", "bf16", "fp32_128", "bf16_128"}
    assert results["gflop_per_image"] > 0 and results["gflop_per_caption_mean"] > 0
    assert {"exact", "fast_bf16", "reference_loop"} <= set(results["jpeg"])
    assert out.exists()

"""The torchmetrics SPECSMetric: its mean equals `specs score`'s, sum-reduced states merge
across processes, and the Lightning example logs the same value with one process and with
two DDP processes (gloo on CPU) without the distributed sampler's padding."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from integration_helpers import DEMO, ROOT, reference_scores
from specs_metric.io.jsonio import read_jsonl
from specs_metric.scoring.scorer import load
from subprocesses import child_env

pytest.importorskip("torchmetrics")

EXAMPLE = ROOT / "examples" / "lightning_specs.py"
DATA = ROOT / "examples" / "captions.jsonl"


@pytest.fixture(scope="module")
def pairs():
    rows = [rec for _, rec in read_jsonl(DATA, objects=True)]
    return [str(DATA.parent / r["image"]) for r in rows], [r["caption"] for r in rows]


@pytest.fixture(scope="module")
def reference(pairs, tmp_path_factory):
    rows = reference_scores(tmp_path_factory.mktemp("ref"), *pairs)
    return float(np.mean([r["score"] for r in rows]))


def test_metric_mean_and_merged_states(pairs, reference):
    from specs_metric.integrations.lightning import SPECSMetric

    scorer = load(DEMO, device="cpu")
    images, captions = pairs
    first, second = SPECSMetric(scorer), SPECSMetric(scorer)
    first.update(images[:7], captions[:7])
    pixels = torch.stack([scorer.preprocess(p) for p in images[7:]])  # preprocessed input
    second.update(pixels, captions[7:])
    assert int(first.count) == 7 and int(second.count) == 8
    first.merge_state(second)  # what the sum reduction does over ranks
    assert float(first.compute()) == pytest.approx(reference, abs=1e-6)
    assert "scorer" not in dict(first.named_modules())  # the weights are no sub-module
    assert list(first.parameters()) == []


def test_torchmetrics_scale_clamps_the_mean():
    from specs_metric.integrations.lightning import SPECSMetric

    scorer = load(DEMO, device="cpu")
    assert torch.isnan(SPECSMetric(scorer).compute())  # nothing seen yet
    metric = SPECSMetric(scorer, scale="torchmetrics")
    metric.total += -5.0  # two pairs with cosines -0.1 and +0.05 (x 100)
    metric.count += 2
    assert float(metric.compute()) == 0.0


@pytest.mark.parametrize("devices", [1, 2], ids=["one-process", "ddp-2-gloo"])
def test_lightning_example_logs_the_specs_score_mean(devices, reference, tmp_path):
    pytest.importorskip("lightning")
    out = tmp_path / "val.json"
    command = [sys.executable, str(EXAMPLE), "--model", DEMO, "--json", str(out)]
    if devices == 2:
        command += ["--devices", "2", "--strategy", "ddp"]
    done = subprocess.run(command, env=child_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=240, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == devices
    # 15 pairs: on 2 ranks a padding sampler would score one of them twice
    assert result["val/specs"] == pytest.approx(reference, abs=1e-6)

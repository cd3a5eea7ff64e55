"""The bundled demo models of the synthetic world (``specs-synth-demo``, ``clip-synth-demo``).

They are written by ``benchmarks/grounding_experiments.py finetune --export-demo`` from a start
pre-trained on a GPU (docs/synthetic-replication.md, last section). These tests check
that they load from the package by name, keep their specificity on scenes of a seed that no
training run used, and score ``examples/`` offline through the ``specs score`` command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from specs_metric.evaluation.intrinsic import run_intrinsic
from specs_metric.evaluation.sdci import load_image_source, read_sdci
from specs_metric.models.weights.pretrained import REGISTRY, resolve
from specs_metric.scoring.scorer import load
from specs_metric.synth import generate
from subprocesses import child_env

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# A world seed never used for training (the replication trains on seed 0 and the examples
# come from seed 1_000_003).
FRESH_SEED = 424_242
DEMOS = ("specs-synth-demo", "clip-synth-demo")


def _env() -> dict[str, str]:
    return child_env(HF_HUB_OFFLINE="1", SPECS_OFFLINE="1")


@pytest.fixture(scope="module")
def fresh_world(tmp_path_factory) -> Path:
    """60 test scenes of an unseen seed (each with a held-out colour-shape pair)."""
    out = tmp_path_factory.mktemp("fresh")
    generate(out, n=60, seed=FRESH_SEED, test_fraction=1.0, graded_per_scene=0)
    return out


@pytest.fixture(scope="module")
def demo():
    return load("specs-synth-demo", device="cpu")


@pytest.mark.parametrize("name", DEMOS)
def test_demo_models_ship_with_the_package(name):
    entry = REGISTRY[name]
    path = resolve(name)
    assert entry.package_file == path.name
    assert path.parent.name == "assets" and path.parent.parent.name == "specs_metric"
    assert path.suffix == ".safetensors"
    assert path.stat().st_size < 8 * 2**20, "keep the bundled demo small"


def test_models_command_lists_the_demos():
    out = subprocess.run(
        [sys.executable, "-m", "specs_metric", "models"],
        env=_env(), capture_output=True, text=True, check=True,
    ).stdout
    for name in DEMOS:
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert "synthetic" in line.lower()
    assert out.count("bundled with the package") >= 2


def test_demo_twins_share_the_architecture_but_not_the_weights():
    specs, clip = (load(name, device="cpu").model for name in DEMOS)
    assert specs.config == clip.config
    assert specs.config.context_length == 248
    differs = [
        name
        for (name, a), (_, b) in zip(
            specs.state_dict().items(), clip.state_dict().items(), strict=True
        )
        if not a.equal(b)
    ]
    assert "text_projection" in differs


def _plain_rates(demo, rows) -> list[tuple[float, float]]:
    """Per-scene rates from one ``score`` call per caption list (no prefix sharing)."""
    out = []
    for row in rows:
        image = load_image_source(row.image)
        c = demo.score([image] * len(row.captions), row.captions, scale="cosine")
        n = demo.score([image] * len(row.neg_captions), row.neg_captions, scale="cosine")
        pos = sum(c[k + 1] > c[k] for k in range(len(c) - 1)) / (len(c) - 1)
        neg = sum(c[k + 1] > n[k] for k in range(len(n))) / len(n)
        out.append((pos, neg))
    return out


def test_demo_specs_is_specific_on_an_unseen_seed(demo, fresh_world):
    """SPECS fine-tuning must show on scenes no training run saw, against its twin.

    Measured with seed 424242 (docs/synthetic-replication.md): specs-synth-demo 91.9 /
    73.8 / 82.9, clip-synth-demo 65.9 / 71.8 / 68.8 (positive / negative / average). The
    project's target of an average >= 85 is not reached by the bundled model.
    """
    rows = read_sdci(fresh_world, split="test")
    assert len(rows) == 60
    result, _ = run_intrinsic(demo, rows)
    twin, _ = run_intrinsic(load("clip-synth-demo", device="cpu"), rows)
    assert result.n_images == twin.n_images == 60
    assert result.positive >= 85.0, result
    assert result.negative >= 65.0, result  # it grounds facts: false details lower the score
    assert result.average >= twin.average + 10.0, (result, twin)
    # The benchmark's prefix-sharing encoder agrees with plain per-caption scoring.
    plain = _plain_rates(demo, rows[:8])
    for (pos, neg), rates in zip(plain, result.per_image[:8], strict=True):
        assert rates.positive == pytest.approx(pos, abs=0.05)
        assert rates.negative == pytest.approx(neg, abs=0.05)


def test_score_command_scores_the_examples_offline(tmp_path):
    rows = [json.loads(line) for line in (EXAMPLES / "captions.jsonl").read_text().splitlines()]
    assert len(rows) >= 9
    for row in rows:
        assert (EXAMPLES / row["image"]).is_file()
    output = tmp_path / "scores.jsonl"
    subprocess.run(
        [sys.executable, "-m", "specs_metric", "score", "--model", "specs-synth-demo",
         "--input", str(EXAMPLES / "captions.jsonl"), "--output", str(output),
         "--device", "cpu", "--no-progress", "--strict"],
        env=_env(), capture_output=True, text=True, check=True, cwd=tmp_path,
    )
    scored = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in scored] == [r["id"] for r in rows]
    by_scene: dict[str, dict[str, float]] = defaultdict(dict)
    for r in scored:
        assert r["error"] is None and 0.0 <= r["score"] <= 1.0
        scene, kind = r["id"].rsplit("-", 1)
        by_scene[scene][kind] = r["score"]
    # The complete true description beats both partial captions. (The demo model does not
    # reliably rank "short" above "short + a false sentence": its negative rate is near
    # chance, see docs/synthetic-replication.md.)
    assert np.mean([s["full"] > s["hallucinated"] for s in by_scene.values()]) > 0.5
    assert np.mean([s["full"] > s["short"] for s in by_scene.values()]) > 0.5

"""Two-process DDP (torchrun, gloo on CPU) reproduces a single-process run with the same
global batch: embeddings are gathered with gradient (also when ranks hold different numbers
of examples), so every logged loss component and the margin match step by step."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from factories import make_state_dict
from specs_metric.models.weights.checkpoint import read_state_dict, save_state_dict
from specs_metric.training.prepare import prepare_dataset
from specs_metric.training.trainer import TrainConfig, train
from subprocesses import child_env, torchrun

COLORS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
COMPONENTS = ("loss", "contrastive", "detail", "negative", "margin", "logit_scale", "lr")

WORKER = """
import json, sys
from specs_metric.training.trainer import TrainConfig, train
train(TrainConfig(**json.loads(sys.argv[1])))
"""


def read_log(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    for color in COLORS:
        Image.new("RGB", (36, 40), color).save(root / f"{color}.png")
    (root / "in.jsonl").write_text("\n".join(json.dumps({
        "image": f"{c}.png",
        "caption": f"A {c} tile lies flat, with a {c} edge around it. It is shiny and clean.",
    }) for c in COLORS))
    prepare_dataset(root / "in.jsonl", root / "t.parquet", progress=False, log_fn=lambda s: None)
    # Corrupt one image after preparation: it is skipped in every epoch, so ranks gather
    # micro-batches of unequal size (1 and 2 examples) in the update that meets it.
    (root / "green.png").write_bytes(b"\x89PNG truncated")
    save_state_dict(make_state_dict(seed=2), root / "init.pt")
    return root


def test_two_process_gloo_matches_single_process(data):
    common = dict(init=str(data / "init.pt"), data=str(data / "t.parquet"), grad_accum=2,
                  max_steps=3, lr=3e-4, warmup_steps=1, workers=0, save_every=0,
                  progress=False, tensorboard=False, seed=11)
    single = train(TrainConfig(output=str(data / "single"), batch_size=4, **common))

    cfg = TrainConfig(output=str(data / "ddp"), batch_size=2, **common)
    script = data / "worker.py"
    script.write_text(WORKER)
    proc = torchrun([str(script), json.dumps(cfg.__dict__)],
                    env=child_env(OMP_NUM_THREADS="1"), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = read_log(single.log_file), read_log(data / "ddp" / "train_log.csv")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        assert b["images"] == a["images"] == 7  # global images per update, one unreadable
        assert b["skipped_images"] == a["skipped_images"] == a["step"]
        for key in COMPONENTS:
            assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    # Rank 0 alone wrote the checkpoint, in both formats.
    weights = read_state_dict(data / "ddp" / "model.safetensors")
    assert weights.keys() == read_state_dict(single.final_checkpoint).keys()
    assert sorted(p.name for p in (data / "ddp" / "checkpoints").iterdir()) == ["step-3"]

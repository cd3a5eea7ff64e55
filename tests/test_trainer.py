"""The trainer on a tiny model and generated images: the schedule, learning, resuming after
a SIGKILL, corrupt images, initialisation from CLIP, and scoring the result."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from factories import make_openai_state_dict, make_state_dict
from specs_metric.cli import main
from specs_metric.models.factory import build_model
from specs_metric.models.weights.checkpoint import read_state_dict, save_state_dict
from specs_metric.processing.tokenizer import default_tokenizer
from specs_metric.training.prepare import prepare_dataset
from specs_metric.training.trainer import TrainConfig, Trainer, lr_factor, train
from subprocesses import child_env

COLORS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]


def caption_for(color: str) -> str:
    return (f"A {color} square fills the frame, with a thin {color} border around it. "
            f"The {color} paint looks fresh and glossy under the light.")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    for color in COLORS:
        Image.new("RGB", (40, 36), color).save(root / f"{color}.png")
    (root / "in.jsonl").write_text("\n".join(
        json.dumps({"image": f"{c}.png", "caption": caption_for(c)}) for c in COLORS))
    prepare_dataset(root / "in.jsonl", root / "train.parquet", progress=False,
                    log_fn=lambda s: None)
    save_state_dict(make_state_dict(seed=0), root / "init.pt")
    return root


@pytest.fixture()
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def config(workdir: Path, out: str, **overrides) -> TrainConfig:
    values = dict(init=str(workdir / "init.pt"), data=str(workdir / "train.parquet"),
                  output=str(workdir / out), batch_size=8, grad_accum=1, max_steps=4,
                  lr=3e-4, warmup_steps=2, workers=0, save_every=0, progress=False,
                  tensorboard=False)
    values.update(overrides)
    return TrainConfig(**values)


def read_log(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def test_lr_schedule_matches_reference_formula():
    # Update k (1-based): warm-up (k + 1) / w while k < w, then half-cosine to 0 at k = T.
    w, total = 40, 100
    assert lr_factor(1, w, total) == pytest.approx(2 / 40)
    assert lr_factor(39, w, total) == pytest.approx(1.0)
    assert lr_factor(40, w, total) == pytest.approx(1.0)
    assert lr_factor(70, w, total) == pytest.approx(0.5)
    assert lr_factor(100, w, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(55, w, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 60)))
    assert lr_factor(3, 0, 3) == pytest.approx(0.0, abs=1e-12)


def evaluate(path: Path, rows: list[dict], margin: float = 1.0) -> tuple[float, float, float]:
    """Contrastive, detail and negative terms over every (row, i) with a fixed margin."""
    from specs_metric.processing.transform import open_image, preprocess

    model = build_model(read_state_dict(path), reference_rounding=False)
    tok = default_tokenizer()
    with torch.no_grad():
        pixels = torch.stack([preprocess(open_image(r["image"]).convert("RGB"), 32) for r in rows])
        img = F.normalize(model.encode_image(pixels), dim=-1)
        scale = model.logit_scale.exp()

        def enc(texts):
            return F.normalize(model.encode_text(tok(texts)), dim=-1)

        cap = enc([r["caption"] for r in rows])
        contrastive = F.cross_entropy(scale * cap @ img.t(), torch.arange(len(rows))).item()
        pairs = [(k, i) for k, row in enumerate(rows) for i in range(len(row["captions"]) - 1)]
        base = enc([rows[k]["captions"][i] for k, i in pairs])
        detail = enc([rows[k]["captions"][i + 1] for k, i in pairs])
        negative = enc([rows[k]["neg_captions"][i] for k, i in pairs])
        own = img[[k for k, _ in pairs]]
        sb, sd, sn = (scale * (x * own).sum(-1) for x in (base, detail, negative))
    return (contrastive, float(F.relu(margin + sb - sd).mean()),
            float(F.relu(margin + sn - sb).mean()))


def test_short_run_lowers_every_loss_component(workdir):
    rows = pq.read_table(workdir / "train.parquet").to_pylist()
    result = train(config(workdir, "learn", max_steps=12))
    before = evaluate(workdir / "init.pt", rows)
    after = evaluate(result.final_checkpoint, rows)
    for name, b, a in zip(("contrastive", "detail", "negative"), before, after, strict=True):
        assert a < 0.7 * b, f"{name}: {b:.4f} -> {a:.4f}"
    log = read_log(result.log_file)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])
    # Logged lr of update k is lr * lr_factor(k).
    assert [r["lr"] for r in log] == pytest.approx([3e-4 * lr_factor(k, 2, 12)
                                                    for k in range(1, 13)])
    assert all(r["images"] == 8 and 0 <= r["margin"] <= 1.5 for r in log)
    assert (workdir / "learn" / "model.safetensors").is_file()


def _killed_run(cfg: TrainConfig, kill_at: int) -> int:
    """Run training in a subprocess that SIGKILLs itself right after checkpoint ``kill_at``."""
    script = (
        "import json, os, signal, sys\n"
        "from specs_metric.training.trainer import TrainConfig, train\n"
        "cfg = TrainConfig(**json.loads(sys.argv[1]))\n"
        "def hook(step, path):\n"
        f"    if step == {kill_at}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "train(cfg, on_checkpoint=hook)\n"
    )
    command = [sys.executable, "-c", script, json.dumps(cfg.__dict__)]
    proc = subprocess.run(command, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    return proc.returncode


def test_kill_and_resume_reaches_the_same_weights(workdir, restore_determinism):
    # 8 rows, batch 2 x 2 accumulation -> 2 updates per epoch; checkpoint 3 is mid-epoch.
    common = dict(batch_size=2, grad_accum=2, max_steps=6, save_every=3, deterministic=True)
    straight = train(config(workdir, "straight", **common))
    cfg = config(workdir, "killed", **common)
    assert _killed_run(cfg, kill_at=3) == -signal.SIGKILL
    assert sorted(p.name for p in (workdir / "killed" / "checkpoints").iterdir()) == ["step-3"]
    resumed = train(config(workdir, "killed", resume="latest", **common))
    assert resumed.steps == 6
    a, b = read_state_dict(straight.final_checkpoint), read_state_dict(resumed.final_checkpoint)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.proj"], read_state_dict(workdir / "init.pt")["visual.proj"])
    assert read_log(straight.log_file) == [
        {**r, "seconds": s["seconds"]}
        for r, s in zip(read_log(resumed.log_file), read_log(straight.log_file), strict=True)
    ]


def test_resume_rejects_a_different_global_batch(workdir):
    train(config(workdir, "small", max_steps=1, batch_size=4))
    with pytest.raises(ValueError, match="global batch"):
        train(config(workdir, "small", max_steps=2, batch_size=2, resume="latest"))


def test_corrupt_image_is_skipped_and_counted(workdir, tmp_path):
    table = pq.read_table(workdir / "train.parquet").to_pylist()
    broken = tmp_path / "broken.png"
    broken.write_bytes(Image.open(workdir / "red.png").tobytes()[:50])  # not an image
    table[2]["image"] = str(broken)
    data = tmp_path / "t.parquet"
    pq.write_table(pq.read_table(workdir / "train.parquet").from_pylist(table), data)
    result = train(config(workdir, "corrupt", data=str(data), max_steps=4, batch_size=4))
    log = read_log(result.log_file)
    assert result.skipped_images == 2  # two epochs over the broken row
    assert sum(r["images"] for r in log) == 4 * 4 - 2
    assert sorted(r["images"] for r in log) == [3, 3, 4, 4]
    assert log[-1]["skipped_images"] == 2


def test_clip_init_freezes_positions_and_clip_objective(workdir):
    save_state_dict(make_openai_state_dict(seed=1), workdir / "openai.pt")
    trainer = Trainer(config(workdir, "fromclip", init=str(workdir / "openai.pt"),
                             objective="clip", max_steps=2, lambda_detail=0, lambda_neg=0))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.run()
    final = read_state_dict(result.final_checkpoint)
    assert final["positional_embedding"].shape[0] == 248
    assert torch.equal(final["positional_embedding"], start["positional_embedding"])
    assert not torch.equal(final["positional_embedding_res"], start["positional_embedding_res"])
    log = read_log(result.log_file)
    assert all(r["detail"] == 0 and r["negative"] == 0 and r["contrastive"] > 0 for r in log)


def test_bf16_on_cpu_runs(workdir):
    result = train(config(workdir, "bf16", precision="bf16", max_steps=2))
    assert all(math.isfinite(r["loss"]) for r in read_log(result.log_file))


def test_trained_checkpoint_scores_through_specs_score(workdir, tmp_path):
    trainer = Trainer(config(workdir, "toscore", max_steps=2))
    result = trainer.run()
    model = trainer.model.eval()
    from specs_metric.processing.transform import open_image, preprocess

    rows = [{"image": str(workdir / f"{c}.png"), "caption": caption_for(c2)}
            for c, c2 in zip(COLORS, COLORS[1:] + COLORS[:1], strict=True)]
    with torch.no_grad():
        img = model.encode_image(torch.stack(
            [preprocess(open_image(r["image"]).convert("RGB"), 32) for r in rows]))
        txt = model.encode_text(default_tokenizer()([r["caption"] for r in rows]))
    expected = ((F.cosine_similarity(img, txt) + 1) / 2).clamp(min=0)
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("model.pt", "model.safetensors"):
        out = tmp_path / f"{name}.jsonl"
        code = main(["score", "--model", str(result.output / name), "--input",
                     str(tmp_path / "rows.jsonl"), "--output", str(out),
                     "--full-precision-weights", "--no-progress"])
        assert code == 0
        scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
        assert scores == pytest.approx(expected.tolist(), abs=1e-5)


def test_cli_train_flags(workdir, capsys):
    out = workdir / "cli"
    code = main(["train", "--init", str(workdir / "init.pt"), "--data",
                 str(workdir / "train.parquet"), "--output", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-4", "--weight-decay",
                 "0", "--warmup-steps", "1", "--lambda-contrast", "1", "--lambda-detail", "2",
                 "--lambda-neg", "0.5", "--margin", "0.3", "--save-every", "1", "--precision",
                 "fp32", "--seed", "7", "--workers", "1", "--quiet", "--no-tensorboard"])
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["lambda_detail"], saved["margin"], saved["seed"]) == (2.0, 0.3, 7)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    log = read_log(out / "train_log.csv")
    assert [r["margin"] for r in log] == [0.3, 0.3]
    capsys.readouterr()
    # the run in --output is not replaced silently (the conventions), and is kept
    again = ["train", "--init", str(workdir / "init.pt"), "--data", str(workdir / "train.parquet")]
    assert main([*again, "--output", str(out), "--max-steps", "1"]) == 2
    assert "holds a training run" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    # --overwrite starts over: the earlier run's step-2 is gone, `--resume latest` cannot
    # pick it up by mistake
    assert main([*again, "--output", str(out), "--max-steps", "1", "--batch-size", "4",
                 "--save-every", "1", "--precision", "fp32", "--workers", "1", "--quiet",
                 "--no-tensorboard", "--overwrite"]) == 0  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert main(["train", "--init", str(workdir / "nope.pt"), "--data",
                 str(workdir / "train.parquet"), "--output", str(workdir / "nope")]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_tensorboard_receives_every_component(workdir, monkeypatch):
    import types

    calls: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("closed", 0.0, 0))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=Writer))
    result = train(config(workdir, "tb", max_steps=2, tensorboard=True))
    log = read_log(result.log_file)
    tags = {tag for tag, _, _ in calls}
    assert {f"train/{k}" for k in ("lr", "loss", "contrastive", "detail", "negative",
                                   "margin", "logit_scale")} <= tags
    assert ("train/detail", log[1]["detail"], 2) in [(t, pytest.approx(v), s) for t, v, s in calls]
    assert calls[-1][0] == "closed"

"""The HF TrainerCallback: a tiny Trainer run on CPU evaluates twice; each time the
callback's generate() captions the images with the model being trained, and the logged
eval_specs equals `specs score`'s mean of those pairs, in log_history, TensorBoard (with a
sample table as text) and an offline W&B run (with a wandb.Table)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from integration_helpers import (
    DEMO,
    EXAMPLE_IMAGES,
    SENTENCES,
    reference_scores,
    tensorboard_events,
    tiny_policy,
    tiny_tokenizer,
    wandb_history,
)

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_callback_logs_specs_at_each_evaluation(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    import torch
    from transformers import Trainer, TrainingArguments

    from specs_metric.integrations.hf import SPECSCallback

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_PROJECT", "specs-tests")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    tok = tiny_tokenizer()
    model = tiny_policy(tok)

    def encode(batch):
        enc = tok(batch["text"], truncation=True, max_length=16, padding="max_length")
        enc["labels"] = [[t if t != tok.pad_token_id else -100 for t in ids]
                         for ids in enc["input_ids"]]  # fmt: skip
        return enc

    data = datasets.Dataset.from_dict({"text": SENTENCES * 4}).map(
        encode, batched=True, remove_columns=["text"]
    )
    generated: list[list[str]] = []

    @torch.no_grad()
    def generate(images):
        """Caption each image with the model being trained (the same prompt for all)."""
        model.eval()
        enc = tok(["describe the image in detail"] * len(images), return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        captions = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        captions = [f"{c} there is a shape" for c in captions]  # never empty
        generated.append(captions)
        return captions

    callback = SPECSCallback(DEMO, EXAMPLE_IMAGES, generate, device="cpu", samples=3)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=2, logging_steps=1,
        save_strategy="no", use_cpu=True, report_to=["tensorboard", "wandb"],
        run_name="specs-callback-test",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      eval_dataset=data.select(range(8)), processing_class=tok)  # fmt: skip
    callback.attach(trainer)
    trainer.train()
    import wandb

    wandb.finish()  # the reporter leaves the run open; a script ends it when it exits

    logged = [h for h in trainer.state.log_history if "eval_specs" in h]
    assert [h["step"] for h in logged] == [2, 4] and len(generated) == 2
    expected = []
    for k, captions in enumerate(generated):
        directory = tmp_path / f"ref{k}"
        directory.mkdir()
        rows = reference_scores(directory, EXAMPLE_IMAGES, captions)
        expected.append(float(np.mean([r["score"] for r in rows])))
    assert [h["eval_specs"] for h in logged] == pytest.approx(expected, abs=1e-6)
    assert all(h["eval_specs_unscored"] == 0 for h in logged)

    events = tensorboard_events(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent)
    scalars = events.Scalars("eval/specs")
    assert [e.step for e in scalars] == [2, 4]
    assert [e.value for e in scalars] == pytest.approx(expected, abs=1e-6)
    texts = events.Tensors("eval/specs_samples/text_summary")
    assert [t.step for t in texts] == [2, 4]
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert table.count("\n") == 4 and generated[1][0].split()[0] in table  # header + 3 rows

    (run,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history = [h for h in wandb_history(run) if "eval/specs" in h]
    assert [h["eval/specs"] for h in history] == pytest.approx(expected, abs=1e-12)
    tables = sorted(run.parent.glob("files/media/table/eval/specs_samples_*.table.json"))
    assert len(tables) == 2
    rows = json.loads(tables[-1].read_text())["data"]
    assert [r[1] for r in rows] == generated[1][:3]

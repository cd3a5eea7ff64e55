"""The TRL reward: equal to `specs score` on the same pairs (standard and conversational
formats, images as paths, PIL images or bytes, per completion or per prompt), None with one
logged reason for pairs that cannot be scored, and real GRPOTrainer steps on CPU."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from integration_helpers import (
    CAPTIONS,
    DEMO,
    EXAMPLE_IMAGES,
    reference_scores,
    tiny_policy,
    tiny_tokenizer,
)
from specs_metric.errors import UsageError
from specs_metric.integrations.trl import SPECSReward
from specs_metric.scoring.scorer import load

TOL = 1e-6
# TRL 1.x passes transformers 5 the old name gradient_checkpointing: harmless FutureWarnings
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def reward():
    return SPECSReward(load(DEMO, device="cpu"), image_column="image_path")


def _close(got, rows):
    assert len(got) == len(rows)
    for value, row in zip(got, rows, strict=True):
        if row["error"] is not None:
            assert value is None, row
        else:
            assert value == pytest.approx(row["score"], abs=TOL)


def test_standard_format_equals_specs_score(reward, tmp_path):
    prompts = ["describe the image in detail"] * len(CAPTIONS)
    got = reward(prompts=prompts, completions=CAPTIONS, completion_ids=[[1]] * len(CAPTIONS),
                 image_path=EXAMPLE_IMAGES, trainer_state=None)  # fmt: skip
    assert all(isinstance(v, float) for v in got)
    _close(got, reference_scores(tmp_path, EXAMPLE_IMAGES, CAPTIONS))
    assert reward.__name__ == "specs"


def test_conversational_pil_images_one_per_prompt(tmp_path):
    """TRL's VLM layout: a column named ``image`` of PIL images; here one per prompt,
    repeated over two generations each, and the assistant's content is the caption."""
    reward = SPECSReward(load(DEMO, device="cpu"))  # image_column="image"
    images = [Image.open(p) for p in EXAMPLE_IMAGES[:3]]
    prompts = [[{"role": "user", "content": "describe the image"}]] * 3
    texts = CAPTIONS[:3] + CAPTIONS[2:5]  # two generations per prompt
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    got = reward(prompts=prompts, completions=completions, completion_ids=None, image=images)
    expected_images = [p for p in EXAMPLE_IMAGES[:3] for _ in range(2)]
    _close(got, reference_scores(tmp_path, expected_images, texts))


def test_bytes_and_hf_structs(reward, tmp_path):
    data = [open(p, "rb").read() for p in EXAMPLE_IMAGES[:2]]
    cells = [data[0], {"bytes": data[1], "path": "x.png"}, [EXAMPLE_IMAGES[2]]]
    got = reward(completions=CAPTIONS[:3], image_path=cells)
    _close(got, reference_scores(tmp_path, EXAMPLE_IMAGES[:3], CAPTIONS[:3]))


def test_unscorable_rows_are_none_with_the_reason_logged_once(reward, tmp_path, caplog):
    missing = str(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    images = [EXAMPLE_IMAGES[0], missing, str(broken), EXAMPLE_IMAGES[1]]
    texts = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[2], "   "]
    metrics = {}
    with caplog.at_level(logging.WARNING, logger="specs_metric.integrations.trl"):
        got = reward(completions=texts, image_path=images, log_metric=metrics.__setitem__)
        again = reward(completions=texts, image_path=images)
    rows = reference_scores(tmp_path, images, texts)
    _close(got, rows)
    assert got[1:] == [None, None, None] and again == got
    assert metrics == {"specs/unscored_frac": 0.75}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3  # one per reason, none repeated by the second call
    for row in rows[1:]:  # the reasons are `specs score`'s messages for the same rows
        reason = row["error"].split(": ", 1)[1]
        assert sum(reason in w for w in warnings) == 1, (reason, warnings)


def test_column_errors(reward):
    with pytest.raises(UsageError, match="column 'image_path'.*its columns: image"):
        reward(completions=["a"], image=["x.png"])
    with pytest.raises(UsageError, match="3 images for 4 completions"):
        reward(completions=["a"] * 4, image_path=["x.png"] * 3)


class RecordingReward(SPECSReward):
    """The reward, keeping what TRL passed and what it returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns):
        out = super().__call__(prompts, completions, completion_ids, **columns)
        self.calls.append((completions, columns[self.image_column], out))
        return out


@pytest.mark.parametrize("layout", ["standard-paths", "conversational-pil"])
def test_grpo_trainer_steps(layout, tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from specs_metric.integrations.rewards import completion_text

    conversational = layout == "conversational-pil"
    question = "describe the image in detail"
    prompt = [{"role": "user", "content": question}] if conversational else question
    column = "specs_image" if conversational else "image_path"
    data = datasets.Dataset.from_dict({"prompt": [prompt] * 4, column: EXAMPLE_IMAGES[:4]})
    if conversational:
        data = data.cast_column(column, datasets.Image())
    reward = RecordingReward(load(DEMO, device="cpu"), image_column=column)
    tok = tiny_tokenizer()
    config = trl.GRPOConfig(
        output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=2, num_generations=2,
        max_completion_length=12, max_steps=2, learning_rate=1e-4, logging_steps=1,
        report_to=[], use_cpu=True, bf16=False, fp16=False, save_strategy="no",
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(model=tiny_policy(tok), reward_funcs=[reward], args=config,
                              train_dataset=data, processing_class=tok)  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2
    logged = [h for h in trainer.state.log_history if "rewards/specs/mean" in h]
    assert len(logged) == 2
    assert len(reward.calls) == 2
    for completions, images, got in reward.calls:
        texts = [completion_text(c) for c in completions]
        assert all(isinstance(t, str) for t in texts)
        if conversational:  # PIL images decoded from the files by `datasets`
            assert all(isinstance(im, Image.Image) for im in images)
            paths = [EXAMPLE_IMAGES[EXAMPLE_IMAGES.index(im.filename)] for im in images]
        else:
            paths = list(images)
        call_dir = tmp_path / f"ref{len(list(tmp_path.glob('ref*')))}"
        call_dir.mkdir()
        _close(got, reference_scores(call_dir, paths, texts))
    scored = [v for _, _, got in reward.calls for v in got if v is not None]
    means = [h["rewards/specs/mean"] for h in logged]
    assert scored and all(0.0 <= v <= 1.0 for v in means)

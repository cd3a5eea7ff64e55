"""The demo recipe's shared pieces (specs_metric.demo.recipe)."""

from __future__ import annotations

import torch

from factories import make_state_dict
from specs_metric.demo.recipe import DEMO_FILES, Settings, export_demo, segments, token_batch
from specs_metric.models.weights.checkpoint import read_state_dict, save_state_dict
from specs_metric.processing.tokenizer import EOT_ID, SOT_ID, default_tokenizer


def test_token_batch_keeps_eot_last_when_cutting():
    # grounding_experiments.py once cut at 248 ids and dropped the EOT the model pools at.
    tok = default_tokenizer()
    long_text = "a red square on a blue circle " * 60
    short_text = "a cat"
    full = tok.token_ids(long_text)
    assert len(full) > 248
    ids = token_batch([short_text, long_text])
    assert ids.shape == (2, 248)
    assert ids[1].tolist() == full[:247] + [EOT_ID]
    short = tok.token_ids(short_text)
    assert ids[0].tolist() == short + [0] * (248 - len(short))


def test_token_batch_pads_to_the_longest_row_only():
    tok = default_tokenizer()
    texts = ["a cat", "a dog on a red sofa"]
    ids = token_batch(texts)
    lengths = [len(tok.token_ids(t)) for t in texts]
    assert ids.shape == (2, max(lengths))
    assert ids[:, 0].tolist() == [SOT_ID, SOT_ID]
    assert ids[0, lengths[0] - 1] == EOT_ID and ids[1, -1] == EOT_ID


def test_segments_are_the_added_facts():
    row = {"captions": ["A.", "A. B.", "A. B. C."], "neg_captions": ["A. X.", "A. B. Y."]}
    assert segments(row) == (["A.", "B.", "C."], [None, "X.", "Y."])


def test_export_demo_writes_only_into_the_folder_given(tmp_path):
    models = {}
    for arm, seed in (("specs", 1), ("baseline", 2)):
        models[arm] = tmp_path / f"{arm}.safetensors"
        save_state_dict(make_state_dict(seed=seed), models[arm])
    settings = Settings(image_size=32)
    out = export_demo(models, tmp_path / "demo", settings, tmp_path / "work")
    assert sorted(p.name for p in out.iterdir()) == sorted([*DEMO_FILES.values(), "examples"])
    for arm, name in DEMO_FILES.items():
        exported = read_state_dict(out / name)
        source = read_state_dict(models[arm])
        for key, value in source.items():
            assert exported[key].dtype == (torch.float16 if value.is_floating_point()
                                           else value.dtype)  # fmt: skip
            assert torch.equal(exported[key].float(), value.half().float())
    lines = (out / "examples" / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 15 and len(list((out / "examples" / "images").iterdir())) == 5

"""Where models come from: hf:ORG/REPO through the hub cache, `specs models`, literal
special tokens in captions, and the crop rounding of the two preprocessing pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from factories import make_state_dict
from specs_metric.cli import main
from specs_metric.models.weights import pretrained
from specs_metric.models.weights.checkpoint import save_state_dict
from specs_metric.processing.preprocess import PreprocessConfig
from specs_metric.processing.tokenizer import EOT_ID, SOT_ID, Tokenizer, literal_special_warning
from specs_metric.processing.transform import center_crop, preprocess
from specs_metric.scoring.scorer import load

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding acme/tiny-clip (an HF folder converted from a tiny model)."""
    from huggingface_hub import constants

    src = save_state_dict(make_state_dict(seed=1, context_length=77), tmp_path / "m.pt")
    snapshot = tmp_path / "hub" / "models--acme--tiny-clip" / "snapshots" / COMMIT
    assert main(["convert", str(src), str(snapshot)]) == 0
    refs = tmp_path / "hub" / "models--acme--tiny-clip" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("SPECS_OFFLINE", "1")
    return {"src": src, "snapshot": snapshot}


def test_hf_spec_resolves_through_the_cache_offline(hub_cache):
    assert pretrained.resolve("hf:acme/tiny-clip") == hub_cache["snapshot"]
    scorer = load("hf:acme/tiny-clip", device="cpu")
    direct = load(hub_cache["src"], device="cpu", preprocess="reference")
    assert scorer.name == "hf:acme/tiny-clip"
    assert scorer.checkpoint_sha256 != direct.checkpoint_sha256  # the HF file is hashed
    texts = ["a cat", "a red ball"]
    torch.testing.assert_close(scorer.embed_texts(texts), direct.embed_texts(texts))


def test_hf_spec_not_cached_offline_is_a_clear_error(hub_cache, capsys):
    with pytest.raises(pretrained.ModelNotAvailableError, match="hf:acme/other"):
        pretrained.resolve("hf:acme/other")
    rows = hub_cache["src"].parent / "rows.jsonl"
    rows.write_text('{"image": "x.png", "caption": "a"}\n')
    code = main(["score", "--model", "hf:acme/other@v1", "--input", str(rows), "--output",
                 str(rows.with_suffix(".out.jsonl"))])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "hf:acme/other@v1" in err and "--model DIR" in err
    with pytest.raises(FileNotFoundError, match="expected hf:ORG/REPO"):
        pretrained.resolve("hf:no-slash")


def test_models_lists_cached_state(hub_cache, monkeypatch, capsys):
    entry = pretrained.PretrainedModel(
        "tiny-hf", "a tiny HF model", hf_repo="acme/tiny-clip", layout="hf"
    )
    missing = pretrained.PretrainedModel(
        "gone-hf", "not downloaded", hf_repo="acme/gone", layout="hf"
    )
    monkeypatch.setitem(pretrained.REGISTRY, "tiny-hf", entry)
    monkeypatch.setitem(pretrained.REGISTRY, "gone-hf", missing)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "source: hf:acme/tiny-clip (cached; arch openai)" in out
    assert "source: hf:acme/gone (not cached; arch openai)" in out
    assert "(specs-synth-demo.safetensors) (cached; arch openai)" in out


def test_registry_hf_entries_are_checked_against_their_arch():
    for entry in pretrained.REGISTRY.values():
        from specs_metric.models.archs import ARCHS

        assert entry.arch in ARCHS, entry.name
        assert entry.layout in ("openai", "hf")


# ------------------------------------------------------------ literal special tokens


def test_literal_endoftext_keeps_reference_ids_and_warns():
    tok = Tokenizer()
    ids = tok.token_ids("A cat <|endoftext|> and a dog")
    assert ids == [SOT_ID, *tok.encode("a cat"), EOT_ID, *tok.encode("and a dog"), EOT_ID]
    assert "text after it is ignored" in literal_special_warning(ids)
    assert literal_special_warning(tok.token_ids("a cat and a dog")) is None
    assert "startoftext" in literal_special_warning(tok.token_ids("x <|startoftext|> y"))


def test_score_marks_rows_with_a_literal_endoftext(tmp_path, capsys):
    save_state_dict(make_state_dict(seed=2), tmp_path / "m.pt")
    Image.new("RGB", (40, 32), "red").save(tmp_path / "a.png")
    captions = ["a red square <|endoftext|> with a blue ring", "a red square", "a blue ring"]
    (tmp_path / "rows.jsonl").write_text(
        "".join(json.dumps({"image": "a.png", "caption": c}) + "\n" for c in captions)
    )
    out = tmp_path / "out.jsonl"
    rows_file = tmp_path / "rows.jsonl"
    assert main(["score", "--model", str(tmp_path / "m.pt"), "--input", str(rows_file),
                 "--output", str(out), "--no-progress"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().err)
    assert summary["n_warnings"] == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "literal <|endoftext|>" in rows[0]["warning"]
    assert rows[1]["warning"] is None and rows[2]["warning"] is None
    # cut at the literal token, as the reference does: the score of the text before it
    assert rows[0]["cosine"] == pytest.approx(rows[1]["cosine"], abs=1e-6)
    from specs_metric.jobs.results import summarize

    assert summarize(out)["n_warnings"] == 1


# ------------------------------------------------------------------ crop rounding


def test_crop_offsets_round_or_floor():
    array = np.arange(19 * 16 * 3, dtype=np.uint8).reshape(19, 16, 3)  # height 19
    image = Image.fromarray(array)
    # (19 - 16) / 2 = 1.5: the reference rounds half to even (2), HF floors (1)
    assert np.array_equal(np.asarray(center_crop(image, 16, "round")), array[2:18])
    assert np.array_equal(np.asarray(center_crop(image, 16, "floor")), array[1:17])
    hf_style = PreprocessConfig(resize=16, crop_rounding="floor", mean=(0, 0, 0), std=(1, 1, 1))
    pixels = preprocess(image, hf_style)
    expected = torch.from_numpy(array[1:17].astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(pixels, expected)


def test_image_cache_keys_follow_preprocessing_and_architecture(tmp_path):
    src = save_state_dict(make_state_dict(seed=3), tmp_path / "m.pt")
    assert main(["convert", str(src), str(tmp_path / "hf")]) == 0  # its pipeline floors
    Image.effect_noise((32, 35), 80).convert("RGB").save(tmp_path / "a.png")  # 1.5 px offset
    (tmp_path / "rows.jsonl").write_text('{"image": "a.png", "caption": "a noisy picture"}\n')
    cosines = {}
    for choice in ("auto", "reference"):
        out = tmp_path / f"{choice}.jsonl"
        argv = ["score", "--model", str(tmp_path / "hf"), "--input", str(tmp_path / "rows.jsonl"),
                "--output", str(out), "--no-progress", "--cache-dir", str(tmp_path / "cache"),
                "--preprocess", choice]  # fmt: skip
        assert main(argv) == 0
        cosines[choice] = json.loads(out.read_text())["cosine"]
    direct = load(tmp_path / "hf", device="cpu", preprocess="reference")
    expected = direct.score([tmp_path / "a.png"], ["a noisy picture"], scale="cosine")[0]
    assert cosines["reference"] == pytest.approx(expected, abs=1e-6)  # not the cached one
    assert cosines["auto"] != pytest.approx(cosines["reference"], abs=1e-6)
    assert direct.pipeline_fingerprint == "32"  # reference pipeline: the key is unchanged
    arch = tmp_path / "gelu.json"
    arch.write_text(json.dumps({"activation": "gelu"}))
    assert load(src, device="cpu", arch=arch).pipeline_fingerprint.startswith("32|gelu")

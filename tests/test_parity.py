"""Parity with the SPECS reference implementation.

The expected values in ``tests/data/reference`` were computed by the reference code itself
(``make_fixtures.py`` there says how), on the tiny checkpoints and images of
``tests/factories.py``. Here the project's own tokenizer, preprocessing, checkpoint reading
and model reproduce them: token ids exactly, pixels, embeddings and scores within 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import factories
import specs_metric
from specs_metric.models.factory import build_model, load_state_dict
from specs_metric.models.weights.checkpoint import clip_to_longclip, stretch_positional_embedding
from specs_metric.processing.tokenizer import Tokenizer
from specs_metric.processing.transform import open_image, preprocess
from specs_metric.scoring.scorer import Scorer

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
ATOL = 1e-5


def _json(name: str) -> dict:
    with open(REFERENCE / name, encoding="utf-8") as f:
        return json.load(f)


TOKENS = _json("tokens.json")
PREPROCESS = _json("preprocess.json")
MODELS = _json("model.json")


def test_fixtures_were_made_from_the_committed_images():
    """The images on disk are the ones the reference saw (their decoded pixels agree)."""
    for name, entry in PREPROCESS["images"].items():
        path = factories.image_file(name)
        assert path.name == entry["file"]
        img = open_image(path)
        assert img.mode == entry["decoded_mode"], name
        assert list(img.size) == entry["decoded_size"], name
        decoded = float(np.asarray(img, dtype=np.float64).sum())
        assert decoded == entry["decoded_sum"], (
            f"{name}: this Pillow decodes the file differently from the one in meta.json"
        )


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.mark.parametrize("record", TOKENS["texts"], ids=lambda r: r["label"])
def test_token_ids_match_reference(tokenizer, record):
    length = TOKENS["context_length"]
    expected = record["ids"] + [0] * (length - len(record["ids"]))
    ids = tokenizer([record["text"]], context_length=length, long_captions="truncate")
    assert ids.shape == (1, length)
    assert ids.dtype == torch.long
    assert ids[0].tolist() == expected
    assert tokenizer.encode(record["text"]) == record["bpe"]
    if record["raises_without_truncate"]:
        with pytest.raises(ValueError, match="caption 0"):
            tokenizer([record["text"]], context_length=length, long_captions="error")
    else:
        strict = tokenizer([record["text"]], context_length=length, long_captions="error")
        assert strict[0].tolist() == expected


def test_token_ids_batch_matches_reference_rows(tokenizer):
    records = TOKENS["texts"]
    ids, truncated = tokenizer.batch([r["text"] for r in records], 248, "truncate")
    for row, record in enumerate(records):
        assert ids[row, : len(record["ids"])].tolist() == record["ids"], record["label"]
        assert not ids[row, len(record["ids"]) :].any(), record["label"]
        assert truncated[row] == record["raises_without_truncate"], record["label"]


@pytest.mark.parametrize("record", TOKENS["context_77"], ids=lambda r: r["label"])
def test_token_ids_clip_context_match_reference(tokenizer, record):
    ids = tokenizer([record["text"]], context_length=77, long_captions="truncate")
    assert ids[0].tolist() == record["ids"]


# --------------------------------------------------------------------------- preprocessing


@pytest.fixture(scope="module")
def full32() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "preprocess_32.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("name", list(PREPROCESS["images"]))
@pytest.mark.parametrize("resolution", PREPROCESS["resolutions"])
def test_preprocess_matches_reference(name, resolution, full32):
    expected = PREPROCESS["images"][name][str(resolution)]
    assert "error" not in expected, "the reference refused this image; update the test"
    pixels = preprocess(open_image(factories.image_file(name)), resolution)
    assert pixels.dtype == torch.float32
    assert list(pixels.shape) == expected["shape"]
    summary = factories.pixel_summary(pixels.numpy())
    # Sample values within ATOL; the sums within ATOL per pixel.
    np.testing.assert_allclose(summary["samples"], expected["samples"], rtol=0, atol=ATOL)
    count = resolution * resolution
    np.testing.assert_allclose(summary["sum"], expected["sum"], rtol=0, atol=ATOL * count)
    np.testing.assert_allclose(
        summary["sum_sq"], expected["sum_sq"], rtol=0, atol=ATOL * count * 10
    )
    if resolution == 32:
        np.testing.assert_allclose(pixels.numpy(), full32[name], rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- models

LONGCLIP_MODELS = [k for k, v in MODELS["models"].items() if v["kind"] == "longclip"]
OPENAI = MODELS["models"]["openai_tiny"]


@pytest.fixture(scope="module")
def image_paths() -> list[Path]:
    return [factories.image_file(name) for name in MODELS["images"]]


@pytest.fixture(scope="module", params=LONGCLIP_MODELS)
def longclip_case(request, tmp_path_factory):
    """(scorer loaded from a reference-layout .pt file, reference outputs)."""
    entry = MODELS["models"][request.param]
    path = tmp_path_factory.mktemp("ckpt") / f"{request.param}.pt"
    factories.write_checkpoint(factories.make_state_dict(**entry["config"]), path, "pt")
    return specs_metric.load(path, device="cpu"), entry


def test_embeddings_match_reference(longclip_case, image_paths):
    scorer, entry = longclip_case
    images = scorer.embed_images(image_paths)
    texts = scorer.embed_texts(MODELS["captions"])
    assert images.dtype == texts.dtype == torch.float32
    np.testing.assert_allclose(images.numpy(), entry["image_embeddings"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(texts.numpy(), entry["text_embeddings"], rtol=0, atol=ATOL)


def test_embeddings_do_not_depend_on_batching(longclip_case, image_paths):
    """One caption at a time (no padding shared with longer rows) gives the same result."""
    scorer, entry = longclip_case
    for i, caption in enumerate(MODELS["captions"]):
        single = scorer.embed_texts([caption])[0].numpy()
        np.testing.assert_allclose(single, entry["text_embeddings"][i], rtol=0, atol=ATOL)
    image = scorer.embed_images([image_paths[1]])[0].numpy()
    np.testing.assert_allclose(image, entry["image_embeddings"][1], rtol=0, atol=ATOL)


def test_score_matrix_matches_reference(longclip_case, image_paths):
    scorer, entry = longclip_case
    captions = MODELS["captions"]
    specs = scorer.score_matrix(image_paths, captions)
    assert specs.dtype == np.float64
    assert specs.shape == (len(image_paths), len(captions))
    np.testing.assert_allclose(specs, entry["specs"], rtol=0, atol=ATOL)
    cosine = scorer.score_matrix(image_paths, captions, scale="cosine")
    np.testing.assert_allclose(cosine, entry["cosine"], rtol=0, atol=ATOL)


def test_pair_scores_match_reference(longclip_case, image_paths):
    scorer, entry = longclip_case
    captions = MODELS["captions"]
    # Every (image, caption) pair, with images repeated, as 1:1 rows.
    rows = [(i, j) for i in range(len(image_paths)) for j in range(len(captions))]
    scores = scorer.score([image_paths[i] for i, _ in rows], [captions[j] for _, j in rows])
    expected = [entry["specs"][i][j] for i, j in rows]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- CLIP -> LongCLIP


def _stretch_arrays() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "stretch.npz") as data:
        return {k: data[k] for k in data.files}


def test_stretch_positional_embedding_matches_reference():
    arrays = _stretch_arrays()
    # this fixture applies the stretching formula in fp32 (no fp16 rounding): exact mode
    out = stretch_positional_embedding(torch.from_numpy(arrays["input"]), exact=True)
    assert out.shape == (248, 64)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), arrays["output"], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def openai_archive(tmp_path_factory) -> Path:
    """The OpenAI-style TorchScript archive (fp16 weights, 77 positions) of model.json."""
    sd = factories.openai_half(factories.make_openai_state_dict(**OPENAI["config"]))
    path = tmp_path_factory.mktemp("openai") / "openai_tiny.pt"
    return factories.write_checkpoint(sd, path, "torchscript")


def test_openai_archive_matches_reference_given_its_positional_table(openai_archive, image_paths):
    """CLIP -> LongCLIP embeddings equal ``load_from_clip``'s once the tables agree.

    ``load_from_clip`` stretches the table in fp16 arithmetic (the model's dtype at that
    point), so here the reference's own stretched table is put in; everything else (reading
    the archive, fp16 weights, the model) is the project's.
    """
    state = load_state_dict(openai_archive, longclip=True)
    table = torch.from_numpy(_stretch_arrays()["openai_tiny_output"])
    state["positional_embedding"] = table
    state["positional_embedding_res"] = table.clone()
    scorer = Scorer(build_model(state), device="cpu")
    images = scorer.embed_images(image_paths).numpy()
    texts = scorer.embed_texts(MODELS["captions"]).numpy()
    np.testing.assert_allclose(images, OPENAI["image_embeddings"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(texts, OPENAI["text_embeddings"], rtol=0, atol=ATOL)
    specs = scorer.score_matrix(image_paths, MODELS["captions"])
    np.testing.assert_allclose(specs, OPENAI["specs"], rtol=0, atol=ATOL)


def test_clip_to_longclip_stretches_like_load_from_clip():
    """The project's stretch of the archive's table against the reference's fp16 one.

    The reference rounds every intermediate to fp16 (max difference from the exact formula
    about 2e-5 on a table of std 0.01); the project reproduces that arithmetic by default.
    """
    arrays = _stretch_arrays()
    sd = factories.make_openai_state_dict(**OPENAI["config"])
    np.testing.assert_array_equal(sd["positional_embedding"].numpy(), arrays["openai_tiny_input"])
    out = clip_to_longclip(sd)
    for key in ("positional_embedding", "positional_embedding_res"):
        np.testing.assert_allclose(
            out[key].float().numpy(), arrays["openai_tiny_output"], rtol=0, atol=1e-6
        )

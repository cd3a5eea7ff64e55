"""Intrinsic benchmark: the three rates, prefix-sharing text encoding, sDCI reading, CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from factories import make_state_dict
from specs_metric.cli import main
from specs_metric.evaluation.intrinsic import image_rates, intrinsic_rates, run_intrinsic
from specs_metric.evaluation.sdci import SdciFormatError, load_image_source, read_sdci
from specs_metric.models.factory import build_model
from specs_metric.models.prefix import encode_chains
from specs_metric.models.weights.checkpoint import save_state_dict
from specs_metric.processing.tokenizer import default_tokenizer
from specs_metric.scoring.scorer import Scorer
from specs_metric.synth import generate


def plain_rates(caption_scores, neg_scores):
    """Guide §6 written out with loops (independent of the library)."""
    pos, neg = [], []
    for caps, negs in zip(caption_scores, neg_scores, strict=True):
        n = len(caps)
        if n - 1 < 2:
            continue
        up = 0
        for k in range(n - 1):
            if caps[k + 1] > caps[k]:
                up += 1
        pos.append(up / (n - 1))
        beat = 0
        for k in range(1, n):  # n_k pairs with c_k and is stored at index k - 1
            if caps[k] > negs[k - 1]:
                beat += 1
        neg.append(beat / (n - 1))
    p = 100 * sum(pos) / len(pos)
    q = 100 * sum(neg) / len(neg)
    return p, q, (p + q) / 2


# ---------------------------------------------------------------- rates


def test_rates_hand_computed():
    caps = [[0.1, 0.2, 0.15, 0.3], [0.4, 0.3], [0.5, 0.5, 0.6], [0.9]]
    negs = [[0.05, 0.2, 0.1], [0.1], [0.5, 0.7], []]
    result = intrinsic_rates(caps, negs)
    # image 0: ups 2/3, beats 2/3; image 1 and 3 skipped; image 2: ups 1/2 (tie fails), beats 0
    assert result.positive == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert result.negative == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert result.average == pytest.approx((result.positive + result.negative) / 2)
    assert (result.n_images, result.n_skipped) == (2, 2)
    assert result.per_image[1].positive is None and result.per_image[3].negative is None


def test_rates_match_plain_loop_on_random_tables():
    rng = np.random.default_rng(0)
    caps, negs = [], []
    for _ in range(200):
        n = int(rng.integers(1, 12))
        c = np.round(rng.normal(size=n), 1)  # coarse values: ties happen
        caps.append(c.tolist())
        negs.append(np.round(rng.normal(size=n - 1), 1).tolist())
    result = intrinsic_rates(caps, negs)
    expected = plain_rates(caps, negs)
    assert (result.positive, result.negative, result.average) == pytest.approx(expected, abs=1e-9)


def test_rates_errors():
    with pytest.raises(ValueError, match="negatives"):
        image_rates([0.1, 0.2, 0.3], [0.1])
    with pytest.raises(ValueError, match="nothing to score"):
        intrinsic_rates([[0.1, 0.2]], [[0.0]])


# ---------------------------------------------------------------- prefix reuse


def _model(width: int, layers: int, seed: int = 0):
    sd = make_state_dict(seed=seed, text_width=width, text_layers=layers, embed_dim=32)
    return build_model(sd, reference_rounding=False)


def _plain(model, texts):
    """Every caption through model.encode_text, padded to the full context (rows independent)."""
    with torch.inference_mode():
        return model.encode_text(default_tokenizer()(texts, context_length=248))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(out, n=15, seed=3)
    return out


@pytest.mark.parametrize("width,layers", [(64, 1), (128, 2)])
def test_prefix_reuse_equals_plain_encoding(world, width, layers):
    model = _model(width, layers)
    tok = default_tokenizer()
    rows = pq.read_table(world / "test.parquet").to_pylist()
    chains = [r["captions"] + r["neg_captions"] for r in rows[:2]]
    long_text = " ".join(["a red star is left of the blue ring."] * 40)  # truncated to 248
    chains.append(["a cat", "a cat on a mat", "the dog is brown.", "a cat on a mat." + long_text])
    chains.append(["one caption only"])
    token_chains = [[tok(t, context_length=248)[0] for t in ch] for ch in chains]
    token_chains = [[ids[: int(ids.argmax()) + 1].tolist() for ids in ch] for ch in token_chains]
    with torch.inference_mode():
        got = encode_chains(model, token_chains, max_suffix=8)
    for texts, emb in zip(chains, got, strict=True):
        expected = _plain(model, texts)
        assert emb.shape == expected.shape
        torch.testing.assert_close(emb, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- reading sDCI data


def _png_bytes(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


ROWS = [
    {"captions": ["a", "a b", "a b c"], "neg_captions": ["a x", "a b y"]},
    {"captions": ["d", "d e"], "neg_captions": ["d z"]},
]


def test_read_hf_datasets_directory(tmp_path):
    root = tmp_path / "dci.hf"
    split_dir = root / "test"
    split_dir.mkdir(parents=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    table = pa.table(
        {
            "image": [{"bytes": _png_bytes("red"), "path": None}, {"bytes": None, "path": "x.png"}],
            "captions": [r["captions"] for r in ROWS],
            "neg_captions": [r["neg_captions"] for r in ROWS],
        }
    )
    with pa.OSFile(str(split_dir / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (split_dir / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    rows = read_sdci(root)
    assert [r.captions for r in rows] == [r["captions"] for r in ROWS]
    assert load_image_source(rows[0].image) == _png_bytes("red")
    assert load_image_source(rows[1].image) == str(root / "x.png")
    with pytest.raises(SdciFormatError, match="no split 'validation'"):
        read_sdci(root, split="validation")


def test_read_jsonl_and_parquet(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"image": "img/a.png", "id": i, **r}) + "\n" for i, r in enumerate(ROWS))
    )
    rows = read_sdci(jsonl)
    assert rows[0].image == str(tmp_path / "img/a.png") and rows[1].id == "1"
    pq.write_table(pa.Table.from_pylist([{"image": "/abs/a.png", **r} for r in ROWS]),
                   tmp_path / "test.parquet")
    rows = read_sdci(tmp_path)
    assert load_image_source(rows[0].image) == "/abs/a.png" and rows[1].neg_captions == ["d z"]
    # an absolute path from another machine is looked up by name under --image-root
    rows = read_sdci(tmp_path / "test.parquet", image_root=tmp_path / "elsewhere")
    assert load_image_source(rows[0].image) == str(tmp_path / "elsewhere" / "a.png")


def test_read_errors_name_the_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", **ROWS[0]}) + "\n"
                   + json.dumps({"image": "a.png", "captions": ["a", "a b"], "neg_captions": []}))
    with pytest.raises(SdciFormatError, match=r"bad.jsonl, row 1: 2 captions need 1"):
        read_sdci(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "a.png", "captions": ["a"]}) + "\n")
    with pytest.raises(SdciFormatError, match="row 0: missing column"):
        read_sdci(missing)


# ---------------------------------------------------------------- end to end


def test_run_intrinsic_equals_plain_guide_computation(world):
    scorer = Scorer(_model(64, 2, seed=1), device="cpu")
    rows = read_sdci(world, split="test")
    result, scores = run_intrinsic(scorer, rows, chains_per_batch=2)
    caps, negs = [], []
    for row in rows:
        image = load_image_source(row.image)
        c = scorer.score([image] * len(row.captions), row.captions, scale="cosine")
        n = scorer.score([image] * len(row.neg_captions), row.neg_captions, scale="cosine")
        caps.append(c.tolist())
        negs.append(n.tolist())
    for got, c, n in zip(scores, caps, negs, strict=True):
        np.testing.assert_allclose(got.captions, c, atol=1e-5)
        np.testing.assert_allclose(got.negatives, n, atol=1e-5)
    expected = plain_rates(caps, negs)
    assert (result.positive, result.negative, result.average) == pytest.approx(expected)


def test_images_as_bytes_in_a_datasets_folder(world, tmp_path):
    """The same rows with embedded image bytes (datasets Image struct) give the same scores."""
    scorer = Scorer(_model(64, 1, seed=4), device="cpu")
    records = pq.read_table(world / "test.parquet").to_pylist()[:3]
    table = pa.table(
        {
            "image": [{"bytes": (world / r["image"]).read_bytes(), "path": None} for r in records],
            "captions": [r["captions"] for r in records],
            "neg_captions": [r["neg_captions"] for r in records],
        }
    )
    folder = tmp_path / "single.hf"
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    from_bytes = run_intrinsic(scorer, read_sdci(folder))[1]
    from_paths = run_intrinsic(scorer, read_sdci(world, split="test")[:3])[1]
    for a, b in zip(from_bytes, from_paths, strict=True):
        assert a.captions == pytest.approx(b.captions, abs=1e-6)
        assert a.negatives == pytest.approx(b.negatives, abs=1e-6)


def test_cli_bench_intrinsic(world, tmp_path, capsys):
    ckpt = tmp_path / "tiny.safetensors"
    save_state_dict(make_state_dict(seed=2, text_layers=1), ckpt)
    out = tmp_path / "intrinsic.json"
    argv = ["bench", "intrinsic", "--model", str(ckpt), "--data", str(world), "--device", "cpu",
            "--json", str(out), "--timing-chains", "2", "--limit", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "positive" in printed
    data = json.loads(out.read_text())
    per = data["per_image"]
    assert len(per) == 3
    expected = plain_rates([p["caption_scores"] for p in per], [p["neg_scores"] for p in per])
    assert (data["positive"], data["negative"], data["average"]) == pytest.approx(expected)
    assert data["timing"]["max_abs_diff"] < 1e-5


def test_cli_reports_bad_data(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "captions": ["a", "a b"], "neg_captions": []}))
    assert main(["bench", "intrinsic", "--model", "unused", "--data", str(bad)]) == 2
    assert "bad.jsonl, row 0" in capsys.readouterr().err

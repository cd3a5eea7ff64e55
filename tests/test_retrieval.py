"""``specs bench retrieval``: Recall@K against plain loops, data layouts, torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from factories import make_state_dict
from specs_metric.cli import main
from specs_metric.errors import ImageError
from specs_metric.evaluation.ranking import recall_from_similarity, retrieval_ranks, target_ranks
from specs_metric.evaluation.retrieval import RetrievalDataError, evaluate_retrieval, read_retrieval
from specs_metric.scoring.scorer import load
from subprocesses import torchrun

# --------------------------------------------------------------------------------------
# Plain reference computation, written independently of the library: sort every query's
# candidates by (similarity descending, index ascending) and look at the first K.


def plain_recall(sim: list[list[float]], owner: list[int], ks) -> dict:
    n_img, n_txt = len(sim), len(sim[0])
    i2t, t2i = {}, {}
    for k in ks:
        hits = 0
        for i in range(n_img):
            order = sorted(range(n_txt), key=lambda j: (-sim[i][j], j))
            if any(owner[j] == i for j in order[:k]):
                hits += 1
        i2t[k] = 100.0 * hits / n_img
        hits = 0
        for j in range(n_txt):
            order = sorted(range(n_img), key=lambda i: (-sim[i][j], i))
            if owner[j] in order[:k]:
                hits += 1
        t2i[k] = 100.0 * hits / n_txt
    return {"image_to_text": i2t, "text_to_image": t2i}


def plain_cosines(img: np.ndarray, txt: np.ndarray) -> list[list[float]]:
    def unit(v):
        n = sum(float(x) * float(x) for x in v) ** 0.5
        return [float(x) / n for x in v]

    a = [unit(v) for v in img]
    b = [unit(v) for v in txt]
    return [[sum(x * y for x, y in zip(u, w, strict=True)) for w in b] for u in a]


KS = (1, 2, 3, 5, 10)


def test_target_ranks_counts_higher_then_earlier_ties():
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]])
    # candidate 2 ties with 1 (earlier, counted) and 4 (later, not counted)
    assert target_ranks(scores, np.array([2])).tolist() == [1]
    assert target_ranks(scores, np.array([1])).tolist() == [0]
    assert target_ranks(scores, np.array([4])).tolist() == [2]
    assert target_ranks(scores, np.array([0])).tolist() == [4]


@pytest.mark.parametrize("seed", range(6))
def test_recall_from_similarity_with_planted_ties(seed):
    rng = np.random.default_rng(seed)
    n_img = int(rng.integers(2, 9))
    owner = np.sort(rng.integers(0, n_img, size=int(rng.integers(n_img, 3 * n_img))))
    owner[:n_img] = np.arange(n_img)  # every image has a caption
    owner = np.sort(owner)
    # Few distinct values: many exact ties, including ties with the true partners.
    sim = rng.integers(0, 3, size=(n_img, len(owner))).astype(np.float64)
    got = recall_from_similarity(sim, owner, KS)
    assert got == plain_recall(sim.tolist(), owner.tolist(), KS)


@pytest.mark.parametrize("chunk", [1, 2, 7, 256])
def test_chunked_ranks_from_embeddings_match_plain(chunk):
    # Entries +-1 in 16 dimensions: normalised values are exactly +-0.25, so every cosine
    # is exact and equal vectors tie exactly.
    rng = np.random.default_rng(chunk)
    img = rng.choice([-1.0, 1.0], size=(9, 16))
    img[4] = img[1]  # identical images
    owner = np.repeat(np.arange(9), [1, 2, 3, 1, 2, 1, 1, 3, 2])
    txt = rng.choice([-1.0, 1.0], size=(len(owner), 16))
    txt[5] = txt[2]  # identical captions of different images
    txt[6] = img[owner[6]]  # a caption equal to its image
    i2t, t2i = retrieval_ranks(torch.tensor(img), torch.tensor(txt), owner, chunk_size=chunk)
    sim = plain_cosines(img, txt)
    want = plain_recall(sim, owner.tolist(), KS)
    for k in KS:
        assert 100.0 * int(np.sum(i2t < k)) / len(i2t) == want["image_to_text"][k]
        assert 100.0 * int(np.sum(t2i < k)) / len(t2i) == want["text_to_image"][k]


# --------------------------------------------------------------------------------------
# Data and a tiny model


def _image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint, 10 images with 1-3 captions each, in several layouts."""
    d = tmp_path_factory.mktemp("retrieval")
    torch.save(make_state_dict(seed=3), d / "tiny.pt")
    (d / "imgs").mkdir()
    words = ["red", "quiet", "river", "stone", "bright", "market", "old", "tower", "glass"]
    pairs = []
    for i in range(10):
        _image(i).save(d / "imgs" / f"{i}.png")
        for j in range(1 + i % 3):
            caption = f"a {words[i % 9]} scene number {i} with {words[(i + j) % 9]} detail {j}"
            pairs.append((f"imgs/{i}.png", caption))
    rows = [{"image": im, "caption": c} for im, c in pairs]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"dir": d, "pairs": pairs, "model": d / "tiny.pt"}


def _plain_from_model(model, images: list[str], captions: list[str], owner: list[int]):
    scorer = load(model, device="cpu")
    img = scorer.embed_images(images).double().numpy()
    txt = scorer.embed_texts(captions).double().numpy()
    sims = plain_cosines(img, txt)
    return plain_recall(sims, owner, (1, 5, 10))


def test_evaluate_retrieval_equals_plain_computation(world):
    data = read_retrieval(world["dir"] / "pairs.jsonl")
    images = sorted({im for im, _ in world["pairs"]}, key=lambda p: int(Path(p).stem))
    assert [Path(p).name for p in data.images] == [Path(p).name for p in images]
    assert data.captions == [c for _, c in world["pairs"]]
    owner = [images.index(im) for im, _ in world["pairs"]]
    assert data.caption_image.tolist() == owner
    result = evaluate_retrieval(load(world["model"], device="cpu"), data, batch_size=4)
    want = _plain_from_model(
        world["model"], [str(world["dir"] / p) for p in images], data.captions, owner
    )
    assert result.image_to_text == want["image_to_text"]
    assert result.text_to_image == want["text_to_image"]
    assert result.n_images == 10 and result.n_captions == len(world["pairs"])


def test_cli_writes_json_and_table(world, tmp_path, capsys):
    out = tmp_path / "r.json"
    other = tmp_path / "other.pt"
    torch.save(make_state_dict(seed=11), other)
    code = main(
        ["bench", "retrieval", "--model", str(world["model"]), "--model", str(other), "--data",
         str(world["dir"] / "pairs.jsonl"), "--json", str(out), "--workers", "1", "--quiet",
         "--device", "cpu", "--max-captions-per-image", "1"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "i2t R@1" in printed and "t2i R@10" in printed and str(other) in printed
    payload = json.loads(out.read_text())
    assert payload["complete"] and len(payload["results"]) == 2
    firsts = {}
    for im, c in world["pairs"]:
        firsts.setdefault(im, c)
    for model, res in zip([world["model"], other], payload["results"], strict=True):
        assert res["n_images"] == 10 and res["n_captions"] == 10  # first caption per image
        want = _plain_from_model(
            model, [str(world["dir"] / im) for im in firsts], list(firsts.values()),
            list(range(10)),
        )
        assert res["image_to_text"] == {f"R@{k}": v for k, v in want["image_to_text"].items()}
        assert res["text_to_image"] == {f"R@{k}": v for k, v in want["text_to_image"].items()}


def test_caption_selection_and_limit(world, tmp_path):
    rows = [
        {"image": f"imgs/{i}.png", "id": f"s{i}", "captions": [f"c{i} one", f"c{i} two"]}
        for i in range(4)
    ]
    src = tmp_path / "chains.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = read_retrieval(src, image_root=world["dir"])
    assert data.captions == [c for r in rows for c in r["captions"]]
    assert data.caption_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert data.image_ids == ["s0", "s1", "s2", "s3"]
    last = read_retrieval(src, image_root=world["dir"], captions="last")
    assert last.captions == [r["captions"][-1] for r in rows]
    first = read_retrieval(src, image_root=world["dir"], captions="first")
    assert first.captions == [r["captions"][0] for r in rows]
    head = data.head(2)
    assert len(head) == 2 and head.captions == data.captions[:4]


def test_csv_parquet_and_bytes(world, tmp_path):
    csv_path = tmp_path / "pairs.csv"
    lines = ["image,caption"] + [f"{im},\"{c}\"" for im, c in world["pairs"]]
    csv_path.write_text("\n".join(lines) + "\n")
    from_csv = read_retrieval(csv_path, image_root=world["dir"])
    from_jsonl = read_retrieval(world["dir"] / "pairs.jsonl")
    assert from_csv.captions == from_jsonl.captions
    assert from_csv.caption_image.tolist() == from_jsonl.caption_image.tolist()

    # parquet with image bytes (Hugging Face Image struct) and caption lists
    groups: dict[str, list[str]] = {}
    for im, c in world["pairs"]:
        groups.setdefault(im, []).append(c)
    table = pa.table(
        {
            "image": [{"bytes": (world["dir"] / im).read_bytes(), "path": im} for im in groups],
            "captions": list(groups.values()),
        }
    )
    (tmp_path / "ds").mkdir()
    pq.write_table(table, tmp_path / "ds" / "test.parquet")
    from_parquet = read_retrieval(tmp_path / "ds")
    assert all(isinstance(im, bytes) for im in from_parquet.images)
    assert from_parquet.captions == from_jsonl.captions
    scorer = load(world["model"], device="cpu")
    a = evaluate_retrieval(scorer, from_parquet)
    b = evaluate_retrieval(scorer, from_jsonl)
    assert a.image_to_text == b.image_to_text and a.text_to_image == b.text_to_image


def test_coco_layout(world, tmp_path):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    images, anns = [], []
    for n, image_id in enumerate([42, 7, 19]):  # not sorted: the reader sorts by id
        name = f"{image_id:012d}.jpg"
        _image(n).save(tmp_path / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "width": 48, "height": 40})
        for j in range(6):  # COCO images have 5-7 captions
            anns.append({"id": len(anns), "image_id": image_id, "caption": f" pic {image_id} {j} "})
    ann_file = tmp_path / "annotations" / "captions_val2017.json"
    ann_file.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    data = read_retrieval(ann_file, max_captions_per_image=5)
    assert data.image_ids == ["7", "19", "42"]
    assert [Path(p).parent.name for p in data.images] == ["val2017"] * 3
    assert data.captions[:5] == [f"pic 7 {j}" for j in range(5)]
    assert len(data.captions) == 15 and data.caption_image.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    with pytest.raises(RetrievalDataError, match="--image-root"):
        moved = tmp_path / "elsewhere.json"
        moved.write_text(ann_file.read_text())
        read_retrieval(moved)


def test_urban1k_layout(world, tmp_path):
    root = tmp_path / "Urban1k"
    (root / "image").mkdir(parents=True)
    (root / "caption").mkdir()
    for stem in ["b", "a", "c"]:
        _image(ord(stem)).save(root / "image" / f"{stem}.jpg")
        (root / "caption" / f"{stem}.txt").write_text(f"A long caption of {stem}.\n")
    data = read_retrieval(tmp_path)  # the folder above Urban1k works too
    assert data.image_ids == ["a", "b", "c"]
    assert data.captions == ["A long caption of a.", "A long caption of b.", "A long caption of c."]
    (root / "caption" / "d.txt").write_text("orphan")
    with pytest.raises(RetrievalDataError, match="d.txt"):
        read_retrieval(root)


def test_bad_image_error_and_skip(world, tmp_path):
    rows = [json.loads(x) for x in (world["dir"] / "pairs.jsonl").read_text().splitlines()]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows.append({"image": str(tmp_path / "broken.png"), "caption": "a broken one"})
    src = tmp_path / "with_bad.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = read_retrieval(src, image_root=world["dir"])
    scorer = load(world["model"], device="cpu")
    with pytest.raises(ImageError, match="broken.png"):
        evaluate_retrieval(scorer, data)
    skipped = evaluate_retrieval(scorer, data, skip_bad_images=True)
    clean = evaluate_retrieval(scorer, read_retrieval(world["dir"] / "pairs.jsonl"))
    assert len(skipped.skipped_images) == 1 and "broken.png" in skipped.skipped_images[0]
    assert skipped.n_images == 10 and skipped.n_captions == clean.n_captions
    assert skipped.image_to_text == clean.image_to_text
    assert skipped.text_to_image == clean.text_to_image


def test_missing_columns_are_named(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"image": "a.png", "text": "hi"}) + "\n")
    with pytest.raises(RetrievalDataError, match=r"row 0: missing column 'captions'"):
        read_retrieval(src)
    assert read_retrieval(src, caption_column="text").captions == ["hi"]


def test_torchrun_two_processes_equal_one(world, tmp_path):
    common = ["bench", "retrieval", "--model", str(world["model"]), "--data",
              str(world["dir"] / "pairs.jsonl"), "--workers", "0", "--quiet", "--device", "cpu"]
    single = tmp_path / "single.json"
    assert main([*common, "--json", str(single)]) == 0
    multi = tmp_path / "multi.json"
    torchrun(["-m", "specs_metric", *common, "--json", str(multi)])
    a = json.loads(single.read_text())
    b = json.loads(multi.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    for key in ("image_to_text", "text_to_image", "n_images", "n_captions"):
        assert a["results"][0][key] == b["results"][0][key]


def test_long_captions_follow_the_policy(world, tmp_path):
    long = " ".join(f"word{i}" for i in range(400))  # far over 248 tokens
    src = tmp_path / "long.jsonl"
    src.write_text(
        json.dumps({"image": "imgs/0.png", "caption": long}) + "\n"
        + json.dumps({"image": "imgs/1.png", "caption": "short"}) + "\n"
    )
    data = read_retrieval(src, image_root=world["dir"])
    truncated = evaluate_retrieval(load(world["model"], device="cpu"), data)
    assert truncated.n_captions == 2
    strict = load(world["model"], device="cpu", long_captions="error")
    with pytest.raises(ValueError, match="context|tokens"):
        evaluate_retrieval(strict, data)

"""``specs prepare``: input formats, cumulative captions, negatives, the token cap and the
per-reason skip counts."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from specs_metric.cli import main
from specs_metric.processing.tokenizer import default_tokenizer
from specs_metric.training.examples import read_table
from specs_metric.training.prepare import (
    PrepareError,
    TokenCounter,
    cumulative_captions,
    draw_negative_details,
    prepare_dataset,
)

COLORS = ["red", "green", "blue", "yellow", "white", "black"]


def caption_for(color: str) -> str:
    # clause segmenter: 4 segments ("..., with ...", "and ..." are cut; see test_segment).
    return (f"A {color} square fills the frame, with a thin border around it. "
            f"The {color} paint looks fresh and glossy under the light.")


@pytest.fixture()
def images(tmp_path):
    for color in COLORS:
        Image.new("RGB", (20, 16), color).save(tmp_path / f"{color}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    return tmp_path


def reference_negatives(segments, images, fraction, seed):
    """Guide §5 transcribed with plain loops: visit rows in order; per segment index draw
    rows until one has another image (and a segment); take its segment i or its last."""
    rng = random.Random(seed)
    n = len(segments)
    result = []
    for row in range(n):
        if len(segments[row]) < 2:
            result.append([])
            continue
        out = []
        for i in range(len(segments[row]) - 1):
            while True:
                k = rng.randrange(n)
                if images[k] != images[row] and len(segments[k]) > 0:
                    break
            j = i if i < len(segments[k]) else len(segments[k]) - 1
            text = segments[k][j].strip()
            if row < int(n * fraction):
                words = text.split()
                rng.shuffle(words)
                text = " ".join(words)
            out.append(text)
        result.append(out)
    return result


def test_negatives_follow_the_reference_draws():
    segments = [["a b c", "d e", "f g h i"], ["j k"], ["l m n", "o p"], [], ["q r", "s t u"]]
    imgs = ["x", "y", "z", "w", "x"]
    got = draw_negative_details(segments, imgs, 0.6, seed=5)
    assert got == reference_negatives(segments, imgs, 0.6, 5)
    assert got[1] == [] and got[3] == []
    # first int(5 * 0.6) = 3 rows shuffled: same words as some other image's segment
    donors = {img: segs for img, segs in zip(imgs, segments, strict=True)}
    for neg in got[0]:
        assert any(sorted(neg.split()) == sorted(s.split())
                   for img, segs in donors.items() if img != "x" for s in segs)
    # last rows keep donor segments intact
    assert all(any(neg == s for i, segs in enumerate(segments) if imgs[i] != "x" for s in segs)
               for neg in got[4])
    assert draw_negative_details(segments, imgs, 0.6, seed=5) == got


def test_no_other_image_means_no_negative():
    assert draw_negative_details([["a", "b"], ["c", "d"]], ["same", "same"]) == [None, None]


def test_cumulative_captions_and_token_cap():
    tok = default_tokenizer()
    captions, negatives = cumulative_captions(["A dog.", " It runs. ", "It is brown."],
                                              ["cat blue.", "a car."])
    assert captions == ["A dog.", "A dog. It runs.", "A dog. It runs. It is brown."]
    assert negatives == ["A dog. cat blue.", "A dog. It runs. a car."]
    # Segments of 60 words (each "word" one BPE id) -> 1 + 60 k + 1 ids; with the cap at 248
    # the 4th cumulative caption (242 ids) fits, the 5th (302) does not. The negative of
    # step 4 is longer (61 extra words -> 243 ids) and still fits; at cap 242 it does not.
    seg = " ".join(["dog"] * 60)
    long_neg = " ".join(["cat"] * 61)
    assert len(tok.token_ids(" ".join([seg] * 4))) == 242
    for count in (None, lambda text: len(tok.token_ids(text))):
        captions, negatives = cumulative_captions([seg] * 6, [long_neg] * 5, count, 248)
        assert len(captions) == 4 and len(negatives) == 3
        captions, negatives = cumulative_captions([seg] * 6, [long_neg] * 5, count, 242)
        assert len(captions) == 3 and len(negatives) == 2


@pytest.mark.parametrize("text", [
    "", "A dog.", "  Two   spaces\tand\nlines  ", "Caf\u00e9 na\u00efve \u2014 emoji \U0001f600!",
    "&amp;amp; &lt;b&gt; entities", "don't it's they're 3.14 x2", "mojibake: caf\u00c3\u00a9",
    "UPPER lower MiXeD, punctuation!!! (brackets) [x] {y}",
])
def test_token_counter_equals_full_encoding(text):
    tok = default_tokenizer()
    counter = TokenCounter()
    assert counter(text) == len(tok.token_ids(text))
    assert counter(text + " " + text) == len(tok.token_ids(text + " " + text))


def test_prepare_sharegpt4v_json_with_skips(images, tmp_path):
    rows = [
        {"id": k, "image": f"{c}.png",
         "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                           {"from": "gpt", "value": caption_for(c)}]}
        for k, c in enumerate(COLORS)
    ]
    rows += [
        {"image": "gone.png", "conversations": [{"value": caption_for("red")}]},  # row 7
        {"image": "broken.png", "conversations": [{"value": caption_for("red")}]},  # row 8
        {"image": "red.png", "conversations": [{"value": "   "}]},  # row 9: empty
        {"image": "red.png", "conversations": [{"value": "A red square."}]},  # row 10: 1 segment
        {"image": "blue.png",  # row 11: first segment alone is 250 words -> nothing fits
         "conversations": [{"value": " ".join(["dog"] * 250) + ". A cat sits there."}]},
    ]
    src = tmp_path / "share.json"
    src.write_text(json.dumps(rows))
    report = prepare_dataset(src, tmp_path / "out.parquet", segmenter="clause", seed=1,
                             progress=False, log_fn=lambda s: None)
    assert report.rows == 11 and report.kept == 6
    assert dict(report.skipped) == {"missing_image": 1, "unreadable_image": 1,
                                    "empty_caption": 1, "too_few_segments": 1, "too_long": 1}
    assert report.examples["missing_image"] == [7] and report.examples["too_long"] == [11]
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["image", "caption", "captions", "neg_captions"]
    first = table.slice(0, 1).to_pylist()[0]
    assert first["image"] == str(images / "red.png")
    assert first["caption"] == caption_for("red")
    assert first["captions"] == [
        "A red square fills the frame,",
        "A red square fills the frame, with a thin border around it.",
        "A red square fills the frame, with a thin border around it. "
        "The red paint looks fresh",
        "A red square fills the frame, with a thin border around it. "
        "The red paint looks fresh and glossy under the light.",
    ]
    assert len(first["neg_captions"]) == 3
    for k, neg in enumerate(first["neg_captions"]):
        assert neg.startswith(first["captions"][k] + " ")
        assert "red" not in neg[len(first["captions"][k]):]  # taken from another image
    saved = json.loads((tmp_path / "out.parquet.report.json").read_text())
    assert saved["skipped"]["unreadable_image"] == 1


def test_prepare_jsonl_csv_and_shuffle_fraction(images, tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": f"{c}.png", "caption": caption_for(c)})
                               for c in COLORS))
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("image,caption\n" + "\n".join(f'{c}.png,"{caption_for(c)}"'
                                                      for c in COLORS))
    a = prepare_dataset(jsonl, tmp_path / "a.parquet", shuffle_fraction=0.0, progress=False,
                        log_fn=lambda s: None)
    b = prepare_dataset(csv_file, tmp_path / "b.parquet", shuffle_fraction=0.0, progress=False,
                        log_fn=lambda s: None)
    assert a.kept == b.kept == 6
    ta, tb = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert ta.equals(tb)
    # Unshuffled negatives end with a verbatim segment of another caption.
    for row in ta.to_pylist():
        for k, neg in enumerate(row["neg_captions"]):
            tail = neg[len(row["captions"][k]) + 1:]
            assert any(tail in caption_for(c) for c in COLORS if c not in row["image"])


def test_datasets_directory_input(images, tmp_path):
    # A datasets save_to_disk directory: Arrow stream file(s) listed in state.json.
    table = pa.table({"image": [str(images / f"{c}.png") for c in COLORS],
                      "caption": [caption_for(c) for c in COLORS]})
    folder = tmp_path / "hf"
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text("{}")
    assert read_table(folder).select(["image", "caption"]).equals(table)
    report = prepare_dataset(folder, tmp_path / "o.parquet", progress=False, log_fn=lambda s: None)
    assert report.kept == 6


def test_datasets_directory_output(images, tmp_path):
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(json.dumps({"image": f"{c}.png", "caption": caption_for(c)})
                             for c in COLORS))
    prepare_dataset(src, tmp_path / "ds", progress=False, log_fn=lambda s: None)
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    assert len(loaded) == 6 and len(loaded[0]["captions"]) == 4


def test_bad_inputs_name_the_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\n{"caption": "no image"}\n')
    with pytest.raises(PrepareError, match="line 2: no 'image' field"):
        prepare_dataset(bad, tmp_path / "o.parquet", progress=False)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(PrepareError, match="unsupported input"):
        prepare_dataset(tmp_path / "x.txt", tmp_path / "o.parquet", progress=False)


def test_cli_prepare(images, tmp_path, capsys):
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(json.dumps({"image": f"{c}.png", "caption": caption_for(c)})
                             for c in COLORS + ["missing"]))
    out = tmp_path / "train.parquet"
    code = main(["prepare", "--input", str(src), "--output", str(out), "--seed", "3",
                 "--segmenter", "sentence", "--image-root", str(images), "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "kept 6" in text and "missing_image" in text
    rows = pq.read_table(out).to_pylist()
    assert [len(r["captions"]) for r in rows] == [2] * 6  # two sentences each


def test_worker_processes_give_the_same_table(images, tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(json.dumps({"image": f"{c}.png", "caption": caption_for(c)})
                             for c in COLORS))
    for workers in (1, 2):
        prepare_dataset(src, tmp_path / f"w{workers}.parquet", workers=workers, progress=False,
                        log_fn=lambda s: None)
    assert pq.read_table(tmp_path / "w1.parquet").equals(pq.read_table(tmp_path / "w2.parquet"))

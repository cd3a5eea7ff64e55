"""``specs bench zeroshot``: accuracy against plain loops, prompt ensembling, data layouts."""

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
from specs_metric.evaluation.templates import TEMPLATES, get_classes, get_templates
from specs_metric.evaluation.zeroshot import (
    LabelledDataError,
    class_embeddings,
    evaluate_zeroshot,
    read_labelled,
    topk_accuracy,
)
from specs_metric.scoring.scorer import load
from subprocesses import torchrun

COLOURS = {"red": (210, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 210), "gray": (128,) * 3}


def plain_topk(scores: list[list[float]], labels: list[int], ks) -> dict[int, float]:
    """Order classes by (score descending, index ascending); a hit if the label is in the
    first K."""
    out = {}
    for k in ks:
        hits = 0
        for row, label in zip(scores, labels, strict=True):
            order = sorted(range(len(row)), key=lambda c: (-row[c], c))
            hits += label in order[:k]
        out[k] = 100.0 * hits / len(labels)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_topk_with_planted_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=(30, 6)).astype(np.float64)  # many exact ties
    labels = rng.integers(0, 6, size=30)
    assert topk_accuracy(scores, labels, (1, 2, 5)) == plain_topk(
        scores.tolist(), labels.tolist(), (1, 2, 5)
    )


def test_tie_goes_to_the_class_listed_first():
    scores = np.array([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1]])
    assert topk_accuracy(scores, np.array([0, 1]), (1, 2)) == {1: 50.0, 2: 100.0}


# --------------------------------------------------------------------------------------
# Templates and classes


def test_template_sets_are_well_formed():
    for name, templates in TEMPLATES.items():
        assert templates, name
        assert len(set(templates)) == len(templates), name
        assert all(t.count("{}") == 1 for t in templates), name
    assert len(TEMPLATES["imagenet"]) >= 20 and len(TEMPLATES["cifar"]) >= 10
    assert get_templates("photo") == ("a photo of a {}.",)


def test_templates_from_file_and_literal(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# mine\nan image of {}.\n\na {} again.\n")
    assert get_templates(str(f)) == ("an image of {}.", "a {} again.")
    j = tmp_path / "t.json"
    j.write_text(json.dumps(["x {} y"]))
    assert get_templates(str(j)) == ("x {} y",)
    assert get_templates("my {} here") == ("my {} here",)
    with pytest.raises(ValueError, match="exactly one"):
        get_templates("two {} {}")
    bad = tmp_path / "bad.txt"
    bad.write_text("fine {}\nno placeholder\n")
    with pytest.raises(ValueError, match="line 2"):
        get_templates(str(bad))
    with pytest.raises(ValueError, match="not a template set"):
        get_templates("nonsense")


def test_class_files(tmp_path):
    lines = tmp_path / "c.txt"
    lines.write_text("maple_tree\n\nn01\tgoldfish\n")
    assert get_classes(str(lines)) == (["maple_tree", "n01"], ["maple tree", "goldfish"])
    mapping = tmp_path / "c.json"
    mapping.write_text(json.dumps({"n02": "great white shark", "n01": "goldfish"}))
    assert get_classes(str(mapping)) == (["n02", "n01"], ["great white shark", "goldfish"])
    dup = tmp_path / "d.json"
    dup.write_text(json.dumps(["a", "a"]))
    with pytest.raises(ValueError, match="twice"):
        get_classes(str(dup))
    keys, _ = get_classes("synthetic-shapes")
    assert "star" in keys and len(get_classes("cifar10")[0]) == 10


# --------------------------------------------------------------------------------------
# A tiny model and an ImageFolder of colour patches


def _patch(colour, seed):
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[colour], dtype=np.int64)
    arr = np.clip(base + rng.integers(-25, 26, size=(36, 36, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("zeroshot")
    torch.save(make_state_dict(seed=5), d / "tiny.pt")
    rows = []
    for n, colour in enumerate(COLOURS):
        (d / "folder" / colour).mkdir(parents=True)
        for k in range(3):
            _patch(colour, 10 * n + k).save(d / "folder" / colour / f"{k}.png")
            rows.append({"image": f"folder/{colour}/{k}.png", "label": colour})
    (d / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"dir": d, "model": d / "tiny.pt", "rows": rows}


def test_class_embeddings_are_normalised_template_means(world):
    scorer = load(world["model"], device="cpu")
    names = ["red", "dark blue"]
    templates = TEMPLATES["synthetic"]
    got = class_embeddings(scorer, names, templates).numpy()
    for c, name in enumerate(names):
        vectors = []
        for t in templates:
            v = scorer.embed_texts([t.format(name)])[0].double().numpy()
            vectors.append(v / np.sqrt(np.sum(v * v)))
        mean = np.sum(vectors, axis=0) / len(vectors)
        np.testing.assert_allclose(got[c], mean / np.sqrt(np.sum(mean * mean)), atol=1e-6)


def test_evaluate_equals_plain_computation(world):
    data = read_labelled(world["dir"] / "folder")
    assert data.class_keys == sorted(COLOURS)
    assert len(data) == 12
    scorer = load(world["model"], device="cpu")
    templates = TEMPLATES["synthetic-colour"]
    result = evaluate_zeroshot(scorer, data, templates, ks=(1, 2, 5), batch_size=5)
    # plain: class vectors from separately embedded prompts, image vectors per image
    classes = []
    for name in data.class_names:
        vs = [scorer.embed_texts([t.format(name)])[0].double().numpy() for t in templates]
        vs = [v / np.linalg.norm(v) for v in vs]
        m = np.mean(vs, axis=0)
        classes.append(m / np.linalg.norm(m))
    scores = []
    for path in data.images:
        v = scorer.embed_images([path])[0].double().numpy()
        v = v / np.linalg.norm(v)
        scores.append([float(v @ c) for c in classes])
    labels = [sorted(COLOURS).index(Path(p).parent.name) for p in data.images]
    assert result.accuracy == plain_topk(scores, labels, (1, 2, 5))
    per_class = {}
    for c, key in enumerate(data.class_keys):
        rows = [s for s, lab in zip(scores, labels, strict=True) if lab == c]
        per_class[key] = 100.0 * sum(int(np.argmax(s)) == c for s in rows) / len(rows)
    assert result.per_class == pytest.approx(per_class)
    assert result.predictions.tolist() == [int(np.argmax(s)) for s in scores]


def test_labelled_table_matches_folder(world, tmp_path):
    scorer = load(world["model"], device="cpu")
    folder = evaluate_zeroshot(scorer, read_labelled(world["dir"] / "folder"), ("a {} patch.",))
    table = read_labelled(world["dir"] / "labels.jsonl")
    assert table.class_keys == sorted(COLOURS)
    result = evaluate_zeroshot(scorer, table, ("a {} patch.",))
    assert result.accuracy == folder.accuracy
    # integer labels against a class file (CSV cells are strings)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(COLOURS) + "\n")
    order = list(COLOURS)
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "image,label\n"
        + "".join(f"{world['dir'] / r['image']},{order.index(r['label'])}\n" for r in world["rows"])
    )
    by_index = read_labelled(csv, str(classes))
    assert by_index.class_keys == order
    assert [order[i] for i in by_index.labels] == [r["label"] for r in world["rows"]]
    with pytest.raises(LabelledDataError, match="row 0: label 9"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"image": "x.png", "label": 9}) + "\n")
        read_labelled(bad, str(classes))


def test_folder_with_positional_class_names(world, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("shade one\nshade two\nshade three\nshade four\n")
    data = read_labelled(world["dir"] / "folder", str(names))
    assert data.class_names == ["shade one", "shade two", "shade three", "shade four"]
    # sorted folders pair with the listed names in order
    first_of_each = {Path(p).parent.name: int(lab) for p, lab in
                     zip(data.images, data.labels, strict=True)}
    assert first_of_each == {c: i for i, c in enumerate(sorted(COLOURS))}
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("red\ngreen\nyellow\n")
    with pytest.raises(LabelledDataError, match="'blue'"):
        read_labelled(world["dir"] / "folder", str(wrong))


def test_dotted_label_column_on_scene_json(world, tmp_path):
    rows = {
        "image": [r["image"] for r in world["rows"]],
        "scene": [json.dumps({"background": r["label"], "objects": [{"shape": "star"}]})
                  for r in world["rows"]],
    }
    pq.write_table(pa.table(rows), tmp_path / "test.parquet")
    data = read_labelled(tmp_path, label_column="scene.background", image_root=world["dir"])
    assert [data.class_keys[i] for i in data.labels] == [r["label"] for r in world["rows"]]
    shapes = read_labelled(tmp_path, label_column="scene.objects.0.shape", image_root=world["dir"])
    assert shapes.class_keys == ["star"]
    with pytest.raises(LabelledDataError, match="no field 'scene.colour'"):
        read_labelled(tmp_path, label_column="scene.colour", image_root=world["dir"])


def test_cli_table_json_and_torchrun(world, tmp_path, capsys):
    common = ["bench", "zeroshot", "--model", str(world["model"]), "--data",
              str(world["dir"] / "folder"), "--templates", "synthetic-colour", "--workers", "0",
              "--quiet", "--device", "cpu", "--ks", "1,2"]
    single = tmp_path / "single.json"
    assert main([*common, "--json", str(single)]) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-2" in printed
    a = json.loads(single.read_text())
    assert a["classes"] == sorted(COLOURS) and len(a["templates"]) == 4
    multi = tmp_path / "multi.json"
    torchrun(["-m", "specs_metric", *common, "--json", str(multi)])
    b = json.loads(multi.read_text())
    assert b["world_size"] == 2
    for key in ("accuracy", "per_class_top1", "n_images", "n_classes"):
        assert a["results"][0][key] == b["results"][0][key]


def test_hf_style_table_with_image_structs_and_int_labels(world, tmp_path):
    """A Hugging Face ``save_to_disk`` folder like CIFAR-10's: ``img`` structs, int labels."""
    order = list(COLOURS)
    table = pa.table(
        {
            "img": [{"bytes": (world["dir"] / r["image"]).read_bytes(), "path": None}
                    for r in world["rows"]],
            "label": [order.index(r["label"]) for r in world["rows"]],
        }
    )
    split = tmp_path / "hf" / "test"
    split.mkdir(parents=True)
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (split / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    (tmp_path / "hf" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(order))
    data = read_labelled(tmp_path / "hf", str(classes), image_column="img")
    assert all(isinstance(im, bytes) for im in data.images)
    assert [order[i] for i in data.labels] == [r["label"] for r in world["rows"]]
    scorer = load(world["model"], device="cpu")
    from_bytes = evaluate_zeroshot(scorer, data, ("a {} patch.",), ks=(1, 3))
    from_paths = evaluate_zeroshot(
        scorer, read_labelled(world["dir"] / "labels.jsonl", str(classes)), ("a {} patch.",),
        ks=(1, 3),
    )
    assert from_bytes.accuracy == from_paths.accuracy
    with pytest.raises(LabelledDataError, match="missing column 'image'"):
        read_labelled(tmp_path / "hf", str(classes))


def test_integer_labels_need_classes(tmp_path):
    src = tmp_path / "l.csv"
    src.write_text("image,label\na.png,0\nb.png,1\n")
    with pytest.raises(LabelledDataError, match="--classes"):
        read_labelled(src)

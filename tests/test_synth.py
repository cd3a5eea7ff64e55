"""The synthetic world: determinism, truth of captions and negatives, splits, graded scores.

Captions are checked by a parser and a fact checker written here from the documented
grammar, against the scene graph stored with each row, not by the generator's own code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from specs_metric.cli import main
from specs_metric.processing.tokenizer import default_tokenizer
from specs_metric.synth import Scene, generate, parse_segment, segment_text, truth
from specs_metric.synth.world import COLOURS, HELD_OUT_PAIRS

N_SCENES = 40

ROWS = {"top": 0, "middle": 1, "bottom": 2}
COLUMNS = {"left": 0, "middle": 1, "right": 2}
SIZES = {"small", "medium", "large"}
TEXTURES = {"solid", "striped", "dotted", "checked"}


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate(out, n=N_SCENES, seed=7)
    return out


def _rows(directory: Path, split: str) -> list[dict]:
    return pq.read_table(directory / f"{split}.parquet").to_pylist()


def _graded(directory: Path, split: str) -> list[dict]:
    lines = (directory / f"graded_{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _segments(caption: str) -> list[str]:
    return re.split(r"(?<=\.) ", caption)


def _cell_of(name: str) -> tuple[int, int]:
    if name == "center":
        return (1, 1)
    row, col = name.split()
    return (ROWS[row], COLUMNS[col])


def parse(segment: str) -> tuple:
    """A segment as a claim tuple, by the documented grammar."""
    if m := re.fullmatch(r"The background is (\w+)\.", segment):
        return ("background", m[1])
    if m := re.fullmatch(r"There is an? (\w+) (\w+)\.", segment):
        return ("exists", (m[1], m[2]))
    if m := re.fullmatch(r"The (\w+) (\w+) is (left of|right of|above|below) the (\w+) (\w+)\.",
                         segment):
        return ("relation", (m[1], m[2]), m[3], (m[4], m[5]))
    if m := re.fullmatch(r"The (\w+) (\w+) is in the ([a-z ]+)\.", segment):
        return ("position", (m[1], m[2]), _cell_of(m[3]))
    if m := re.fullmatch(r"The (\w+) (\w+) is (\w+)\.", segment):
        kind = "size" if m[3] in SIZES else "texture" if m[3] in TEXTURES else None
        assert kind is not None, segment
        return (kind, (m[1], m[2]), m[3])
    raise AssertionError(f"segment outside the grammar: {segment!r}")


def check(claim: tuple, scene: dict) -> bool | None:
    """True / False / None (not settled by the scene) for a parsed claim."""
    objects = {(o["colour"], o["shape"]): o for o in scene["objects"]}
    kind = claim[0]
    if kind == "background":
        return scene["background"] == claim[1]
    obj = objects.get(claim[1])
    if kind == "exists":
        return obj is not None
    if obj is None:
        return False
    row, col = divmod(obj["cell"], 3)
    if kind == "size":
        return obj["size"] == claim[2]
    if kind == "texture":
        return obj["texture"] == claim[2]
    if kind == "position":
        return (row, col) == claim[2]
    other = objects.get(claim[3])
    if other is None:
        return False
    orow, ocol = divmod(other["cell"], 3)
    rel = claim[2]
    order = {"left of": col < ocol, "right of": col > ocol, "above": row < orow,
             "below": row > orow}[rel]
    aligned = row == orow if rel in ("left of", "right of") else col == ocol
    if not order:
        return False
    return True if aligned else None


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes(tmp_path, world_dir):
    again = tmp_path / "again"
    generate(again, n=N_SCENES, seed=7)
    first, second = _files(world_dir), _files(again)
    assert sorted(first) == sorted(second)
    assert len([k for k in first if k.startswith("images/")]) == N_SCENES
    for name in first:
        assert first[name] == second[name], name
    other = tmp_path / "other"
    generate(other, n=N_SCENES, seed=8)
    assert _files(other)["test.parquet"] != first["test.parquet"]


def test_split_sizes_and_layout(world_dir):
    train, test = _rows(world_dir, "train"), _rows(world_dir, "test")
    assert (len(train), len(test)) == (32, 8)
    for row in train + test:
        assert {"image", "captions", "neg_captions"} <= set(row)
        assert row["caption"] == row["captions"][-1]
        assert (world_dir / row["image"]).is_file()
        assert len(row["neg_captions"]) == len(row["captions"]) - 1
    for split in ("train", "test"):
        for rec in _graded(world_dir, split):
            assert {"image", "caption", "human_score", "group"} <= set(rec)


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_true_and_negatives_false(world_dir, split):
    for row in _rows(world_dir, split):
        scene = json.loads(row["scene"])
        caps = row["captions"]
        segments = _segments(caps[-1])
        assert len(segments) == len(caps)
        for k, seg in enumerate(segments):
            assert check(parse(seg), scene) is True, (row["id"], seg)
            expected = seg if k == 0 else f"{caps[k - 1]} {seg}"
            assert caps[k] == expected
        kinds = [parse(s)[0] for s in segments]
        assert kinds[0] == "background" and len(scene["objects"]) == kinds.count("exists")
        for j, neg in enumerate(row["neg_captions"]):
            assert neg.startswith(caps[j] + " ")
            wrong = neg[len(caps[j]) + 1 :]
            assert len(_segments(wrong)) == 1
            assert check(parse(wrong), scene) is False, (row["id"], wrong)


def test_parse_segment_inverts_segment_text(world_dir):
    # Every true and every false segment of the world: the library's parser agrees with the
    # grammar parser above, its facts round-trip, and truth() agrees with check().
    for row in _rows(world_dir, "train") + _rows(world_dir, "test"):
        scene = json.loads(row["scene"])
        caps = row["captions"]
        wrong = [neg[len(caps[j]) + 1 :] for j, neg in enumerate(row["neg_captions"])]
        for seg in _segments(caps[-1]) + wrong:
            fact, claim = parse_segment(seg), parse(seg)
            assert segment_text(fact) == seg
            assert fact.kind == claim[0]
            if fact.kind == "position":
                assert divmod(int(fact.value), 3) == claim[2]
            if fact.kind == "relation":
                assert (fact.subject, fact.value, fact.other) == claim[1:]
            assert truth(fact, Scene.from_dict(scene)) == check(claim, scene), seg
    for bad in ("The sky is blue.", "There is a red blob.", "The red star is huge."):
        with pytest.raises(ValueError, match="grammar"):
            parse_segment(bad)


def test_scene_bounds_and_uniqueness(world_dir):
    counts = []
    for split in ("train", "test"):
        for row in _rows(world_dir, split):
            scene = json.loads(row["scene"])
            objs = scene["objects"]
            counts.append(len(objs))
            keys = [(o["colour"], o["shape"]) for o in objs]
            assert len(set(keys)) == len(keys)
            assert len({o["cell"] for o in objs}) == len(objs)
            assert all(o["colour"] != scene["background"] for o in objs)
    assert min(counts) >= 3 and max(counts) <= 8


def test_token_lengths(world_dir):
    tok = default_tokenizer()
    for split in ("train", "test"):
        for row in _rows(world_dir, split):
            ids = [tok.token_ids(c) for c in row["captions"]]
            assert 60 <= len(ids[-1]) <= 240
            # word-local BPE: each cumulative caption's tokens extend the previous one's
            for a, b in zip(ids, ids[1:], strict=False):
                assert b[: len(a) - 1] == a[:-1]
            assert all(len(tok.token_ids(n)) <= 248 for n in row["neg_captions"])
        for rec in _graded(world_dir, split):
            assert len(tok.token_ids(rec["caption"])) <= 248


def _pairs_mentioned(text: str) -> set[tuple[str, str]]:
    return {tuple(m) for m in re.findall(r"\b([a-z]+) ([a-z]+)\b", text.lower())}


def test_held_out_pairs_split(world_dir):
    held = set(HELD_OUT_PAIRS)
    assert len(held) >= 1
    for row in _rows(world_dir, "train"):
        scene = json.loads(row["scene"])
        assert not {(o["colour"], o["shape"]) for o in scene["objects"]} & held
        for text in row["captions"][-1:] + row["neg_captions"]:
            assert not _pairs_mentioned(text) & held, text
    for rec in _graded(world_dir, "train"):
        assert not _pairs_mentioned(rec["caption"]) & held
    for row in _rows(world_dir, "test"):
        scene = json.loads(row["scene"])
        assert {(o["colour"], o["shape"]) for o in scene["objects"]} & held


@pytest.mark.parametrize("split", ["train", "test"])
def test_graded_scores_are_fact_f1(world_dir, split):
    scenes = {r["id"]: json.loads(r["scene"]) for r in _rows(world_dir, split)}
    n_facts = {r["id"]: len(r["captions"]) for r in _rows(world_dir, split)}
    groups: dict[str, list[float]] = {}
    for rec in _graded(world_dir, split):
        scene = scenes[rec["group"]]
        verdicts = [check(parse(s), scene) for s in _segments(rec["caption"])]
        correct, wrong = verdicts.count(True), verdicts.count(False)
        assert verdicts.count(None) == 0
        total = n_facts[rec["group"]]
        assert (rec["n_correct"], rec["n_hallucinated"], rec["n_facts"]) == (correct, wrong, total)
        assert rec["n_missing"] == total - correct
        precision, recall = correct / (correct + wrong), correct / total
        f1 = 2 * precision * recall / (precision + recall)
        assert rec["human_score"] == pytest.approx(f1, abs=1e-12)
        groups.setdefault(rec["group"], []).append(rec["human_score"])
    assert len(groups) == len(scenes)
    assert all(len(set(v)) > 1 for v in groups.values())


def test_images_show_the_scene(world_dir):
    for row in _rows(world_dir, "test") + _rows(world_dir, "train")[:8]:
        scene = json.loads(row["scene"])
        pixels = np.asarray(Image.open(world_dir / row["image"]).convert("RGB"))
        assert pixels.shape == (64, 64, 3)
        cell = 64 / 3
        occupied = set()
        for o in scene["objects"]:
            row_i, col_i = divmod(o["cell"], 3)
            occupied.add(o["cell"])
            y0, x0 = int(row_i * cell) + 1, int(col_i * cell) + 1
            patch = pixels[y0 : y0 + 19, x0 : x0 + 19].reshape(-1, 3)
            colours = {tuple(int(v) for v in p) for p in patch}
            assert tuple(COLOURS[o["colour"]]) in colours
            if o["texture"] != "solid":
                assert len(colours - {tuple(COLOURS[scene["background"]])}) >= 2
            cy, cx = int((row_i + 0.5) * cell), int((col_i + 0.5) * cell)
            centre = tuple(int(v) for v in pixels[cy, cx])
            if o["shape"] == "ring":
                assert centre == tuple(COLOURS[scene["background"]])
            elif o["texture"] == "solid":
                assert centre == tuple(COLOURS[o["colour"]])
        for c in set(range(9)) - occupied:
            row_i, col_i = divmod(c, 3)
            y0, x0 = int(row_i * cell) + 1, int(col_i * cell) + 1
            patch = pixels[y0 : y0 + 19, x0 : x0 + 19]
            assert (patch == COLOURS[scene["background"]]).all()


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "--n", "10", "--seed", "1", "--output", str(out)]) == 0
    assert (out / "train.parquet").is_file() and (out / "graded_test.jsonl").is_file()
    assert len(_rows(out, "test")) == 2
    meta = json.loads((out / "world.json").read_text())
    assert meta["seed"] == 1 and meta["image_size"] == 64
    assert "scenes" in capsys.readouterr().out


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--n"):
        generate(tmp_path, n=0)
    with pytest.raises(ValueError, match="--test-fraction"):
        generate(tmp_path, n=5, test_fraction=1.5)

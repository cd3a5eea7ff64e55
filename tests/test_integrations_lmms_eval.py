"""The lmms-eval task: its functions called directly as lmms-eval calls them (the shipped
utils.py loaded by path, once per `!function` tag), scores equal to `specs score`'s, the
bootstrap CI of the mean; and, when lmms-eval is installed, lmms-eval's own evaluator on a
tiny local data set with its dummy model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from integration_helpers import CAPTIONS, DEMO, EXAMPLE_IMAGES, reference_scores
from specs_metric.integrations import lmms_eval as task
from subprocesses import child_env

SHIPPED = task.task_dir() / "specs_detailcaps"


def _lmms_eval_usable() -> bool:
    """lmms-eval and what it imports, installed as .ci/run does (without its metadata's
    dependencies): a partial install is skipped, not failed."""
    needed = ("lmms_eval", "loguru", "sacrebleu", "evaluate", "pytablewriter", "datasets",
              "accelerate", "transformers")  # fmt: skip
    if any(importlib.util.find_spec(m) is None for m in needed):
        return False
    from importlib.metadata import version

    return int(version("filelock").split(".")[0]) < 4  # its evaluator needs filelock._api


HAS_LMMS_EVAL = _lmms_eval_usable()


def _load_utils(name: str = "utils"):
    """utils.py as lmms-eval's import_function loads it: by path, a new module each time."""
    spec = importlib.util.spec_from_file_location(name, SHIPPED / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def demo_model(monkeypatch):
    monkeypatch.setenv("SPECS_MODEL", DEMO)
    monkeypatch.setenv("SPECS_DEVICE", "cpu")


def _doc(path: str) -> dict:
    """A document in DetailCaps-4870's layout: the id in `image`, the bytes in `binary`."""
    return {"image": path.rsplit("/", 1)[1], "binary": open(path, "rb").read(),
            "GT_Caption_GPT4O": "a reference"}  # fmt: skip


def test_shipped_task_is_what_the_writer_writes():
    files = task.task_files()
    assert sorted(files) == ["specs_detailcaps.yaml", "utils.py"]
    for name, text in files.items():
        assert (SHIPPED / name).read_text(encoding="utf-8") == text
    yaml = files["specs_detailcaps.yaml"]
    assert 'dataset_path: "foundation-multimodal-models/DetailCaps-4870"' in yaml
    assert "process_results_use_image: true" in yaml


def test_module_prints_the_include_path():
    done = subprocess.run([sys.executable, "-m", "specs_metric.integrations.lmms_eval"],
                          env=child_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == str(task.task_dir())
    assert (task.task_dir() / "specs_detailcaps" / "specs_detailcaps.yaml").is_file()


def test_task_functions_score_like_specs_score(demo_model, tmp_path):
    visual_utils, results_utils, agg_utils = (_load_utils() for _ in range(3))
    docs = [_doc(p) for p in EXAMPLE_IMAGES] + [{"image": "broken", "binary": b"junk"}]
    (visual,) = visual_utils.specs_doc_to_visual(docs[0])
    assert isinstance(visual, Image.Image) and visual.mode == "RGB"
    assert visual.size == Image.open(EXAMPLE_IMAGES[0]).size
    assert results_utils.specs_doc_to_text(docs[0], {"prompt": "Caption it."}) == "Caption it."
    assert results_utils.specs_doc_to_text(docs[0]) == "Describe this image in detail."
    captions = CAPTIONS + ["There is a red star."]
    items = [results_utils.specs_process_results(d, [c])
             for d, c in zip(docs, captions, strict=True)]  # fmt: skip
    assert set(items[0]) == {"specs", "specs_ci_low", "specs_ci_high"}
    specs_items = [i["specs"] for i in items]
    rows = reference_scores(tmp_path, [d["binary"] for d in docs[:5]], CAPTIONS)
    for item, row, doc in zip(specs_items, rows, docs, strict=False):
        assert item["id"] == doc["image"]
        assert item["score"] == pytest.approx(row["score"], abs=1e-6)
    assert specs_items[5]["score"] is None
    assert specs_items[5]["error"] == "caption: image bytes: not a recognised image file"
    mean = agg_utils.specs_mean(specs_items)
    assert mean == pytest.approx(np.mean([r["score"] for r in rows]), abs=1e-6)
    low, high = agg_utils.specs_ci_low(specs_items), agg_utils.specs_ci_high(specs_items)
    assert low < mean < high
    assert len(task._SCORERS) == 1  # one model for every copy of utils.py


def test_the_ci_is_a_bootstrap_ci_of_the_mean_over_images():
    """Against the normal-theory interval of the mean for 400 images (independent)."""
    rng = np.random.default_rng(3)
    values = rng.normal(0.6, 0.05, 400)
    items = [{"id": str(i), "score": float(v), "error": None} for i, v in enumerate(values)]
    items.append({"id": "bad", "score": None, "error": "caption: caption is empty"})
    config = task.TaskConfig(n_boot=2000)
    out = task.summary(items, config)
    se = values.std(ddof=1) / np.sqrt(values.size)
    assert out["n"] == 401 and out["n_scored"] == 400
    assert out["mean"] == pytest.approx(values.mean(), abs=1e-12)
    assert out["ci_low"] == pytest.approx(values.mean() - 1.96 * se, abs=0.15 * 1.96 * se)
    assert out["ci_high"] == pytest.approx(values.mean() + 1.96 * se, abs=0.15 * 1.96 * se)
    # two similar captions per image: images are resampled whole, so the interval is
    # about sqrt(2) wider than if the 400 rows were independent
    per_image = np.repeat(rng.normal(0.6, 0.05, 200), 2) + rng.normal(0, 0.002, 400)
    by_image = task.summary([{"id": str(k // 2), "score": float(v)}
                             for k, v in enumerate(per_image)], config)  # fmt: skip
    by_row = task.summary([{"id": str(k), "score": float(v)}
                           for k, v in enumerate(per_image)], config)  # fmt: skip
    ratio = (by_image["ci_high"] - by_image["ci_low"]) / (by_row["ci_high"] - by_row["ci_low"])
    assert ratio == pytest.approx(np.sqrt(2), rel=0.15)


def test_written_task_for_another_layout(tmp_path, demo_model):
    folder = tmp_path / "tasks" / "mine"
    done = subprocess.run(
        [sys.executable, "-m", "specs_metric.integrations.lmms_eval", "task", "--out",
         str(folder), "--name", "my_caps", "--dataset", str(tmp_path / "data"), "--from-disk",
         "--image-column", "picture", "--id-column", "id", "--model", DEMO],
        env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    yaml = (folder / "my_caps.yaml").read_text()
    assert "task: my_caps" in yaml and "load_from_disk: true" in yaml
    spec = importlib.util.spec_from_file_location("utils", folder / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.CONFIG.image_column == "picture" and utils.CONFIG.model == DEMO
    doc = {"id": 7, "picture": Image.open(EXAMPLE_IMAGES[1])}  # a decoded Image feature
    item = utils.specs_process_results(doc, [CAPTIONS[1]])["specs"]
    rows = reference_scores(tmp_path, [EXAMPLE_IMAGES[1]], [CAPTIONS[1]])
    assert item["id"] == "7" and item["score"] == pytest.approx(rows[0]["score"], abs=1e-6)
    with pytest.raises(Exception, match="no column 'picture'"):
        utils.specs_process_results({"id": 1}, ["a"])


@pytest.mark.skipif(not HAS_LMMS_EVAL, reason="lmms-eval is not installed (see .ci/run)")
def test_yaml_loads_with_lmms_eval():
    from lmms_eval.utils import load_yaml_config

    config = load_yaml_config(str(SHIPPED / "specs_detailcaps.yaml"))
    assert config["task"] == "specs_detailcaps"
    assert callable(config["process_results"])
    assert [m["metric"] for m in config["metric_list"]] == ["specs", "specs_ci_low",
                                                            "specs_ci_high"]  # fmt: skip


@pytest.mark.skipif(not HAS_LMMS_EVAL, reason="lmms-eval is not installed (see .ci/run)")
def test_lmms_eval_evaluator_with_its_dummy_model(tmp_path):
    datasets = pytest.importorskip("datasets")
    ids = [p.rsplit("/", 1)[1] for p in EXAMPLE_IMAGES]
    detailcaps = datasets.Dataset.from_dict(
        {"image": ids, "binary": [open(p, "rb").read() for p in EXAMPLE_IMAGES]})
    datasets.DatasetDict({"test": detailcaps}).save_to_disk(str(tmp_path / "detailcaps"))
    pictures = datasets.Dataset.from_dict({"id": ids, "picture": EXAMPLE_IMAGES[::-1]})
    pictures = pictures.cast_column("picture", datasets.Image())
    datasets.DatasetDict({"test": pictures}).save_to_disk(str(tmp_path / "pictures"))
    tasks = tmp_path / "tasks"
    task.write_task(tasks / "a", name="tiny_detailcaps", dataset_path=str(tmp_path / "detailcaps"),
                    from_disk=True, max_new_tokens=16)  # fmt: skip
    task.write_task(tasks / "b", name="tiny_pictures", dataset_path=str(tmp_path / "pictures"),
                    from_disk=True, max_new_tokens=16,
                    config=task.TaskConfig(image_column="picture", id_column="id"))  # fmt: skip
    response = "There is a yellow diamond. The background is orange."
    env = child_env(SPECS_MODEL=DEMO, SPECS_DEVICE="cpu", HF_DATASETS_OFFLINE="1",
                    HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "dummy", "--model_args",
         f"response={response}", "--tasks", "tiny_detailcaps,tiny_pictures", "--include_path",
         str(tasks), "--device", "cpu", "--batch_size", "1", "--output_path",
         str(tmp_path / "out"), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    # lmms-eval exits 0 even when the evaluation failed: the results file is the proof
    found = sorted((tmp_path / "out").rglob("*_results.json"))
    assert found, f"no results file\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    results = json.loads(found[-1].read_text())["results"]
    expected = np.mean([r["score"] for r in reference_scores(
        tmp_path, EXAMPLE_IMAGES, [response] * len(EXAMPLE_IMAGES))])  # fmt: skip
    for name in ("tiny_detailcaps", "tiny_pictures"):
        got = results[name]
        assert got["specs,none"] == pytest.approx(expected, abs=1e-6)
        assert got["specs_ci_low,none"] <= got["specs,none"] <= got["specs_ci_high,none"]

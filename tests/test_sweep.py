"""``specs sweep``: means equal `specs score`'s, images encoded once, statistics, resume."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from factories import make_state_dict
from specs_metric.cli import main

N_IMAGES = 8
WORDS = ["red", "blue", "small", "large", "striped", "round", "shape", "corner"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Images, a tiny checkpoint and four caption files (image 0 captioned twice each)."""
    d = tmp_path_factory.mktemp("sweep")
    torch.save(make_state_dict(seed=0), d / "tiny.pt")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    files = []
    for k in range(4):
        path = d / f"ckpt-{k}.jsonl"
        with open(path, "w") as fh:
            for i in range(N_IMAGES):
                for s in range(2 if i == 0 else 1):
                    words = " ".join(WORDS[(i + k + s + j) % len(WORDS)] for j in range(k + 2))
                    rec = {"id": f"{i}-{s}", "image": f"{i}.png", "caption": f"a {words}"}
                    fh.write(json.dumps(rec) + "\n")
        files.append(path)
    return d, files


def _sweep(d, out, files, *extra):
    args = ["sweep", "--model", str(d / "tiny.pt"), "--out", str(out), "--device", "cpu"]
    return main([*args, "--no-progress", "--n-boot", "2000", "--n-perm", "4000", *extra,
                 *map(str, files)])  # fmt: skip


def _image_means(path):
    by_image = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        by_image.setdefault(rec["image"], []).append(rec["score"])
    return {k: float(np.mean(v)) for k, v in by_image.items()}, by_image


def test_sweep_means_tests_and_single_encoding(run, tmp_path):
    d, files = run
    out = tmp_path / "sw"
    assert _sweep(d, out, files) == 0
    result = json.loads((out / "sweep.json").read_text())
    cks = result["checkpoints"]
    assert [c["name"] for c in cks] == [f"ckpt-{k}" for k in range(4)]
    assert [c["file"] for c in cks] == [str(f) for f in files]
    assert result["images"] == N_IMAGES and result["images_encoded"] == N_IMAGES
    assert result["model"].endswith("tiny.pt") and len(result["checkpoint_sha256"]) == 64
    for k, (ck, f) in enumerate(zip(cks, files, strict=True)):
        # the mean is the one `specs score` reports for the same file, scored on its own
        alone = tmp_path / f"alone-{k}.jsonl"
        args = ["score", "--model", str(d / "tiny.pt"), "--input", str(f), "--output", str(alone)]
        assert main([*args, "--device", "cpu", "--no-progress"]) == 0
        summary = json.loads(alone.with_name(alone.name + ".summary.json").read_text())
        assert ck["mean"] == summary["mean"] and ck["n"] == N_IMAGES + 1
        # CI over images by a plain-loop cluster bootstrap (image 0's two captions together)
        _, by_image = _image_means(alone)
        groups = list(by_image.values())
        loop = np.random.default_rng(100 + k)
        means = []
        for _ in range(2000):
            drawn = [groups[j] for j in loop.integers(0, len(groups), len(groups))]
            means.append(np.mean([s for g in drawn for s in g]))
        lo, hi = np.quantile(means, [0.025, 0.975])
        assert abs(ck["ci_low"] - lo) < 0.15 * (hi - lo) and abs(ck["ci_high"] - hi) < 0.15 * (
            hi - lo
        )
    best = int(np.argmax([c["mean"] for c in cks]))
    assert result["best"] == cks[best]["name"] and cks[best]["vs_best"] is None
    assert cks[0]["vs_previous"] is None
    for k in range(1, 4):
        prev, _ = _image_means(cks[k - 1]["scores"])
        cur, _ = _image_means(cks[k]["scores"])
        diff = np.array([cur[i] - prev[i] for i in prev])
        vs = cks[k]["vs_previous"]
        assert vs["against"] == cks[k - 1]["name"] and vs["n_used"] == N_IMAGES
        assert vs["mean_diff"] == pytest.approx(diff.mean())
        exact = stats.permutation_test(
            (diff,), np.mean, permutation_type="samples", n_resamples=np.inf
        ).pvalue
        assert vs["p_value"] == pytest.approx(exact, abs=0.02)
    for k in range(4):
        if k != best:
            top, _ = _image_means(cks[best]["scores"])
            cur, _ = _image_means(cks[k]["scores"])
            diff = np.mean([cur[i] - top[i] for i in top])
            assert cks[k]["vs_best"]["mean_diff"] == pytest.approx(diff)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "report.html").read_text()
    assert html.count("<tr>") == 1 + 4 and "data:image/png;base64," in html


def test_resume_scores_only_new_files(run, tmp_path, capsys):
    d, files = run
    out = tmp_path / "sw"
    assert _sweep(d, out, files[:2]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("*.jsonl")}
    assert _sweep(d, out, files, "--resume") == 0
    result = json.loads((out / "sweep.json").read_text())
    assert len(result["checkpoints"]) == 4
    assert result["images_encoded"] == 0  # the new files show only images seen before
    for name, mtime in first.items():  # the old score files were not rewritten
        assert (out / "scores" / name).stat().st_mtime_ns == mtime
    capsys.readouterr()
    # another model under --resume: refused in one line, nothing rescored silently
    torch.save(make_state_dict(seed=1), d / "other.pt")
    args = ["sweep", "--model", str(d / "other.pt"), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--no-progress", "--resume", *map(str, files)]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings (checkpoint_sha256" in err and len(err.splitlines()) == 1


def test_labels_and_bad_arguments(run, tmp_path, capsys):
    d, files = run
    out = tmp_path / "sw"
    assert _sweep(d, out, files[:2], "--labels", "early,late", "--no-plots") == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [c["name"] for c in result["checkpoints"]] == ["early", "late"]
    assert (out / "scores" / "late.jsonl").is_file() and not (out / "sweep.png").exists()
    capsys.readouterr()
    assert _sweep(d, out, files[:2], "--labels", "one") == 2
    assert "--labels has 1 label(s) for 2 file(s)" in capsys.readouterr().err
    assert _sweep(d, out, files[:2], "--labels", "a,a") == 2
    assert "label 'a' is given twice" in capsys.readouterr().err
    assert _sweep(d, out, [files[0], tmp_path / "missing.jsonl"]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_simulated_training_run_is_ranked_in_true_order(tmp_path):
    """Caption files of rising true quality (fact-level F1) on a fresh synthetic world."""
    spec = importlib.util.spec_from_file_location(
        "simulated_run", Path(__file__).parents[1] / "benchmarks" / "simulated_run.py"
    )
    simulated_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(simulated_run)
    world = tmp_path / "world"
    assert main(["synth", "--n", "150", "--seed", "11", "--output", str(world)]) == 0
    made = simulated_run.build_checkpoint_files(
        world / "graded_test.jsonl", tmp_path / "captions", [0, 2, 3, 5]
    )
    # the true quality rises, computed here from the graded file by a plain loop
    graded = [json.loads(x) for x in (world / "graded_test.jsonl").read_text().splitlines()]
    f1 = {(g["image"], g["caption"]): g["human_score"] for g in graded}
    true = []
    for path, _ in made:
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        true.append(np.mean([f1[(r["image"], r["caption"])] for r in rows]))
    assert all(a < b for a, b in zip(true, true[1:], strict=False))
    out = tmp_path / "sw"
    args = ["sweep", "--model", "specs-synth-demo", "--out", str(out), "--image-root", str(world)]
    args += ["--device", "cpu", "--no-progress", "--n-boot", "1000", "--n-perm", "1000"]
    assert main([*args, *(str(p) for p, _ in made)]) == 0
    result = json.loads((out / "sweep.json").read_text())
    means = [c["mean"] for c in result["checkpoints"]]
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), means
    assert result["best"] == "step-4" and result["images_encoded"] == result["images"] == 30


def _named(run, tmp_path, steps):
    """Copies of the first caption files named ckpt-<step>.jsonl (images under run's folder)."""
    d, files = run
    paths = []
    for step, src in zip(steps, files, strict=False):
        path = tmp_path / f"ckpt-{step}.jsonl"
        path.write_text(src.read_text())
        paths.append(path)
    return paths


def test_checkpoints_are_ordered_by_the_numbers_in_their_names(run, tmp_path, capsys):
    d, _ = run
    # the order a shell's glob gives: ckpt-10000 sorts between ckpt-1000 and ckpt-2000
    files = _named(run, tmp_path, [1000, 10000, 2000])
    out = tmp_path / "sw"
    assert _sweep(d, out, files, "--image-root", str(d)) == 0
    err = capsys.readouterr().err
    result = json.loads((out / "sweep.json").read_text())
    names = [c["name"] for c in result["checkpoints"]]
    assert names == ["ckpt-1000", "ckpt-2000", "ckpt-10000"] and result["order"] == "natural"
    assert [c["vs_previous"]["against"] for c in result["checkpoints"][1:]] == names[:2]
    assert result["checkpoints"][2]["file"] == str(files[1])
    # said on stderr (even with --no-progress: the order is not the one given) and the page
    assert ("specs sweep: checkpoints in natural order of the names (the numbers in them "
            "compared as numbers) (not the order given): ckpt-1000, ckpt-2000, ckpt-10000"
            ) in err.splitlines()  # fmt: skip
    assert '"order": "natural"' in err
    assert "natural order of the names" in (out / "report.html").read_text()
    # the order given, when asked for, or with --labels (which name the files in that order)
    for extra, want in ((["--order", "given"], names), (["--labels", "a,b,c"], ["a", "b", "c"])):
        again = tmp_path / f"sw-{want[0]}"
        assert _sweep(d, again, files, "--image-root", str(d), "--no-plots", *extra) == 0
        result = json.loads((again / "sweep.json").read_text())
        assert result["order"] == "given"
        got = [c["file"] for c in result["checkpoints"]]
        assert got == [str(f) for f in files]


def test_an_earlier_sweep_is_never_replaced_silently(run, tmp_path, capsys):
    d, files = run
    out = tmp_path / "sw"
    assert _sweep(d, out, files[:3], "--no-plots") == 0
    before = (out / "sweep.json").read_text()
    capsys.readouterr()
    assert _sweep(d, out, files[:1], "--no-plots") == 2  # the five-checkpoint report case
    assert capsys.readouterr().err.strip() == (
        f"specs sweep: error: --output {out} already holds a sweep of 3 checkpoint(s) "
        "(ckpt-0, ckpt-1, ckpt-2); pass --resume to reuse its score files (and add files to "
        "it) or --overwrite to replace it"
    )
    assert _sweep(d, out, files[:1], "--no-plots", "--resume") == 2  # would drop two
    assert capsys.readouterr().err.strip() == (
        f"specs sweep: error: --resume: the sweep in {out} also has ckpt-1, ckpt-2, not among "
        "the files given (its new report would drop them); give those files too, or pass "
        "--overwrite to replace the sweep"
    )
    assert (out / "sweep.json").read_text() == before
    assert _sweep(d, out, files[:1], "--no-plots", "--resume", "--overwrite") == 2
    assert _sweep(d, out, files[:1], "--no-plots", "--overwrite") == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [c["name"] for c in result["checkpoints"]] == ["ckpt-0"]
    scores = sorted(p.name for p in (out / "scores").iterdir())
    assert scores == ["ckpt-0.jsonl", "ckpt-0.jsonl.job.json", "ckpt-0.jsonl.summary.json"]
    assert (out / "cache").is_dir()  # the image cache is kept


def _sweep_result(names):
    rng = np.random.default_rng(0)
    checkpoints = []
    for name in names:
        mean = float(rng.uniform(0.4, 0.6))
        checkpoints.append({"name": name, "mean": mean, "ci_low": mean - 0.01,
                            "ci_high": mean + 0.01, "vs_previous": None})  # fmt: skip
    return {"model": "m", "scale": "specs", "best": names[0], "checkpoints": checkpoints}


@pytest.mark.parametrize(
    "names",
    [
        [f"ckpt-{1000 * k}" for k in range(1, 13)],
        [f"{phase}-epoch{k}-step{1000 * k}" for k, phase in enumerate(["warmup", "main"] * 6)],
        [f"step{k}" for k in range(150)],
    ],
    ids=["12-checkpoints", "12-long-names", "150-checkpoints"],
)
def test_plot_labels_never_overlap(names, tmp_path, monkeypatch):
    from specs_metric.evaluation.reports import report

    figures = []
    save = report._save

    def keep(fig, path, *args, **kwargs):
        figures.append(fig)
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(report, "_save", keep)
    png = report.plot_sweep(_sweep_result(names), tmp_path / "sweep.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in fig.axes[0].get_xticklabels() if t.get_visible() and t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i, box in enumerate(boxes):
        for other in boxes[i + 1 :]:
            assert not box.overlaps(other), (labels[i].get_text(), box, other)
    if len(names) <= 12:  # a dozen checkpoints: every one is named
        assert len(labels) == len(names)
        assert all(name.endswith(t.get_text()) for name, t in zip(names, labels, strict=True))
    else:
        assert len(labels) >= 20

"""``specs compare``: planted differences, identical runs, exact permutation p-values, errors."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from factories import make_state_dict
from specs_metric.cli import main
from specs_metric.errors import CompareError
from specs_metric.evaluation.compare import compare_files
from specs_metric.evaluation.stats import sign_flip_p_value

FIELDS = ("id", "image", "caption", "score", "cosine", "tokens", "truncated", "error")


def _write_scores(
    path: Path, scores, *, errors=None, ids=None, captions=None, images=None, scale="specs"
):
    """A file in the ``specs score`` output layout, with its summary."""
    with open(path, "w", encoding="utf-8") as fh:
        for i, s in enumerate(scores):
            err = errors.get(i) if errors else None
            rec = {
                "id": ids[i] if ids else i,
                "image": images[i] if images else f"img/{i % 7}.png",
                "caption": captions[i] if captions else f"caption {i}",
                "score": None if err else float(s),
                "cosine": None if err else 2 * float(s) - 1,
                "tokens": 5,
                "truncated": False,
                "error": err,
            }
            fh.write(json.dumps(rec) + "\n")
    summary = {"model": path.stem, "checkpoint_sha256": "0" * 64, "scale": scale}
    path.with_name(path.name + ".summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Two real `specs score` runs of the same rows with the same tiny checkpoint."""
    d = tmp_path_factory.mktemp("scored")
    torch.save(make_state_dict(seed=0), d / "tiny.pt")
    rng = np.random.default_rng(0)
    with open(d / "rows.jsonl", "w") as fh:
        for i in range(6):
            arr = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
            for k in range(3):
                rec = {"id": f"{i}-{k}", "image": f"{i}.png", "caption": f"a shape number {k}"}
                fh.write(json.dumps(rec) + "\n")
    for name in ("a", "b"):
        args = ["score", "--model", str(d / "tiny.pt"), "--input", str(d / "rows.jsonl")]
        args += ["--output", str(d / f"{name}.jsonl"), "--device", "cpu", "--no-progress"]
        assert main(args) == 0
    return d


def test_identical_runs_show_no_difference(scored):
    c = compare_files(scored / "a.jsonl", scored / "b.jsonl", n_boot=500, n_perm=500)
    assert c.n_used == c.n_rows == 18 and c.n_skipped == 0
    assert c.mean_diff == 0 and (c.ci_low, c.ci_high) == (0, 0) and c.p_value == 1.0
    assert (c.wins, c.ties, c.losses) == (0, 18, 0)
    assert not c.significant and c.top_changes == []
    assert c.scale == "specs" and c.model_a.endswith("tiny.pt")


def test_planted_difference_is_detected(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.uniform(0.3, 0.6, 300)
    b = a + 0.01 + rng.normal(0, 0.02, 300)
    b[17] += 0.3  # one row changed a lot
    pa_ = _write_scores(tmp_path / "a.jsonl", a)
    pb = _write_scores(tmp_path / "b.jsonl", b)
    c = compare_files(pa_, pb, n_boot=4000, n_perm=4000, seed=5, top=3)
    d = b - a
    assert c.mean_diff == pytest.approx(d.mean())
    assert c.significant and c.p_value < 0.01 and c.ci_low > 0
    assert (c.wins, c.ties, c.losses) == ((d > 0).sum(), 0, (d < 0).sum())
    assert c.top_changes[0]["id"] == "17" and c.top_changes[0]["diff"] == pytest.approx(d[17])
    assert len(c.top_changes) == 3
    # the CI agrees with a plain-loop bootstrap of the mean (different random stream)
    loop_rng = np.random.default_rng(99)
    means = [d[loop_rng.integers(0, d.size, d.size)].mean() for _ in range(4000)]
    lo, hi = np.quantile(means, [0.025, 0.975])
    width = hi - lo
    assert abs(c.ci_low - lo) < 0.1 * width and abs(c.ci_high - hi) < 0.1 * width


def test_sign_flip_p_value_matches_exact_enumeration():
    rng = np.random.default_rng(3)
    d = rng.normal(0.3, 1.0, 12)
    observed = abs(d.mean())
    flips = [abs((np.array(s) * d).mean()) for s in itertools.product([-1, 1], repeat=d.size)]
    exact = np.mean(np.array(flips) >= observed - 1e-12)
    estimate = sign_flip_p_value(d, 40000, np.random.default_rng(0))
    assert estimate == pytest.approx(exact, abs=0.01)


def test_no_difference_rejects_rarely(tmp_path):
    """Under the null (symmetric noise) the test rejects at about its nominal rate."""
    rng = np.random.default_rng(11)
    rejections = 0
    sims = 60
    for k in range(sims):
        a = rng.uniform(0.3, 0.6, 80)
        b = a + rng.normal(0, 0.02, 80)
        c = compare_files(
            _write_scores(tmp_path / "a.jsonl", a),
            _write_scores(tmp_path / "b.jsonl", b),
            n_boot=500,
            n_perm=500,
            seed=k,
        )
        rejections += c.significant
    assert rejections / sims <= 0.15


def test_error_rows_are_skipped_and_counted(tmp_path):
    a = np.linspace(0.2, 0.8, 10)
    pa_ = _write_scores(tmp_path / "a.jsonl", a, errors={2: "line 3: image missing"})
    pb = _write_scores(tmp_path / "b.jsonl", a + 0.1, errors={5: "line 6: bad", 2: "x"})
    c = compare_files(pa_, pb, n_boot=200, n_perm=200)
    assert (c.n_rows, c.n_used, c.n_skipped) == (10, 8, 2)
    assert c.mean_diff == pytest.approx(0.1) and c.wins == 8


def test_csv_and_jsonl_rows_match_by_id(tmp_path):
    scores = [0.1, 0.2, 0.3]
    pa_ = _write_scores(tmp_path / "a.jsonl", scores)
    pb = tmp_path / "b.csv"
    with open(pb, "w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        writer.writeheader()
        for i in (2, 0, 1):  # another order
            writer.writerow({"id": i, "image": f"img/{i}.png", "caption": f"caption {i}",
                             "score": scores[i] + 0.5, "cosine": 0, "tokens": 5,
                             "truncated": False, "error": ""})  # fmt: skip
    c = compare_files(pa_, pb, n_boot=100, n_perm=100)
    assert c.n_used == 3 and c.mean_diff == pytest.approx(0.5)
    assert c.scale == "specs" and c.model_b is None


def test_mismatched_inputs_are_refused(tmp_path):
    a = _write_scores(tmp_path / "a.jsonl", [0.1, 0.2, 0.3])
    fewer = _write_scores(tmp_path / "fewer.jsonl", [0.1, 0.2])
    with pytest.raises(CompareError, match=f"id '2' is in {a} but not in {fewer}"):
        compare_files(a, fewer)
    with pytest.raises(CompareError, match=f"id '2' is in {a} but not in {fewer}"):
        compare_files(fewer, a)
    other = _write_scores(tmp_path / "o.jsonl", [0.1, 0.2, 0.3], images=["img/0.png", "x", "y"])
    with pytest.raises(CompareError, match="id '1': image differs.*--pair-by image"):
        compare_files(a, other)
    with pytest.raises(CompareError, match=f"images: 'img/1.png' is in {a} but not in {other}"):
        compare_files(a, other, pair_by="image")
    clips = _write_scores(tmp_path / "c.jsonl", [0.1, 0.2, 0.3], scale="clip-s")
    with pytest.raises(CompareError, match="scales differ.*'specs'.*'clip-s'"):
        compare_files(a, clips)
    dup = _write_scores(tmp_path / "d.jsonl", [0.1, 0.2, 0.3], ids=[0, 1, 1])
    with pytest.raises(CompareError, match=f"{dup}: id '1' appears twice"):
        compare_files(a, dup)
    with pytest.raises(CompareError, match="no such file"):
        compare_files(a, tmp_path / "missing.jsonl")
    not_scores = tmp_path / "rows.jsonl"
    not_scores.write_text('{"image": "a.png", "caption": "x"}\n')
    with pytest.raises(CompareError, match="expected the output of `specs score`"):
        compare_files(not_scores, a)


def test_cli_report_and_errors(tmp_path, capsys):
    rng = np.random.default_rng(2)
    a = rng.uniform(0.3, 0.6, 50)
    pa_ = _write_scores(tmp_path / "a.jsonl", a)
    pb = _write_scores(tmp_path / "b.jsonl", a + 0.05)
    out = tmp_path / "cmp"
    args = ["compare", str(pa_), str(pb), "--n-boot", "300", "--n-perm", "300", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "**significant**" in text and "Rows that changed most" in text
    report = json.loads((out / "report.json").read_text())
    assert report["mean_diff"] == pytest.approx(0.05) and report["significant"] is True
    assert report["wins"] == 50 and report["test"] == "paired sign-flip permutation"
    assert (out / "distributions.png").read_bytes()[:4] == b"\x89PNG"
    clips = _write_scores(tmp_path / "c.jsonl", a, scale="clip-s")
    assert main(["compare", str(pa_), str(clips)]) == 2
    assert "scales differ" in capsys.readouterr().err


# --- two captioners -------------------------------------------------------------------------


def _captioner_files(tmp_path, n_images, per_a, per_b, seed, shift):
    """A and B describing the same images with different captions (per_a / per_b each)."""
    rng = np.random.default_rng(seed)
    quality = rng.uniform(0.3, 0.6, n_images)
    a_img, b_img, a, b = [], [], [], []
    for i in range(n_images):
        a_img += [f"img/{i}.png"] * per_a
        a += list(quality[i] + rng.normal(0, 0.02, per_a))
        b_img += [f"img/{i}.png"] * per_b
        b += list(quality[i] + shift + rng.normal(0, 0.02, per_b))
    pa_ = _write_scores(
        tmp_path / "a.jsonl", a, images=a_img, captions=[f"a says {k}" for k in range(len(a))]
    )
    pb = _write_scores(
        tmp_path / "b.jsonl", b, images=b_img, captions=[f"b says {k}" for k in range(len(b))]
    )
    return pa_, pb


def _per_image(path):
    """Per-image mean scores by a plain loop over the file."""
    sums, counts = {}, {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["error"]:
            continue
        sums[rec["image"]] = sums.get(rec["image"], 0.0) + rec["score"]
        counts[rec["image"]] = counts.get(rec["image"], 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def test_two_captioners_by_id_match_scipy(tmp_path):
    pa_, pb = _captioner_files(tmp_path, 12, 1, 1, seed=4, shift=0.01)
    c = compare_files(pa_, pb, n_boot=4000, n_perm=20000, seed=1)
    a, b = _per_image(pa_), _per_image(pb)
    d = np.array([b[k] - a[k] for k in a])
    assert c.unit == "image" and c.n_used == c.n_images == 12 and not c.averaged
    assert c.mean_diff == pytest.approx(d.mean()) and c.mean_a == pytest.approx(
        np.mean([*a.values()])
    )
    # exact sign-flip test over all 2^12 sign patterns, by scipy
    exact = stats.permutation_test(
        (d,), np.mean, permutation_type="samples", n_resamples=np.inf, alternative="two-sided"
    ).pvalue
    assert c.p_value == pytest.approx(exact, abs=0.01)
    boot = stats.bootstrap((d,), np.mean, n_resamples=4000, method="percentile", rng=7)
    lo, hi = boot.confidence_interval
    assert abs(c.ci_low - lo) < 0.1 * (hi - lo) and abs(c.ci_high - hi) < 0.1 * (hi - lo)
    assert (c.wins, c.ties, c.losses) == ((d > 0).sum(), 0, (d < 0).sum())
    top = c.top_changes[0]
    assert top["caption"].startswith("a says") and top["caption_b"].startswith("b says")
    assert abs(top["diff"]) == pytest.approx(np.abs(d).max())


def test_several_captions_per_image_are_averaged_before_the_test(tmp_path, capsys):
    pa_, pb = _captioner_files(tmp_path, 9, 3, 2, seed=8, shift=0.05)
    c = compare_files(pa_, pb, pair_by="image", n_boot=2000, n_perm=2000)
    a, b = _per_image(pa_), _per_image(pb)
    d = np.array([b[k] - a[k] for k in sorted(a)])
    assert (c.n_used, c.n_images, c.captions_a, c.captions_b) == (9, 9, 27, 18)
    assert c.averaged and c.unit == "image" and c.pair_by == "image"
    assert c.mean_diff == pytest.approx(d.mean())
    assert sorted(c.scores_b - c.scores_a) == pytest.approx(sorted(d))
    assert len(c.top_changes[0]["rows_a"]) == 3 and len(c.top_changes[0]["rows_b"]) == 2
    out = tmp_path / "cmp"
    args = ["compare", str(pa_), str(pb), "--pair-by", "image", "--out", str(out)]
    assert main([*args, "--n-boot", "200", "--n-perm", "200"]) == 0
    text = capsys.readouterr().out
    assert "averaged per image" in text and "from 27 captions in A and 18 in B" in text
    report = json.loads((out / "report.json").read_text())
    for key in ("mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value", "n_used"):
        assert key in report
    assert report["averaged_per_image"] is True and report["n_used"] == 9
    html = (out / "report.html").read_text()
    assert "averaged per image" in html and html.count('<div class="cand">') >= 5


def test_by_image_skips_images_without_a_scored_caption(tmp_path):
    images = ["i0", "i0", "i1", "i1", "i2"]
    pa_ = _write_scores(tmp_path / "a.jsonl", [0.1, 0.3, 0.5, 0.5, 0.2], images=images,
                        errors={2: "bad", 3: "bad"})  # fmt: skip
    pb = _write_scores(tmp_path / "b.jsonl", [0.4, 0.6, 0.2], images=["i0", "i1", "i2"],
                       errors={0: None}, captions=["x", "y", "z"])  # fmt: skip
    c = compare_files(pa_, pb, pair_by="image", n_boot=100, n_perm=100)
    # i1 has no scored caption in A; i0: A mean 0.2 vs 0.4, i2: 0.2 vs 0.2
    assert (c.n_used, c.n_skipped) == (2, 1)
    assert c.mean_diff == pytest.approx(0.1) and (c.wins, c.ties) == (1, 1)


def test_duplicate_ids_are_refused_in_one_line(tmp_path, capsys):
    a = _write_scores(tmp_path / "a.jsonl", [0.1, 0.2, 0.3])
    dup = _write_scores(tmp_path / "d.jsonl", [0.1, 0.2, 0.3], ids=["x", "y", "x"])
    for pair_by in ("id", "image"):
        assert main(["compare", str(a), str(dup), "--pair-by", pair_by]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"specs compare: error: {dup}: id 'x' appears twice (row 3); ids must be unique"
        )


def test_error_rows_without_an_id_are_not_duplicates(tmp_path):
    # `specs score` writes id null for a row whose id could not be used (e.g. an empty id)
    a = _write_scores(tmp_path / "a.jsonl", [0.1, 0.2, 0.3])
    b = tmp_path / "b.jsonl"
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    bad = {**rows[0], "id": None, "score": None, "cosine": None, "error": "line 4: empty id"}
    b.write_text("".join(json.dumps(r) + "\n" for r in [*rows, bad, bad]))
    report = compare_files(a, b)
    assert report.n_used == 3 and report.mean_diff == 0.0


def test_ids_that_do_not_match_suggest_pairing_by_image(tmp_path, capsys):
    """Two captioners' files of the same images, with ids of their own."""
    images = [f"img/{i}.png" for i in range(4)]
    a = _write_scores(tmp_path / "a.jsonl", [0.4] * 4, images=images, ids=["a0", "a1", "a2", "a3"])
    b = _write_scores(tmp_path / "b.jsonl", [0.5] * 4, images=images, ids=["b0", "b1", "b2", "b3"])
    assert main(["compare", str(a), str(b)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"specs compare: error: different rows: id 'a0' is in {a} but not in")
    assert line.endswith("pair them by image (--pair-by image)")
    assert main(["compare", str(a), str(b), "--pair-by", "image", "--n-perm", "100"]) == 0


def test_histograms_count_the_units_compared(tmp_path, monkeypatch):
    from specs_metric.evaluation.reports import report

    figures = []
    save = report._save

    def keep(fig, path, *args, **kwargs):
        figures.append(fig)
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(report, "_save", keep)
    a, b = np.array([0.4, 0.5, 0.6]), np.array([0.45, 0.5, 0.7])
    report.plot_distributions(a, b, tmp_path / "rows.png", unit="row")
    report.plot_distributions(a, b, tmp_path / "images.png", unit="image")
    rows, images = figures
    assert [ax.get_ylabel() for ax in images.axes] == ["images", "images"]
    assert [ax.get_ylabel() for ax in rows.axes] == ["rows", "rows"]


def test_missing_thumbnails_are_said_on_the_page_and_in_a_warning(tmp_path, capsys):
    rng = np.random.default_rng(3)
    a = rng.uniform(0.3, 0.6, 12)
    pa_ = _write_scores(tmp_path / "a.jsonl", a)  # images img/0.png ... that are elsewhere
    pb = _write_scores(tmp_path / "b.jsonl", a + rng.normal(0, 0.05, 12))
    out = tmp_path / "cmp"
    args = ["compare", str(pa_), str(pb), "--n-boot", "100", "--n-perm", "100", "--top", "12"]
    assert main([*args, "--out", str(out)]) == 0  # (the former name: every version takes it)
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert line.startswith("specs compare: warning: 7 of 7 images have no thumbnail: not found")
    assert line.endswith("pass --image-root with the folder of the relative image paths")
    assert "images have no thumbnail" in (out / "report.html").read_text()
    # with the images where --image-root says: thumbnails, no note, no warning
    for i in range(7):
        (tmp_path / "imgs" / "img").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(tmp_path / "imgs" / "img" / f"{i}.png")
    args += ["--image-root", str(tmp_path / "imgs"), "--overwrite"]
    assert main([*args, "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "no thumbnail" not in (out / "report.html").read_text()

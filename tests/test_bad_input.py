"""A corpus of bad input rows: each one is that row's error, and every other row is scored.

One JSONL file mixes good rows with every kind of bad row (and rows that look odd but are
fine); a CSV file does the same for the CSV-specific kinds. The output must have exactly one
row per input row, in order; each bad row's error names its line and the problem; each good
row's score equals scoring that pair alone through the Python API.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import specs_metric
from factories import make_state_dict, score_args
from specs_metric.cli import main
from specs_metric.data.scorefiles import read_score_rows
from specs_metric.data.sources import read_rows
from specs_metric.errors import ImageError
from specs_metric.io import reading
from specs_metric.io.reading import read_image_bytes
from specs_metric.limits import MAX_IMAGE_BYTES, MAX_LINE_CHARS
from specs_metric.processing import transform
from specs_metric.processing.transform import open_image
from subprocesses import child_env

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (8-bit grey), with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint and image files of every kind, good and bad."""
    d = tmp_path_factory.mktemp("bad_input")
    torch.save(make_state_dict(seed=0), d / "tiny.pt")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (30 + i, 41, 3), dtype=np.uint8)).save(d / f"g{i}.png")
    # odd but valid images: they must score
    cmyk = rng.integers(0, 255, (40, 30, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(d / "cmyk.tiff")
    wide = rng.integers(0, 65535, (20, 24), dtype=np.uint16)
    Image.frombytes("I;16", (24, 20), wide.astype("<u2").tobytes()).save(d / "i16.png")
    palette = Image.fromarray(rng.integers(0, 255, (25, 35, 3), dtype=np.uint8)).quantize(16)
    palette.save(d / "palette_transparent.png", transparency=0)
    frames = [Image.new("RGB", (20, 16), c).quantize(8) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    exif = Image.Exif()
    exif[0x010E] = "d" * 300_000  # ImageDescription: a 300 kB EXIF block
    Image.fromarray(rng.integers(0, 255, (12, 14, 3), dtype=np.uint8)).save(
        d / "huge_exif.png", exif=exif.tobytes()
    )
    os.symlink(d / "g1.png", d / "link_to_g1.png")
    (d / "unreadable.png").write_bytes((d / "g2.png").read_bytes())
    (d / "unreadable.png").chmod(0)
    # bad images
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_bytes(b"this is text, not a PNG")
    full = (d / "g1.png").read_bytes()
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    (d / "bomb.png").write_bytes(_png_header(20_000, 20_000))  # 400 Mpixel header
    (d / "zero_size.png").write_bytes(_png_header(0, 5))
    Image.new("L", (1, 1_000_000)).save(d / "tall_1x1000000.png")  # 2 kB file
    Image.new("L", (100_000, 1)).save(d / "wide_100000x1.png")
    with open(d / "too_big.png", "wb") as fh:  # sparse: takes no disk space
        fh.write(full)
        fh.truncate(MAX_IMAGE_BYTES + 1)
    (d / "folder.png").mkdir()
    os.mkfifo(d / "fifo.png")
    os.symlink(d / "loop_a.png", d / "loop_b.png")
    os.symlink(d / "loop_b.png", d / "loop_a.png")
    yield d
    (d / "unreadable.png").chmod(0o644)


def _line(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _good(image: str, caption: str, **extra) -> dict:
    return {"image": image, "caption": caption, **extra}


# (kind, the input line, what the output row must be: a dict for a good row -- the pair
# scored alone through the Python API -- or a regex its error must match)
def _jsonl_corpus(world: Path) -> list[tuple[str, bytes, object]]:
    g = {"id": "x", "image": "g0.png", "caption": "a photo of noise"}
    unreadable = (
        _good("unreadable.png", "readable by root")
        if IS_ROOT  # root reads a chmod 000 file: then the row is a good one
        else r"unreadable\.png: permission denied"
    )
    corpus = [
        # a byte-order mark before the first line: the row keeps its id
        ("BOM", b"\xef\xbb\xbf" + _line({**g, "id": "first"}), _good("g0.png", g["caption"])),
        ("missing file", _line({**g, "image": "nope.png"}), r"nope\.png: image file not found"),
        ("zero bytes", _line({**g, "image": "empty.png"}), r"empty \(0 bytes\)"),
        ("text as PNG", _line({**g, "image": "text.png"}), "not a recognised image"),
        ("truncated PNG", _line({**g, "image": "truncated.png"}), "truncated|cannot decode"),
        ("decompression bomb", _line({**g, "image": "bomb.png"}), "decompression-bomb limit"),
        ("size 0 header", _line({**g, "image": "zero_size.png"}), "not a recognised image"),
        ("1x1,000,000", _line({**g, "image": "tall_1x1000000.png"}), "aspect ratio too extreme"),
        ("100000x1", _line({**g, "image": "wide_100000x1.png"}), "aspect ratio too extreme"),
        ("over the size limit", _line({**g, "image": "too_big.png"}), "image file too large"),
        ("/dev/zero", _line({**g, "image": "/dev/zero"}), r"not a regular file \(a char"),
        ("FIFO", _line({**g, "image": "fifo.png"}), r"not a regular file \(a FIFO\)"),
        ("directory", _line({**g, "image": "folder.png"}), "is a directory"),
        ("symlink loop", _line({**g, "image": "loop_a.png"}), "symbolic links"),
        ("parent is a file", _line({**g, "image": "g0.png/x.png"}), "not a folder"),
        ("NUL in path", _line({**g, "image": "g0\x00.png"}), "not a valid file path"),
        ("chmod 000", _line({**g, "image": "unreadable.png", "caption": "readable by root"}),
         unreadable),
        ("malformed JSON", b'{"id": "broken", "image": \n', "malformed JSON line"),
        ("trailing garbage", _line(g)[:-1] + b" trailing\n", "malformed JSON line.*Extra data"),
        ("a list", b'["g0.png", "a caption"]\n', r"not a JSON object: got list"),
        ("null line", b"null\n", r"not a JSON object: got null"),
        ("deep nesting", b"[" * 100_000 + b"\n", "malformed JSON line.*recursion"),
        ("5000-digit id", b'{"id": ' + b"9" * 5000 + b', "image": "g0.png"}\n',
         "malformed JSON line"),
        ("line too long", _line({**g, "caption": "w" * (MAX_LINE_CHARS + 10)}), "longer than"),
        ("Latin-1 bytes", _line({**g, "caption": "CAFE"}).replace(b"CAFE", b"caf\xe9"),
         r"not valid UTF-8 \(byte 0xe9"),
        ("lone surrogate caption", _line({**g, "caption": "a \ud800 b"}),
         r"caption is not valid Unicode \(lone surrogate U\+D800"),
        ("lone surrogate id", _line({**g, "id": "\udfff"}), r"id is not valid Unicode"),
        ("lone surrogate image", _line({**g, "image": "\ud800.png"}),
         "image path is not valid Unicode"),
        ("no image", _line({"id": "x", "caption": "c"}), "row has no image"),
        ("image is a number", _line({**g, "image": 7}), r"image is not a string \(got int\)"),
        ("empty caption", _line({**g, "caption": ""}), "caption is empty"),
        ("blank caption", _line({**g, "caption": " \t\n "}), "caption is empty"),
        ("list caption", _line({**g, "caption": ["a"]}), r"not a string \(got list\)"),
        ("number caption", _line({**g, "caption": 3}), r"not a string \(got int\)"),
        ("null caption", _line({**g, "caption": None}), r"not a string \(got null\)"),
        ("NaN caption", b'{"image": "g0.png", "caption": NaN}\n', r"not a string \(got float"),
        ("over-long caption", _line({**g, "caption": "word " * 300}), "302 tokens"),
        ("dict id", _line({**g, "id": {"a": 1}}), r"id must be a string or a number \(got dict"),
        ("bool id", _line({**g, "id": True}), r"got bool"),
        ("list id", _line({**g, "id": [1]}), r"got list"),
        ("null id", _line({**g, "id": None}), "empty id"),
        ("empty id", _line({**g, "id": " "}), "empty id"),
        ("NaN id", b'{"id": NaN, "image": "g0.png", "caption": "c"}\n', "not a finite number"),
        # odd but fine
        ("CMYK", _line({**g, "image": "cmyk.tiff"}), _good("cmyk.tiff", g["caption"])),
        ("16-bit", _line({**g, "image": "i16.png"}), _good("i16.png", g["caption"])),
        ("palette+transparency", _line({**g, "image": "palette_transparent.png"}),
         _good("palette_transparent.png", g["caption"])),
        ("animated GIF", _line({**g, "image": "animated.gif"}),
         _good("animated.gif", g["caption"])),
        ("huge EXIF", _line({**g, "image": "huge_exif.png"}), _good("huge_exif.png", g["caption"])),
        ("symlink", _line({**g, "image": "link_to_g1.png"}), _good("link_to_g1.png", g["caption"])),
        ("absolute path", _line({**g, "image": str(world / "g2.png")}),
         _good(str(world / "g2.png"), g["caption"])),
        ("surrogate pair", _line({**g, "caption": "a smile \U0001f600"}),
         _good("g0.png", "a smile \U0001f600")),
        ("CRLF", _line(g)[:-1] + b"\r\n", _good("g0.png", g["caption"])),
    ]
    # a good row after each bad one: nothing a bad row does may spill into the next
    out = []
    for n, (kind, line, expect) in enumerate(corpus):
        out.append((kind, line, expect))
        image = f"g{n % 4}.png"
        out.append(("good", _line({"id": f"good{n}", "image": image, "caption": f"row {n}"}),
                    _good(image, f"row {n}", id=f"good{n}")))
    return out


def _run(world: Path, src: Path, out: Path, *extra: str) -> int:
    return main([*score_args(world, src, out), "--workers", "0", "--no-progress", *extra])


def _check(world: Path, result: list[dict], expected: list[tuple[str, int, object]]) -> None:
    """Output rows against (kind, line number, expectation), in order."""
    assert len(result) == len(expected)
    good = []
    for rec, (kind, line_no, expect) in zip(result, expected, strict=True):
        if isinstance(expect, dict):
            assert rec["error"] is None, (kind, rec["error"])
            assert rec["id"] == expect.get("id", rec["id"]), kind
            good.append((rec, expect))
        else:
            assert rec["score"] is None and rec["error"], (kind, rec)
            assert rec["error"].startswith(f"line {line_no}: "), (kind, rec["error"])
            assert re.search(expect, rec["error"]), (kind, rec["error"])
            assert "\n" not in rec["error"]
    # the good pairs through the Python API (another reader, another batching)
    scorer = specs_metric.load(world / "tiny.pt")
    images = [world / e["image"] for _, e in good]  # an absolute path stays as it is
    alone = scorer.score(images, [e["caption"] for _, e in good])
    assert [r["score"] for r, _ in good] == pytest.approx(alone.tolist(), abs=1e-6)


def test_jsonl_corpus_of_bad_rows(world, tmp_path):
    corpus = _jsonl_corpus(world)
    kinds = {kind for kind, _, expect in corpus if not isinstance(expect, dict)}
    assert len(kinds) >= 30
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(line for _, line, _ in corpus) + b"\n  \n")  # blank: no row
    out = tmp_path / "out.jsonl"
    assert _run(world, src, out, "--long-captions", "error") == 0
    result = list(read_score_rows(out))
    _check(world, result, [(k, n, e) for n, (k, _, e) in enumerate(corpus, start=1)])
    # ids: as given; none given -> the row number; unusable -> null
    assert result[0]["id"] == "first"
    by_kind = {kind: rec for (kind, _, _), rec in zip(corpus, result, strict=True)}
    for kind in ("dict id", "list id", "bool id", "null id", "empty id", "NaN id"):
        assert by_kind[kind]["id"] is None
    assert by_kind["lone surrogate id"]["id"] is None
    assert by_kind["malformed JSON"]["id"] == [k for k, _, _ in corpus].index("malformed JSON")
    # what cannot be written as UTF-8 is shown escaped
    assert by_kind["lone surrogate caption"]["caption"] == "a \\ud800 b"
    assert by_kind["Latin-1 bytes"]["caption"] == "caf\\xe9"
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    n_bad = sum(not isinstance(e, dict) for _, _, e in corpus)
    assert summary["n_rows"] == len(corpus) and summary["n_errors"] == n_bad
    # the same rows written as CSV
    out_csv = tmp_path / "out.csv"
    assert _run(world, src, out_csv, "--long-captions", "error") == 0
    assert [r["error"] for r in read_score_rows(out_csv)] == [r["error"] for r in result]


CSV_CORPUS = [
    # (kind, the record's physical lines, expectation)
    ("good", 'c1,g0.png,"a caption, with ""quotes""\nand a newline"\n',
     _good("g0.png", 'a caption, with "quotes"\nand a newline', id="c1")),
    ("Latin-1", "c2,g1.png,caf\udce9\n", r"not valid UTF-8 \(byte 0xe9"),
    ("good", "c3,g1.png,second\n", _good("g1.png", "second", id="c3")),
    ("empty id", ",g2.png,no id here\n", "empty id"),
    ("unterminated quote, closed by a later quote", 'c5,g0.png,"stray quote\n',
     "malformed CSV row.*unbalanced quote"),
    ("swallowed", "c6,g1.png,swallowed row\n", _good("g1.png", "swallowed row", id="c6")),
    ("swallowed", 'c7,g2.png,"quoted"\n', _good("g2.png", "quoted", id="c7")),
    ("unbalanced quote that parses", 'c8,g0.png,"stray again\n',
     "runs over line .*looks like a row"),
    ("swallowed", "c9,g1.png,taken\n", _good("g1.png", "taken", id="c9")),
    ("swallowed", 'c10,g2.png,ends in an inch mark 5"\n',
     _good("g2.png", 'ends in an inch mark 5"', id="c10")),
    ("too many fields", "c11,g0.png,cap,extra\n", r"4 fields, the header has 3"),
    ("too few fields", "c12,g0.png\n", r"2 fields, the header has 3"),
    ("quote then text", 'c13,g1.png,"closed"early\n', "malformed CSV row"),
    ("bad image", "c14,folder.png,a folder\n", "is a directory"),
    ("CRLF", "c15,g3.png,windows line\r\n", _good("g3.png", "windows line", id="c15")),
    ("line too long", "c18,g0.png," + "w" * MAX_LINE_CHARS + "\n", "longer than"),
    ("good", "c19,g1.png,after the long line\n", _good("g1.png", "after the long line")),
    ("never closed", 'c16,g0.png,"never closed\n', "never closed"),
    ("swallowed", "c17,g3.png,last\n", _good("g3.png", "last", id="c17")),
]


def test_csv_corpus_of_bad_rows(world, tmp_path):
    text = "id,image,caption\n" + "".join(lines for _, lines, _ in CSV_CORPUS)
    src = tmp_path / "in.csv"
    # a byte-order mark, and the Latin-1 row's byte as it is in the file
    src.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8", "surrogateescape"))
    expected, line_no = [], 2
    for kind, lines, expect in CSV_CORPUS:
        expected.append((kind, line_no, expect))
        line_no += lines.count("\n")
    out = tmp_path / "out.jsonl"
    assert _run(world, src, out) == 0
    result = list(read_score_rows(out))
    _check(world, result, expected)
    assert result[3]["id"] is None  # an empty id is never replaced by a row number


def test_csv_quote_running_into_a_line_too_long(tmp_path):
    src = tmp_path / "in.csv"
    long = "c3,g0.png," + "w" * MAX_LINE_CHARS + "\n"
    src.write_text('id,image,caption\nc1,g0.png,"open\nc2,g0.png,x\n' + long + "c4,g0.png,y\n")
    rows = [(r.line, r.id, r.error) for r in read_rows(src, tmp_path)]
    assert [line for line, _, _ in rows] == [2, 3, 4, 5]
    assert [i for _, i, _ in rows] == ["c1", "c2", None, "c4"]
    assert "runs over line 4" in rows[0][2] and rows[1][2] is None and rows[3][2] is None
    assert rows[2][2] == f"line 4: line longer than {MAX_LINE_CHARS} characters"


def test_csv_without_id_column_numbers_rows(world, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("image,caption\ng0.png,first\ng1.png,second\n")
    assert [(r.id, r.error) for r in read_rows(src, world)] == [(0, None), (1, None)]


def test_output_equal_to_input_is_refused(world, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_line({"id": 1, "image": "g0.png", "caption": "c"}))
    before = src.read_bytes()
    os.symlink(src, tmp_path / "link.jsonl")
    monkeypatch.chdir(tmp_path)
    for output in (src, tmp_path / "link.jsonl", Path("in.jsonl"), tmp_path / "." / "in.jsonl"):
        assert _run(world, src, output) == 2
        err = capsys.readouterr().err
        assert "is the input file" in err and err.count("\n") == 1, err
        assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "link.jsonl"]


def test_image_root_that_is_not_utf8(world, tmp_path):
    # a folder named with a Latin-1 byte (as sys.argv holds it): messages stay writable
    root = tmp_path / "caf\udce9"
    root.mkdir()
    (root / "g0.png").write_bytes((world / "g0.png").read_bytes())
    src = tmp_path / "in.jsonl"
    src.write_bytes(_line(_good("g0.png", "found")) + _line(_good("nope.png", "missing")))
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(world / "tiny.pt"), "--input", str(src),
                 "--image-root", str(root), "--output", str(out), "--workers", "0",
                 "--no-progress"]) == 0
    found, missing = read_score_rows(out)
    assert found["error"] is None and found["score"] is not None
    assert "caf\\udce9/nope.png: image file not found" in missing["error"]


# --- the image reader and decoder on their own (the Python API uses them too) -------------


def test_read_image_bytes_messages(world):
    cases = {
        "nope.png": "image file not found",
        "folder.png": "is a directory",
        "fifo.png": r"not a regular file \(a FIFO\)",
        "loop_a.png": "symbolic links",
        "empty.png": r"empty \(0 bytes\)",
        "too_big.png": "image file too large",
    }
    for name, pattern in cases.items():
        with pytest.raises(ImageError, match=pattern):
            read_image_bytes(world / name)
    with pytest.raises(ImageError, match=r"not a regular file \(a character device\)"):
        read_image_bytes("/dev/zero")
    with pytest.raises(ImageError, match="image file too large"):
        read_image_bytes(world / "g0.png", max_bytes=100)
    assert read_image_bytes(world / "g0.png") == (world / "g0.png").read_bytes()


def test_permission_denied_is_named(world, monkeypatch):
    # tests may run as root, who can read a chmod 000 file: simulate the refusal
    def refuse(path, flags, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(reading.os, "open", refuse)
    with pytest.raises(ImageError, match="g0.png: permission denied"):
        read_image_bytes(world / "g0.png")


def test_python_api_refuses_bad_files(world):
    scorer = specs_metric.load(world / "tiny.pt")
    for path, pattern in (
        ("/dev/zero", "not a regular file"),
        (world / "fifo.png", "FIFO"),
        (world / "folder.png", "is a directory"),
        (world / "tall_1x1000000.png", "aspect ratio too extreme"),
    ):
        with pytest.raises(ImageError, match=pattern):
            scorer.score([path], ["a caption"])


def test_extreme_images_are_refused_before_decoding(world, monkeypatch):
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for name in ("tall_1x1000000.png", "wide_100000x1.png"):
        data = (world / name).read_bytes()
        with pytest.raises(ImageError, match="aspect ratio too extreme"):
            open_image(data, name=name, resolution=224)
    # an image already decoded by the caller is refused before the resize
    monkeypatch.undo()
    with pytest.raises(ImageError, match="aspect ratio too extreme"):
        transform.preprocess(Image.new("L", (1, 200_000)), 224)
    # the limit leaves room for ordinary thin images: 1 x 500 is preprocessed
    assert transform.preprocess(Image.new("L", (1, 500)), 224).shape == (3, 224, 224)


def test_any_decoder_or_conversion_failure_is_an_image_error(world, monkeypatch):
    import struct as struct_module

    from PIL import ImageFile

    def crash(self):  # what a decoder bug on crafted data may raise
        raise struct_module.error("unpack requires a buffer of 4 bytes")

    data = (world / "g0.png").read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", crash)
        with pytest.raises(ImageError, match="g0.png: cannot decode image"):
            open_image(data, name="g0.png")
    with pytest.raises(ImageError, match="cannot preprocess"):
        transform.preprocess(Image.new("La", (7, 5)), 16)  # no conversion to RGB


_CHILD = """
import resource, sys
from specs_metric.cli import main
code = main(sys.argv[1:])
print("max_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def test_memory_stays_bounded_and_nothing_hangs(world, tmp_path):
    """The files that exhausted memory or blocked forever, in a child with capped memory."""
    import resource

    names = ["tall_1x1000000.png", "wide_100000x1.png", "/dev/zero", "fifo.png", "g0.png"]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(_line({"id": n, "image": n, "caption": "c"}) for n in names))
    out = tmp_path / "out.jsonl"

    def cap_memory():  # an unbounded read fails fast instead of taking the machine
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "score", "--model", str(world / "tiny.pt"),
         "--input", str(src), "--image-root", str(world), "--output", str(out),
         "--workers", "0", "--no-progress"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=cap_memory,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    errors = [r["error"] for r in read_score_rows(out)]
    assert all(errors[:4]) and errors[4] is None, errors
    max_rss_mb = int(done.stdout.split("max_rss_kb")[1]) / 1024
    assert max_rss_mb < 800, max_rss_mb

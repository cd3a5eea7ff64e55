"""Structured fuzzing of everything that reads untrusted bytes: scoring inputs (JSONL, CSV,
tables, webdataset shards), score files read back, and image bytes. Whatever the bytes, a
reader gives one row per input row (bad ones with an error) or raises a ``SpecsError``
naming the file; never another exception."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specs_metric.data.scorefiles import read_score_rows
from specs_metric.data.sources import read_rows
from specs_metric.errors import SpecsError
from specs_metric.processing.transform import decode_pixels

# More examples for a long run: SPECS_FUZZ_EXAMPLES=2000 python3 -m pytest THIS_FILE
FUZZ = settings(
    max_examples=int(os.environ.get("SPECS_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# JSON values of every type, nested a little
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),  # fmt: skip
    max_leaves=8,
)
fields = st.fixed_dictionaries(
    {}, optional={"id": json_values, "image": json_values, "caption": json_values}
)
# a line: a JSON object with fields of any type, any JSON value, or arbitrary bytes
lines = st.one_of(
    fields.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")),
)


def _read(path: Path) -> list | None:
    """The rows of ``path``, or None when the file as a whole was refused (a SpecsError)."""
    try:
        return list(read_rows(path, path.parent))
    except SpecsError:
        return None


@FUZZ
@given(st.lists(lines, max_size=12))
def test_jsonl_gives_one_row_per_line_whatever_the_bytes(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.jsonl"
        path.write_bytes(b"\n".join(content) + b"\n")
        rows = _read(path)
    if rows is None:  # refused as a whole: only for a file that starts like UTF-16/32
        assert content and content[0].startswith((b"\xff\xfe", b"\xfe\xff", b"\0\0\xfe\xff"))
        return
    # one row per non-blank line, lines split as a text file splits them (\n, \r, \r\n)
    text = (b"\n".join(content) + b"\n").decode("utf-8", "surrogateescape")
    text = text.removeprefix("\ufeff")
    expected = [seg for seg in re.split(r"\r\n|\r|\n", text) if seg.strip()]
    assert len(rows) == len(expected)
    for row in rows:
        assert row.error is not None or (isinstance(row.caption, str) and row.caption.strip())


@FUZZ
@given(
    st.lists(st.lists(st.text(max_size=8), min_size=1, max_size=4), max_size=8),
    st.sampled_from(["image,caption", "id,image,caption", "caption", "image,caption,id,x"]),
)
def test_csv_gives_rows_or_one_error(records, header):
    text = header + "\n" + "\n".join(",".join(r) for r in records) + "\n"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.csv"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        rows = _read(path)
    if rows is None:
        assert "image" not in header  # only a header without the needed columns
        return
    assert all(r.error is not None or isinstance(r.caption, str) for r in rows)


cells = st.one_of(
    st.none(), st.binary(max_size=30), st.text(max_size=15), st.integers(-(2**63), 2**63 - 1)
)


@FUZZ
@given(st.lists(st.tuples(cells, cells, cells), min_size=1, max_size=8))
def test_tables_give_one_row_per_table_row(values):
    # one column type per column: the fuzzed values are typed by their first non-null one
    columns = {}
    for k, name in enumerate(("image", "caption", "id")):
        col = [v[k] for v in values]
        kinds = {type(x) for x in col if x is not None}
        if len(kinds) > 1:  # arrow holds one type per column: make them all text
            col = [None if x is None else repr(x) for x in col]
        columns[name] = col
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.parquet"
        pq.write_table(pa.table(columns), path)
        rows = _read(path)
    assert rows is not None and len(rows) == len(values)


members = st.lists(
    st.tuples(st.sampled_from(["a.jpg", "a.txt", "a.json", "b.png", "b.txt", "c", "d.webp"]),
              st.binary(max_size=60)),  # fmt: skip
    max_size=6,
)


@FUZZ
@given(members, st.binary(max_size=30))
def test_shards_give_rows_or_an_error_row_whatever_the_members(content, tail):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in content:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tempfile.TemporaryDirectory() as d:
        for variant, data in (("ok", buf.getvalue()), ("cut", buf.getvalue()[:-700] + tail)):
            path = Path(d) / f"{variant}.tar"
            path.write_bytes(data)
            rows = _read(path)
            assert rows is not None
            assert all(r.error is not None or r.data for r in rows)


score_fields = st.fixed_dictionaries(
    {"id": json_values, "image": json_values, "caption": json_values},
    optional={"score": json_values, "cosine": json_values, "tokens": json_values,
              "truncated": json_values, "error": json_values, "segments": json_values},
)  # fmt: skip


@FUZZ
@given(st.lists(st.one_of(score_fields.map(json.dumps), json_values.map(json.dumps),
                          st.text(max_size=30).map(lambda s: s.replace("\n", " "))),
                max_size=8))  # fmt: skip
def test_score_files_give_typed_rows_or_one_error(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "scores.jsonl"
        path.write_text("\n".join(content) + "\n", encoding="utf-8", errors="surrogatepass")
        try:
            rows = list(read_score_rows(path))
        except SpecsError:
            return
    for row in rows:
        assert isinstance(row, dict)
        assert row.get("score") is None or isinstance(row["score"], (int, float))


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a",
                                                  b"\xff\xd8\xff", b"BM", b"RIFF"]))  # fmt: skip
def test_image_bytes_decode_or_give_an_image_error(data, magic):
    try:
        pixels = decode_pixels(magic + data, "fuzz", 16)
    except SpecsError:
        return
    assert tuple(pixels.shape) == (3, 16, 16)

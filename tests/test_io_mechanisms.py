"""The guarantees about files live in two modules, so a new command gets them for free:
every byte read comes through the bounded reader (``specs_metric.io.reading``) and every file
written goes through the safe writer (``specs_metric.io.writing``). This test reads the
source (``ast``) and lists any other place that opens, reads or writes a file itself."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "specs_metric"

# Calls that open, read or write files by name. ``open`` is the builtin (any mode); the
# attribute names are the pathlib, tempfile, os, shutil, pyarrow, numpy, torch and
# safetensors functions that do.
FILE_CALLS = {
    "open", "read_text", "read_bytes", "write_text", "write_bytes", "mkstemp",
    "NamedTemporaryFile", "replace", "rename", "copyfile", "copy", "copy2", "move",
    "read_table", "write_table", "ParquetFile", "ParquetWriter", "memory_map", "load",
    "save", "load_file", "save_file", "savefig",
}  # fmt: skip

# (module, call): the places allowed to make such a call, each for a stated reason.
ALLOWED = {
    # the two mechanisms themselves
    ("io/reading.py", "open"), ("io/reading.py", "read_table"), ("io/reading.py", "ParquetFile"),
    ("io/reading.py", "memory_map"),
    ("io/writing.py", "open"), ("io/writing.py", "replace"),
    # on a file object the bounded reader or the safe writer opened
    ("scoring/cache.py", "load"), ("scoring/cache.py", "save"),
    ("data/tables.py", "ParquetFile"), ("data/webdataset.py", "open"),
    ("training/examples.py", "open"), ("jobs/outputs.py", "ParquetWriter"),
    ("evaluation/reports/report.py", "savefig"), ("models/weights/checkpoint.py", "save"),
    ("synth/writer.py", "write_table"), ("training/prepare.py", "write_table"),
    ("demo/recipe.py", "write_table"), ("synth/writer.py", "save"),
    # a path the caller checked with io.reading.check_file / wrote with atomic_write first
    ("models/weights/checkpoint.py", "load"), ("models/weights/checkpoint.py", "load_file"),
    ("models/weights/checkpoint.py", "save_file"),
    # package data, not user input
    ("processing/tokenizer.py", "open"),
    # remote files (fsspec URLs, model downloads)
    ("data/locations.py", "open"),
    # a training checkpoint directory renamed into place (directories, not files)
    ("training/trainer.py", "replace"),
}  # fmt: skip

_PATH_LIBRARIES = ("np", "numpy", "torch", "pickle", "os", "shutil", "tempfile", "pq", "pa")


_FILE_MODULES = ("shutil", "tempfile", "os", "pyarrow", "numpy", "torch", "safetensors")


def _own_names(tree: ast.Module) -> set[str]:
    """Names that are not file functions: those a module defines or imports from the package
    itself (``write_text`` of io.writing is the safe writer, not ``Path.write_text``) or from
    a library that has nothing to do with files (``dataclasses.replace``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("specs_metric") or not module.startswith(_FILE_MODULES):
                names.update(alias.asname or alias.name for alias in node.names)
    return names


def _file_imports(tree: ast.Module) -> set[str]:
    """Names imported from a library that has file functions (``from shutil import copy``)."""
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(_FILE_MODULES)
        for alias in node.names
    }


def _is_file_call(node: ast.Call, own: set[str], file_imports: set[str]) -> str | None:
    """The file call ``node`` makes, or None (see :data:`FILE_CALLS`)."""
    func = node.func
    if isinstance(func, ast.Name):
        # a bare name: the builtin open, or a file function imported from a library
        if func.id == "open" or (func.id in FILE_CALLS and func.id in file_imports):
            return func.id
        return None
    if not isinstance(func, ast.Attribute) or func.attr not in FILE_CALLS:
        return None
    name, owner = func.attr, ast.unparse(func.value)
    if owner.split(".")[0] in own:
        return None  # e.g. writing.write_text(...), an own module's function
    if name == "copy" and not node.args:
        return None  # array.copy(), dict.copy()
    if name in ("load", "save", "copy", "move", "read_table", "write_table", "memory_map"):
        return name if owner.split(".")[0] in _PATH_LIBRARIES else None  # img.save(fh), ...
    if name in ("replace", "rename") and (len(node.args) != 1 or node.keywords):
        return None  # str.replace(old, new), dataclasses.replace(obj, field=...)
    if name == "open" and node.args and ast.unparse(node.args[0]).startswith("io.BytesIO("):
        return None  # decoding bytes already read
    return name


def _file_calls() -> set[tuple[str, str, int]]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        module = str(path.relative_to(PACKAGE))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own, file_imports = _own_names(tree), _file_imports(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (name := _is_file_call(node, own, file_imports)):
                found.add((module, name, node.lineno))
    return found


def test_files_are_opened_only_by_the_reader_and_the_writer():
    stray = sorted((m, n, line) for m, n, line in _file_calls() if (m, n) not in ALLOWED)
    assert not stray, "files opened outside io.reading / io.writing:\n" + "\n".join(
        f"{m}:{line}: {n}(...)" for m, n, line in stray
    )


def test_the_check_finds_a_stray_open(tmp_path, monkeypatch):
    # The check itself must see an open() anywhere, a method call or a builtin.
    fake = tmp_path / "specs_metric"
    (fake / "jobs").mkdir(parents=True)
    (fake / "jobs" / "x.py").write_text(
        "def f(p):\n    open(p, 'w').write('x')\n    p.write_text('y')\n    'a'.replace('a', 'b')\n"
    )
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    found = {(m, n) for m, n, _ in _file_calls()}
    assert found == {("jobs/x.py", "open"), ("jobs/x.py", "write_text")}

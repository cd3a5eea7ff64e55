"""webdataset tar shards: one row per sample.

A shard is a tar file whose members are grouped into samples by name, as webdataset does
it: the *key* is the member path up to the first dot of its file name, the *extension* all
that follows (``a/b/000123.jpg`` -> key ``a/b/000123``, extension ``jpg``). Consecutive
members with the same key form one sample; members without an extension are skipped.

A sample's image is its ``jpg``, ``jpeg``, ``png`` or ``webp`` member (the first present,
in that order); its caption is the ``txt`` member, or the ``caption_key`` field of the
``json`` member (``caption`` when there is no ``txt``); its id is the key.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from specs_metric.rows import Row, check_row
from specs_metric.sources import SourceOptions, open_binary

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name, or None for a name without an extension.

    >>> split_member("shard/000123.meta.json")
    ('shard/000123', 'meta.json')
    >>> split_member("README") is None
    True
    """
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else None


def samples(name: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for each sample of a shard, in tar order.

    Raises:
        ValueError: the file is not a readable tar archive (named in the message).
    """
    with open_binary(name) as fh:
        try:
            archive = tarfile.open(fileobj=fh, mode="r|*")
        except tarfile.TarError as exc:
            raise ValueError(f"{name}: not a readable tar shard ({exc})") from exc
        key, parts = None, {}
        try:
            for member in archive:
                if not member.isfile():
                    continue
                split = split_member(member.name)
                if split is None:
                    continue
                if split[0] != key:
                    if key is not None:
                        yield key, parts
                    key, parts = split[0], {}
                extracted = archive.extractfile(member)
                parts[split[1].lower()] = extracted.read() if extracted else b""
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ValueError(f"{name}: damaged tar shard after sample {key!r} ({exc})") from exc
        if key is not None:
            yield key, parts


def _caption(parts: dict[str, bytes], options: SourceOptions) -> tuple[object, str | None]:
    """The caption of a sample, or an error."""
    if options.caption_key is None and "txt" in parts:
        try:
            return parts["txt"].decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "the txt member is not valid UTF-8"
    field = options.caption_key or "caption"
    if "json" not in parts:
        wanted = f"a json member with {field!r}" if options.caption_key else "a txt or json member"
        return None, f"no caption ({wanted})"
    try:
        meta = json.loads(parts["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"the json member is not valid JSON ({exc})"
    if not isinstance(meta, dict) or field not in meta:
        return None, f"the json member has no field {field!r}"
    return meta[field], None


def shard_rows(name: str, options: SourceOptions) -> Iterator[Row]:
    """One :class:`Row` per sample of the shard ``name`` (image bytes in ``Row.data``).

    A shard that cannot be read on (not a tar file, cut short by a partial download) ends
    with one error row in place of what could not be read; the samples before it are kept.
    """
    shard = Path(name).name
    stream = samples(name)
    index = 0
    while True:
        try:
            key, parts = next(stream)
        except StopIteration:
            return
        except ValueError as exc:
            where = f"{shard}: after sample {index}"
            yield Row(index, index + 1, index, None, None, None, str(exc), where=where)
            return
        yield _sample_row(shard, index, key, parts, options)
        index += 1


def _sample_row(
    shard: str, index: int, key: str, parts: dict[str, bytes], options: SourceOptions
) -> Row:
    where = f"{shard}: sample {key!r}"
    image_ext = next((ext for ext in IMAGE_KEYS if ext in parts), None)
    caption, error = _caption(parts, options)
    row = Row(
        index,
        index + 1,
        key,
        f"{key}.{image_ext}" if image_ext else None,
        caption,
        None,
        None,
        parts[image_ext] if image_ext else None,
        where,
    )
    if image_ext is None:
        row.error = f"{where}: no image member ({', '.join(IMAGE_KEYS)})"
    elif error is not None:
        row.error = f"{where}: {error}"
    return check_row(row)

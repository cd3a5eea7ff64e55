"""webdataset tar shards: one row per sample.

A shard is a tar file whose members are grouped into samples by name, as webdataset does
it: the *key* is the member path up to the first dot of its file name, the *extension* all
that follows (``a/b/000123.jpg`` -> key ``a/b/000123``, extension ``jpg``). Consecutive
members with the same key form one sample; members without an extension are skipped.

A sample's image is its ``jpg``, ``jpeg``, ``png`` or ``webp`` member (the first present,
in that order); its caption is the ``txt`` member, or the ``caption_key`` field of the
``json`` member (``caption`` when there is no ``txt``); its id is the key.

Shards are untrusted: only the members a sample needs are read (others are skipped unread),
an image member over :data:`~specs_metric.limits.MAX_IMAGE_BYTES` or a text member over
:data:`~specs_metric.limits.MAX_LINE_CHARS` bytes is that sample's error without being read,
and sparse members (whose declared size need not match the archive) are refused. A member is
read only up to its declared size, so what a shard can make us hold is bounded whatever its
compression ratio.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from specs_metric.data.locations import open_binary
from specs_metric.data.rows import Row, SourceOptions, check_row
from specs_metric.errors import DataError
from specs_metric.limits import MAX_IMAGE_BYTES, MAX_LINE_CHARS

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_TEXT_KEYS = ("txt", "json")
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


def _member_limit(extension: str) -> int | None:
    """Most bytes read of a member with this extension; None: not needed, skipped unread."""
    if extension in IMAGE_KEYS:
        return MAX_IMAGE_BYTES
    if extension in _TEXT_KEYS:
        return MAX_LINE_CHARS
    return None


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes | str:
    """The member's bytes, or a problem (a ``str``) when it cannot be read in bounds."""
    if member.issparse():
        return f"member {member.name!r} is a sparse file"
    if member.size > limit:
        return f"member {member.name!r} too large ({member.size} bytes; the limit is {limit})"
    extracted = archive.extractfile(member)
    return extracted.read(limit + 1) if extracted else b""


def samples(name: str) -> Iterator[tuple[str, dict[str, bytes | str]]]:
    """``(key, {extension: bytes or a problem})`` for each sample of a shard, in tar order.

    Raises:
        DataError: the file is not a readable tar archive (named in the message).
    """
    with open_binary(name) as fh:
        try:
            archive = tarfile.open(fileobj=fh, mode="r|*")
        except tarfile.TarError as exc:
            raise DataError(f"{name}: not a readable tar shard ({exc})") from exc
        key, parts = None, {}
        try:
            for member in archive:
                if not member.isfile():
                    continue
                split = split_member(member.name)
                if split is None:
                    continue
                extension = split[1].lower()
                if split[0] != key:
                    if key is not None:
                        yield key, parts
                    key, parts = split[0], {}
                limit = _member_limit(extension)
                if limit is not None and extension not in parts:
                    parts[extension] = _read_member(archive, member, limit)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise DataError(f"{name}: damaged tar shard after sample {key!r} ({exc})") from exc
        if key is not None:
            yield key, parts


def _caption(parts: dict[str, bytes | str], options: SourceOptions) -> tuple[object, str | None]:
    """The caption of a sample, or an error."""
    if options.caption_key is None and "txt" in parts:
        if isinstance(parts["txt"], str):
            return None, parts["txt"]
        try:
            return parts["txt"].decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "the txt member is not valid UTF-8"
    field = options.caption_key or "caption"
    if "json" not in parts:
        wanted = f"a json member with {field!r}" if options.caption_key else "a txt or json member"
        return None, f"no caption ({wanted})"
    if isinstance(parts["json"], str):
        return None, parts["json"]
    try:
        meta = json.loads(parts["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"the json member is not valid JSON ({exc})"
    except RecursionError:
        return None, "the json member is not valid JSON (nested too deeply)"
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
        except DataError as exc:
            where = f"{shard}: after sample {index}"
            yield Row(index, index + 1, index, None, None, None, str(exc), where=where)
            return
        yield _sample_row(shard, index, key, parts, options)
        index += 1


def _sample_row(
    shard: str, index: int, key: str, parts: dict[str, bytes | str], options: SourceOptions
) -> Row:
    where = f"{shard}: sample {key!r}"
    image_ext = next((ext for ext in IMAGE_KEYS if ext in parts), None)
    caption, error = _caption(parts, options)
    if image_ext is not None and isinstance(parts[image_ext], str):
        error, image_ext = parts[image_ext], None
    elif image_ext is not None and not parts[image_ext]:
        error, image_ext = f"the {image_ext} member is empty (0 bytes)", None
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
    if image_ext is None and error is None:
        row.error = f"{where}: no image member ({', '.join(IMAGE_KEYS)})"
    elif error is not None:
        row.error = f"{where}: {error}"
    return check_row(row)

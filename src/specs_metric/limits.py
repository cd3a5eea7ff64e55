"""Every limit on what an input can make the package read or allocate, in one place.

Inputs are untrusted: a small file must not make a command allocate gigabytes, run for
hours or block. Each reader checks its limit before it allocates (a size declared in a
header, a member of an archive, a cell of a table) and turns a breach into a one-line error
or a row error naming the file or row. docs/errors.md lists them.
"""

from __future__ import annotations

# An image file or image cell (encoded bytes); larger ones are refused unread.
MAX_IMAGE_BYTES = 64 * 2**20
# Most pixels of the shorter-side resize (before the centre crop). 2**25 allows aspect ratios
# up to about 1:668 at resolution 224 (the resized image then takes ~100 MB as RGB). The
# decoder's own pixel limit is PIL's ``Image.MAX_IMAGE_PIXELS`` (decompression bombs).
MAX_RESIZED_PIXELS = 2**25
# A line of a JSONL or CSV input (characters); a longer line is a row error, skipped unread.
MAX_LINE_CHARS = 1 << 20
# Files one input spec may name (globs and brace ranges), counted before expanding.
MAX_INPUT_FILES = 1_000_000
# A small JSON description (dataset state, shard index, config) read whole.
MAX_METADATA_BYTES = 16 * 2**20
# Memory one decoding worker may need (the largest image PIL decodes, resized): the device
# policy runs at most one worker per this much of the machine's memory.
WORKER_MEMORY_BYTES = 2**30
# A JSON document read whole that is a data set or a list (COCO annotations, ShareGPT4V
# captions, class lists): larger ones must be JSON lines, read line by line.
MAX_JSON_INPUT_BYTES = 2 * 2**30

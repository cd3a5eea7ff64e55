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

# The body of one request to `specs serve` (its pairs' images arrive in it as base64).
MAX_REQUEST_BYTES = 64 * 2**20

# --- model files (checked by specs_metric.models.weights) ---

# Bounds on what a checkpoint may make us allocate. Weights do not compress (a real zip
# checkpoint is stored, not deflated), so a file whose members expand far beyond its own
# size is a zip bomb, not a model.
MAX_CHECKPOINT_BYTES = 64 << 30
MAX_EXPANSION = 20  # declared uncompressed bytes per byte on disk ...
EXPANSION_SLACK = 16 << 20  # ... plus this much, for small files with compressible members
MAX_PICKLE_BYTES = 64 << 20  # the pickled structure of a state dict is tiny
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit

# Bounds on the JSON files that describe a model (config.json, preprocessor_config.json,
# shard indexes, open_clip_config.json, --arch files, safetensors metadata). Real ones are a
# few KB (a large model's shard index a few hundred) and a few levels deep.
MAX_JSON_BYTES = 8 << 20
MAX_JSON_DEPTH = 32
# Ranges of the sizes a description may state, far above any CLIP model (ViT-bigG: 48
# layers, width 1664, MLP 8192). They keep arithmetic and messages sane; what bounds memory
# is the parameter count against the file's tensors (models.weights.validation.check_model_size).
MAX_LAYERS = 512
MAX_WIDTH = 1 << 16  # hidden, MLP, projection and head widths
MAX_CONTEXT = 1 << 16
MAX_VOCAB = 1 << 22
MAX_IMAGE_SIZE = 1 << 14  # image resolution, patch, resize and crop sizes
MAX_RESIZE_RATIO = 4  # resize / crop: CLIP pipelines resize to (about) the crop size

"""Shared by the integration tests: reference scores from `specs score`, the example images,
and a tiny causal LM with its tokenizer built locally (no Hugging Face Hub)."""

from __future__ import annotations

import json
from pathlib import Path

from specs_metric.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGES = sorted(str(p) for p in (ROOT / "examples" / "images").glob("*.png"))
DEMO = "specs-synth-demo"
CAPTIONS = [
    "The background is orange. There is a yellow diamond.",
    "There is a red star.",
    "The background is white. There is a teal heart. The teal heart is small.",
    "A blue circle in the top left.",
    "There is a purple square. The purple square is dotted.",
]

SENTENCES = [
    "a red circle above a blue square",
    "a green triangle left of a yellow circle",
    "describe the image in detail",
    "the picture shows two shapes on a white background",
    "a small purple square below a large orange triangle",
]


def reference_scores(
    tmp_path: Path,
    images: list,
    captions: list,
    *extra: str,
    model: str = DEMO,
    scale: str = "specs",
) -> list[dict]:
    """The output rows of `specs score` (run through the command line, with ``extra``
    options) for the pairs, in order: an independent computation of what an integration
    must return. Images are paths (a JSONL input) or all bytes (a parquet input)."""
    out = tmp_path / "reference_output.jsonl"
    if images and all(isinstance(i, bytes) for i in images):
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = tmp_path / "reference_input.parquet"
        table = {"id": [str(i) for i in range(len(images))], "image": images,
                 "caption": captions}  # fmt: skip
        pq.write_table(pa.table(table), src)
    else:
        src = tmp_path / "reference_input.jsonl"
        with open(src, "w", encoding="utf-8") as fh:
            for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
                rec = {"id": str(i), "image": str(image), "caption": caption}
                fh.write(json.dumps(rec) + "\n")
    code = main(["score", "--model", model, "--input", str(src), "--output", str(out),
                 "--device", "cpu", "--no-progress", "--scale", scale, "--overwrite",
                 *extra])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(len(images))]
    return rows


def tiny_tokenizer():
    """A word-level fast tokenizer with pad/bos/eos and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"])
    tok.train_from_iterator(SENTENCES + ["user : assistant system"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
        eos_token="<eos>",
    )  # fmt: skip
    # A space before each newline: jinja's trim_blocks would eat a newline after a tag.
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} \n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def tiny_policy(tokenizer, seed: int = 0):
    """A 2-layer Llama of width 32 over the tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``), read without W&B's
    servers: a 7-byte header (``:W&B``, a 2-byte magic, a version byte), then LevelDB log
    records in 32 KiB blocks (crc32c: 4 bytes, length: 2 bytes little-endian, type: 1
    byte; full=1, first=2, middle=3, last=4), each payload a serialized
    ``wandb_internal_pb2.Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, pending, out = 32 * 1024, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's trailer too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_history(path: Path) -> list[dict]:
    """The ``run.log`` rows of an offline W&B run file, values decoded from JSON."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})  # fmt: skip
    return rows


def tensorboard_events(folder: Path):
    """TensorBoard's own reader of the events under ``folder`` (everything kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc

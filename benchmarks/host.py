"""Host cost of ``specs score``: CPU per row of the whole process tree, with a model that costs
almost nothing, against the reference tokenizer's cost per caption.

On a GPU the model is fast and the host decides the speed: reading rows, tokenizing,
decoding images, batching, writing. This benchmark isolates that cost on any machine. It
builds a near-zero-cost model (width 64, 1 layer per tower, 248 text positions, random
weights), ``--images`` shared 640x480 JPEGs and ``--rows`` captions of 15-180 words drawn
Zipf-like from the CLIP vocabulary's whole ASCII words, then in one run measures:

- the baseline: CPU ms per caption of the reference tokenizer's work
  (``reference_style.ReferenceStyleTokenizer``: ftfy, HTML unescaping, BPE with its cache);
- ``specs score`` in a subprocess for each ``--workers`` value: user + system CPU of the
  whole process tree (the main process and its decoding workers, from ``wait4``), wall
  time and rows/s;
- the split of the work between tokenizing, reading and decoding images, the model,
  reading rows, writing and the rest, from an in-process job with no workers whose stage
  functions are wrapped with CPU timers;
- for each job, the fraction of its wall time the main process spent idle (waiting for the
  workers' chunks or on I/O): 1 - its own CPU time / wall time;
- a 1-row job, whose CPU is the fixed start-up cost (imports, model loading), so the
  marginal cost per row is ``(CPU - CPU of 1 row) / (rows - 1)``.

The ratio to watch is marginal CPU per row / reference tokenizer CPU per caption.

Usage:
    python benchmarks/host.py                       # 30,000 rows, workers 1 and 2
    python benchmarks/host.py --rows 5000 --workers 0 1 --json host.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from reference_style import ReferenceStyleTokenizer

from specs_metric.models.model import LongCLIP, ModelConfig
from specs_metric.models.weights.checkpoint import save_state_dict

SRC = Path(__file__).resolve().parents[1] / "src"

TINY = ModelConfig(
    embed_dim=32,
    image_resolution=224,
    vision_layers=1,
    vision_width=64,
    vision_patch_size=32,
    context_length=248,
    vocab_size=49408,
    text_width=64,
    text_layers=1,
)


def vocabulary_words(limit: int = 20000) -> list[str]:
    """Whole ASCII words of the CLIP BPE vocabulary, most frequent merges first."""
    raw = resources.files("specs_metric").joinpath("assets/bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(raw.read_bytes()).decode("utf-8").split("\n")[1:48895]
    words = []
    for line in lines:
        first, second = line.split()
        word = first + second[:-4]
        if second.endswith("</w>") and word.isascii() and word.isalpha():
            words.append(word)
    return words[:limit]


def make_corpus(root: Path, rows: int, n_images: int, seed: int) -> tuple[Path, list[str]]:
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        pixels = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.jpg", quality=90)
    words = vocabulary_words()
    weights = [1.0 / (rank + 10) for rank in range(len(words))]
    pick = random.Random(seed)
    captions = []
    with open(root / "rows.jsonl", "w", encoding="utf-8") as fh:
        for i in range(rows):
            caption = " ".join(pick.choices(words, weights, k=pick.randint(15, 180)))
            caption = caption.capitalize() + "."
            captions.append(caption)
            row = {"id": f"r{i}", "image": f"img{i % n_images}.jpg", "caption": caption}
            fh.write(json.dumps(row) + "\n")
    return root / "rows.jsonl", captions


def tokenizer_ms(captions: list[str]) -> float:
    """CPU ms per caption of the reference tokenizer's work (a fresh word cache)."""
    tok = ReferenceStyleTokenizer()
    started = time.process_time()
    for caption in captions:
        tok.token_ids(caption)
    return (time.process_time() - started) * 1000 / len(captions)


def stage_split(model: Path, rows: Path, out: Path) -> dict[str, float]:
    """CPU ms per row of each stage of an in-process job with no workers (one process does
    everything, so every stage is seen): each stage's functions are wrapped with timers."""
    import collections

    import specs_metric.jobs.chunks as chunks
    import specs_metric.jobs.job as job
    from specs_metric.processing import tokenizer
    from specs_metric.scoring import scorer as scorer_module

    spent: collections.Counter[str] = collections.Counter()
    wrapped = [
        (tokenizer.Tokenizer, "token_ids", "tokenize"),
        (chunks, "row_image_bytes", "read images"),
        (chunks, "decode_pixels", "decode"),
        # (the encode_* methods all go through these two)
        (scorer_module.Scorer, "encode_tokens_on_device", "model"),
        (scorer_module.Scorer, "encode_pixels_on_device", "model"),
        (job, "count_rows", "read rows"),
        (job, "json_line", "write"),
        (job, "write_final", "write"),
        (job, "job_summary", "write"),
    ]
    originals = []
    for owner, name, stage in wrapped:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def timed(*args, _f=original, _stage=stage, **kwargs):
            started = time.process_time()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_stage] += time.process_time() - started

        setattr(owner, name, timed)
    try:
        scorer = scorer_module.load(model, device="cpu")
        n = sum(1 for _ in open(rows, encoding="utf-8"))
        config = job.JobConfig(input=rows, output=out, num_workers=0, show_progress=False)
        started = time.process_time()
        job.run_job(config, scorer)
        total = time.process_time() - started
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    split = {stage: round(seconds * 1000 / n, 4) for stage, seconds in spent.most_common()}
    split["other (row bookkeeping)"] = round((total - sum(spent.values())) * 1000 / n, 4)
    return split


# Runs ``specs`` in this process and, at exit, writes the CPU of the main process and of its
# reaped children (the decoding workers) apart, so the main process's idle time is known.
_RUSAGE_WRAPPER = """
import json, os, resource, sys
from specs_metric.cli import main
try:
    code = main(sys.argv[1:])
finally:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.environ["HOST_RUSAGE"], "w") as f:
        json.dump({"main": own.ru_utime + own.ru_stime,
                   "workers": kids.ru_utime + kids.ru_stime}, f)
sys.exit(code)
"""


def run_job(model: Path, rows: Path, out: Path, workers: int) -> dict:
    """One ``specs score`` subprocess: wall seconds, CPU seconds of the tree and of its main
    process, its summary."""
    usage_file = out.with_name(out.name + ".rusage.json")
    env = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HOST_RUSAGE": str(usage_file),
    }
    cmd = [sys.executable, "-c", _RUSAGE_WRAPPER, "score", "--model", str(model)]
    cmd += ["--input", str(rows), "--output", str(out), "--workers", str(workers)]
    cmd += ["--no-progress", "--device", "cpu"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"specs score failed:\n{stderr}")
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    split = json.loads(usage_file.read_text())
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "main_cpu_s": split["main"],
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30000)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(args.seed)
        # random weights everywhere (the module leaves some tables uninitialised), LayerNorm
        # gains at 1, so that every score is a finite number like a real model's
        weights = {
            k: torch.ones_like(v) if k.endswith(".weight") and v.dim() == 1 else
            torch.randn_like(v) * 0.02
            for k, v in LongCLIP(TINY).state_dict().items()
        }
        model = save_state_dict(weights, root / "tiny.safetensors")
        rows, captions = make_corpus(root, args.rows, args.images, args.seed)
        one = root / "one.jsonl"
        one.write_text(rows.read_text(encoding="utf-8").split("\n", 1)[0] + "\n")
        baseline = tokenizer_ms(captions)
        print(f"reference tokenizer: {baseline:.3f} CPU ms per caption")
        results = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "rows": args.rows,
            "images": args.images,
            "reference_tokenizer_ms_per_caption": baseline,
            "jobs": [],
        }
        split = stage_split(model, rows, root / "split.jsonl")
        results["stages_cpu_ms_per_row_in_process"] = split
        print("stages (in-process, no workers), CPU ms per row:", json.dumps(split))
        for workers in args.workers:
            fixed = run_job(model, one, root / f"one-{workers}.jsonl", workers)
            job = run_job(model, rows, root / f"out-{workers}.jsonl", workers)
            marginal = (job["cpu_s"] - fixed["cpu_s"]) * 1000 / (args.rows - 1)
            entry = {
                "workers": workers,
                "wall_s": round(job["wall_s"], 3),
                "rows_per_s": round(args.rows / job["wall_s"], 1),
                "cpu_ms_per_row": round(job["cpu_s"] * 1000 / args.rows, 4),
                "startup_cpu_s": round(fixed["cpu_s"], 3),
                "marginal_cpu_ms_per_row": round(marginal, 4),
                "ratio_to_reference_tokenizer": round(marginal / baseline, 3),
                "main_cpu_ms_per_row": round(job["main_cpu_s"] * 1000 / args.rows, 4),
                # the main process waiting (for workers' chunks, or on I/O); below zero when
                # its threads used more than one core on average
                "main_idle_fraction": round(1 - job["main_cpu_s"] / job["wall_s"], 3),
            }
            results["jobs"].append(entry)
            print(json.dumps(entry))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

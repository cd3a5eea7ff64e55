"""Scoring speed and memory: reference-style loop vs exact mode vs fast (bf16) mode.

Builds full-size LongCLIP-B/32 shapes with random weights (vision 768 x 12, patch 32, 224 px;
text 512 x 12, 248 positions; embed 512), a corpus of images with 8 captions each
(15-200 words), and times in one run:

(a) a reference-style loop: one image and its captions at a time, captions padded to 248
    tokens, fp32, computed as the reference code does (``reference_style.py``:
    ``nn.MultiheadAttention``, full blocks);
(b) exact mode: ``specs score``'s streaming job in fp32 (length-sorted, trimmed batches,
    each image encoded once, decoding in a background worker);
(c) fast mode: the same job in bf16.

After a warm-up pass of each mode it runs ``--rounds`` rounds, each timing (a), (b) and (c)
one after the other, and reports each mode's best round (captions/s, ratios: the machine's
capability, as ``timeit`` reports) and the median of the per-round ratios (what a busy
shared machine gives). It also prints max |delta score| against (a), the share of
same-image caption pairs (reference gap > 1e-3) whose order fast mode keeps, peak RSS, and
the fraction of the measured matmul peak achieved. ``--stream-rows N`` also runs an
N-row ``specs score`` job with a tiny model in a subprocess and samples its memory (process
and decoding workers) over time; ``--stream-full-rows M`` does the same with the full-size
model in bf16, to show the footprint with the model included.

``--device cuda`` runs all three modes on the GPU (the reference-style model with its weights,
pixels and tokens on the device; ``torch.cuda.synchronize()`` before every timer read), fast
mode in ``--fast-precision`` (default fp16 on CUDA, bf16 on a CPU), measures the matmul peak
on the device (fp32 with TF32 disabled, and the fast dtype), reports the peak GPU memory of
each mode and names the GPU in the machine string. The stream jobs are off by default on
CUDA (``--stream-rows N`` turns them on; they then also run on the device). The jobs take
their batching from the device policy (``specs_metric.runtime.policy.device_policy``, recorded as
``device_policy``): on CUDA 256-image and 65,536-token batches, workers following the cores.

Throughput against the hardware (every mode, every round):

- **busy fraction** (``forward_busy_fraction``): the time inside the model's forward calls
  (``encode_image`` / ``encode_text``) over the mode's wall time. On CUDA it is read from
  ``torch.cuda.Event`` pairs recorded on the current stream around each call (the GPU's own
  timeline, no extra synchronisation; gaps between kernels inside a call count as busy, so
  it is an upper bound); on a CPU from the wall clock around each call. On CUDA one extra,
  untimed run of each job mode on the reference-style loop's rows under ``torch.profiler``
  (CUDA activity only) also gives ``kernel_busy_fraction``: the union of the GPU kernels'
  intervals over that run's wall time (the profiler slows the host a little, so this is a
  lower bound);
- **matmul peak fraction**: the mode's FLOPs (matmuls of the towers at trimmed lengths,
  from the model's config: ``gflop_per_image``, ``gflop_per_caption_mean``) per second over
  a measured peak: a model-shaped GEMM (tokens x 512 @ 512 x 2048) and a large square GEMM
  (``--peak-size``, default 8192 on CUDA), timed in the same run in fp32 (TF32 off) and in
  the fast dtype.

``--captions N`` sets the corpus size (``--per-image`` captions per image; default 20,480 on
CUDA, 128 on a CPU). The reference-style loop, whose speed does not depend on the corpus
size, runs on the first ``--reference-images`` images (default all on a CPU, 256 on CUDA);
ratios are of captions/s. ``--jpeg-images N`` adds the image-bound mode: N distinct 640x480
JPEGs, one caption each, scored by the real ``specs score`` job (decoding in its workers, no
image cache) in exact and fast mode, against the reference-style loop on the first
``--jpeg-reference-images`` of them (default on CUDA 8,192 images, 256 for the reference).
``--size tiny`` swaps B/32 for a tiny model (width 128, 2 layers: a wiring check in seconds).
With ``--json`` the results are rewritten after every stage, so a timeout keeps what ended.

Usage:
    python benchmarks/speed.py                       # ~10 minutes on 2 cores
    python benchmarks/speed.py --images 4 --stream-rows 0   # quick check
    python benchmarks/speed.py --size tiny --captions 32 --jpeg-images 8 --rounds 1 \
        --stream-rows 0 --stream-full-rows 0           # wiring check, seconds
    PYTHONPATH=src python benchmarks/speed.py --device cuda --json speed-cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from reference_style import ReferenceStyleCLIP

from specs_metric.data.scorefiles import read_score_rows
from specs_metric.jobs.job import JobConfig, run_job
from specs_metric.models.factory import build_model
from specs_metric.models.model import LongCLIP, ModelConfig
from specs_metric.processing.tokenizer import default_tokenizer
from specs_metric.runtime.numerics import strict_fp32, tf32_flags
from specs_metric.runtime.policy import available_cpus, device_policy
from specs_metric.scoring.scorer import Scorer

SRC = Path(__file__).resolve().parents[1] / "src"

B32 = ModelConfig(
    embed_dim=512,
    image_resolution=224,
    vision_layers=12,
    vision_width=768,
    vision_patch_size=32,
    context_length=248,
    vocab_size=49408,
    text_width=512,
    text_layers=12,
)
WORDS = (
    "a the red blue green small large wooden metal cat dog person table chair window "
    "on under next to behind sitting standing holding bright dark striped round square "
    "tree sky cloud street car bicycle building door light shadow with and of in near "
    "left right top bottom corner background foreground three two several old young"
).split()


TINY = ModelConfig(
    embed_dim=64,
    image_resolution=64,
    vision_layers=2,
    vision_width=128,
    vision_patch_size=16,
    context_length=248,
    vocab_size=49408,
    text_width=128,
    text_layers=2,
)
SIZES = {"b32": B32, "tiny": TINY}


def make_corpus(root: Path, n_images: int, per_image: int, seed: int) -> Path:
    """Random images (JPEG, 320x240) and captions of 15-200 words; returns the JSONL path."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320, 240), Image.BILINEAR).save(root / f"{i}.jpg")
        for j in range(per_image):
            words = rng.choice(WORDS, size=int(rng.integers(15, 201)))
            rows.append({"id": f"{i}-{j}", "image": f"{i}.jpg", "caption": " ".join(words) + "."})
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA) before a timer is read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_loop(scorer: Scorer, corpus: Path) -> tuple[np.ndarray, float]:
    """One image at a time, its captions padded to the full context, fp32, computed by
    the reference architecture (:mod:`reference_style`) with the scorer's weights, on the
    scorer's device."""
    device = scorer.device
    model = ReferenceStyleCLIP(scorer.model.state_dict(), device)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    by_image: dict[str, list[int]] = {}
    for k, r in enumerate(rows):
        by_image.setdefault(r["image"], []).append(k)
    scores = np.zeros(len(rows))
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for image, idx in by_image.items():
            pixels = scorer.preprocess(Image.open(corpus.parent / image))[None]
            img = model.encode_image(pixels.to(device))
            tokens = scorer.tokenize([rows[k]["caption"] for k in idx])
            txt = model.encode_text(tokens.to(device))
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            cos = (txt @ img.T)[:, 0].double().cpu().numpy()
            scores[idx] = np.maximum((cos + 1) / 2, 0)
    synchronize(device)
    return scores, time.perf_counter() - start


def subset_corpus(corpus: Path, n_images: int, name: str = "reference.jsonl") -> Path:
    """The rows of the corpus's first ``n_images`` images (in order), next to it."""
    rows, seen = [], []
    for line in corpus.read_text().splitlines():
        image = json.loads(line)["image"]
        if image not in seen:
            if len(seen) == n_images:
                break
            seen.append(image)
        rows.append(line + "\n")
    path = corpus.with_name(name)
    path.write_text("".join(rows))
    return path


def _write_jpeg(task: tuple[Path, int, int]) -> None:
    path, seed, _ = task
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)  # smooth, photo-like detail
    Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(path, quality=90)


def make_jpeg_corpus(root: Path, n_images: int, seed: int) -> Path:
    """``n_images`` distinct 640x480 JPEGs with one caption (15-200 words) each; returns the
    JSONL path. Written by a pool of processes (one per core)."""
    root.mkdir(parents=True, exist_ok=True)
    tasks = [(root / f"j{i}.jpg", seed * 1_000_003 + i, i) for i in range(n_images)]
    with multiprocessing.get_context("fork").Pool(min(available_cpus(), 32)) as pool:
        pool.map(_write_jpeg, tasks, chunksize=64)
    rng = np.random.default_rng(seed)
    rows = []
    for path, _, i in tasks:
        words = rng.choice(WORDS, size=int(rng.integers(15, 201)))
        rows.append({"id": i, "image": path.name, "caption": " ".join(words) + "."})
    corpus = root / "jpegs.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return corpus


class ForwardTimer:
    """Time inside the model's forward calls (``encode_image`` / ``encode_text``) of some
    scorers, over the wall time of the ``with`` block.

    On CUDA each call is bracketed by ``torch.cuda.Event``s on the current stream (read after
    the block's final synchronisation: the GPU timeline, no synchronisation per call); on a
    CPU by the wall clock (the calls are synchronous there).
    """

    def __init__(self, *scorers: Scorer) -> None:
        self.models = [s.model for s in scorers]
        self.cuda = scorers[0].device.type == "cuda"
        self.device = scorers[0].device
        self.marks: list[tuple] = []
        self.wall = 0.0

    def _wrap(self, method):
        def timed(*args, **kwargs):
            if self.cuda:
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                out = method(*args, **kwargs)
                end.record()
            else:
                start = time.perf_counter()
                out = method(*args, **kwargs)
                end = time.perf_counter()
            self.marks.append((start, end))
            return out

        return timed

    def __enter__(self) -> ForwardTimer:
        for model in self.models:
            for name in ("encode_image", "encode_text"):
                setattr(model, name, self._wrap(getattr(model, name)))
        synchronize(self.device)
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.wall = time.perf_counter() - self._started
        for model in self.models:
            for name in ("encode_image", "encode_text"):
                delattr(model, name)  # the class's method again

    @property
    def busy_seconds(self) -> float:
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in self.marks) / 1000
        return sum(b - a for a, b in self.marks)

    @property
    def busy_fraction(self) -> float:
        return self.busy_seconds / self.wall if self.wall else 0.0


def kernel_busy_fraction(run, device: torch.device) -> dict:
    """Run ``run()`` under ``torch.profiler`` (CUDA activity): the union of the GPU kernels'
    intervals over the run's wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        synchronize(device)
    wall = time.perf_counter() - start
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    )
    busy_us, reach = 0.0, -math.inf
    for a, b in spans:  # the union of the intervals (streams may overlap)
        if b > reach:
            busy_us += b - max(a, reach)
            reach = b
    return {
        "kernels": len(spans),
        "kernel_seconds": round(busy_us / 1e6, 4),
        "wall_seconds": round(wall, 3),
        "kernel_busy_fraction": round(busy_us / 1e6 / wall, 4),
    }


def job_scores(
    scorer: Scorer, corpus: Path, out: Path, workers: int | None
) -> tuple[np.ndarray, float]:
    """Scores of the ``specs score`` job on ``corpus`` (batching, workers: by device unless
    ``workers`` is given) and its wall time."""
    config = JobConfig(input=corpus, output=out, num_workers=workers, show_progress=False)
    start = time.perf_counter()
    run_job(config, scorer)
    synchronize(scorer.device)
    elapsed = time.perf_counter() - start
    return np.array([r["score"] for r in read_score_rows(out)]), elapsed


def order_kept(reference: np.ndarray, other: np.ndarray, per_image: int) -> tuple[float, int]:
    """Share of same-image caption pairs with reference gap > 1e-3 ordered alike."""
    kept = total = 0
    for start in range(0, len(reference), per_image):
        a, b = reference[start : start + per_image], other[start : start + per_image]
        for i in range(len(a)):
            for j in range(i + 1, len(a)):
                if abs(a[i] - a[j]) > 1e-3:
                    total += 1
                    kept += np.sign(a[i] - a[j]) == np.sign(b[i] - b[j])
    return kept / max(total, 1), total


def matmul_peak(
    dtype: torch.dtype,
    repeats: int = 10,
    trials: int = 5,
    device: str | torch.device = "cpu",
    shape: tuple[int, int, int] = (4096, 512, 2048),
) -> float:
    """Measured GFLOP/s of an (m x k) @ (k x n) GEMM, best of trials; by default model-shaped
    (tokens x 512 @ 512 x 2048).

    On CUDA, fp32 is measured with TF32 disabled (:func:`strict_fp32`), and the device is
    synchronised before each timer read.
    """
    device = torch.device(device)
    m, k, n = shape
    a = torch.randn(m, k).to(dtype).to(device)
    b = torch.randn(k, n).to(dtype).to(device)
    with strict_fp32() if device.type == "cuda" else contextlib.nullcontext():
        for _ in range(3):
            a @ b
        best = 0.0
        for _ in range(trials):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            synchronize(device)
            seconds = time.perf_counter() - start
            best = max(best, repeats * 2 * m * k * n / seconds / 1e9)
    return best


def tower_flops(width: int, layers: int, tokens: int) -> float:
    """Matmul FLOPs of a transformer tower on ``tokens`` positions (QKV, output and a 4x MLP:
    24 n w^2; attention scores and values: 4 n^2 w per layer)."""
    return layers * (24 * tokens * width * width + 4 * tokens * tokens * width)


def image_flops(config: ModelConfig) -> float:
    """Matmul FLOPs of one image: the patch convolution and the vision tower."""
    patch, width = config.vision_patch_size, config.vision_width
    n = (config.image_resolution // patch) ** 2 + 1
    return tower_flops(width, config.vision_layers, n) + 2 * n * 3 * patch * patch * width


def caption_flops(config: ModelConfig, tokens: int) -> float:
    """Matmul FLOPs of one caption of ``tokens`` ids, trimmed to them."""
    return tower_flops(config.text_width, config.text_layers, min(tokens, config.context_length))


def model_gflop(corpus: Path, n_images: int, config: ModelConfig = B32) -> float:
    """Matmul FLOPs of the corpus at trimmed lengths (what an ideal implementation needs)."""
    tok = default_tokenizer()
    total = sum(
        caption_flops(config, len(tok.token_ids(json.loads(line)["caption"])))
        for line in corpus.read_text().splitlines()
    )
    return (total + n_images * image_flops(config)) / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream_job(
    root: Path, rows: int, config: ModelConfig, precision: str = "fp32", device: str = "cpu"
) -> dict:
    """Run an N-row `specs score` in a subprocess on ``device``; sample its memory over time."""
    checkpoint = root / f"stream-{config.text_width}.pt"
    model = LongCLIP(config).init_weights(torch.Generator().manual_seed(0))
    torch.save(model.state_dict(), checkpoint)
    del model
    rng = np.random.default_rng(1)
    for i in range(50):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(root / f"s{i}.png")
    src = root / "stream.jsonl"
    with open(src, "w") as fh:
        for k in range(rows):
            words = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 40))))
            fh.write(json.dumps({"id": k, "image": f"s{k % 50}.png", "caption": words}) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "specs_metric",
        "score",
        "--model",
        str(checkpoint),
        "--precision",
        precision,
        "--input",
        str(src),
        "--output",
        str(root / "stream_out.jsonl"),
        "--device",
        device,
        "--no-progress",
    ]
    # This checkout's package first on the path (also where it is not installed).
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    samples = []
    start = time.perf_counter()
    while proc.poll() is None:
        samples.append(tree_rss_mb(proc.pid))
        time.sleep(0.2)
    elapsed = time.perf_counter() - start
    samples = [s for s in samples if s > 0]
    quarters = [samples[int(q * (len(samples) - 1))] for q in (0.25, 0.5, 0.75, 1.0)]
    return {
        "rows": rows,
        "seconds": round(elapsed, 1),
        "rows_per_s": round(rows / elapsed, 1),
        "peak_rss_mb_process_tree": round(max(samples), 1),
        "rss_mb_at_25_50_75_100pct": [round(x) for x in quarters],
        "returncode": proc.returncode,
    }


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the decoding workers), in MB."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="b32", help="model shapes")
    parser.add_argument(
        "--captions",
        type=int,
        default=None,
        help="corpus size in captions (default 20480 on CUDA, 128 on a CPU)",
    )
    parser.add_argument("--images", type=int, help="corpus size in images (overrides --captions)")
    parser.add_argument("--per-image", type=int, default=8)
    parser.add_argument(
        "--reference-images",
        type=int,
        default=None,
        help="images the reference-style loop scores (default: all on a CPU, 256 on CUDA)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="preparation workers (default: by device)"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu (default), cuda, cuda:1 ...: where all modes run"
    )
    parser.add_argument(
        "--fast-precision",
        choices=("bf16", "fp16"),
        default=None,
        help="precision of fast mode (default: bf16 on a CPU, fp16 on CUDA)",
    )
    parser.add_argument(
        "--jpeg-images",
        type=int,
        default=None,
        help="one caption per distinct 640x480 JPEG, uncached (default 8192 on CUDA, 0 = off "
        "on a CPU)",
    )
    parser.add_argument(
        "--jpeg-reference-images",
        type=int,
        default=256,
        help="JPEGs the reference-style loop scores in the JPEG mode (default 256)",
    )
    parser.add_argument(
        "--peak-size",
        type=int,
        default=None,
        help="m = k = n of the large GEMM of the matmul peak (default 8192 on CUDA, 1024 on "
        "a CPU; 0 = skip it)",
    )
    parser.add_argument(
        "--peak-trials", type=int, default=5, help="timed trials of each peak GEMM (best of)"
    )
    parser.add_argument(
        "--stream-rows",
        type=int,
        default=None,
        help="rows of the tiny-model stream job (default 100000; 0 on CUDA)",
    )
    parser.add_argument(
        "--stream-full-rows",
        type=int,
        default=None,
        help="rows of a stream job with the full-size model in fast precision (memory over "
        "time; default 1000; 0 on CUDA)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds after a warm-up (best and median; default 5, 2 on CUDA)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here (after each stage)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    fast_precision = args.fast_precision or ("fp16" if cuda else "bf16")
    if fast_precision == "fp16" and not cuda:
        parser.error("--fast-precision fp16 needs --device cuda")
    fast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[fast_precision]
    fast_key = f"fast_{fast_precision}"
    config = SIZES[args.size]
    captions = args.captions if args.captions is not None else (20480 if cuda else 128)
    n_images = args.images or max(1, math.ceil(captions / args.per_image))
    ref_images = min(args.reference_images or (256 if cuda else n_images), n_images)
    jpeg_images = args.jpeg_images if args.jpeg_images is not None else (8192 if cuda else 0)
    peak_size = args.peak_size if args.peak_size is not None else (8192 if cuda else 1024)
    rounds = args.rounds or (2 if cuda else 5)
    stream_rows = args.stream_rows if args.stream_rows is not None else (0 if cuda else 100_000)
    stream_full_rows = (
        args.stream_full_rows if args.stream_full_rows is not None else (0 if cuda else 1000)
    )

    torch.manual_seed(args.seed)
    weights = LongCLIP(config).init_weights(torch.Generator().manual_seed(args.seed)).state_dict()
    host = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"({available_cpus()} usable), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    results: dict = {"machine": host, "argv": sys.argv[1:] if argv is None else argv}
    if cuda:
        results["machine"] = (
            f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {host}"
        )
        results["device"] = str(device)
        results["tf32"] = tf32_flags()
    results["model_size"] = args.size
    results["device_policy"] = dataclasses.asdict(device_policy(device))

    def save() -> None:  # what has finished survives a timeout
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = make_corpus(root, n_images, args.per_image, args.seed)
        ref_corpus = subset_corpus(corpus, ref_images)
        warm_dir = root / "warm"
        warm_dir.mkdir()
        warm_corpus = make_corpus(warm_dir, 2, args.per_image, args.seed + 1)
        n = n_images * args.per_image
        n_ref = ref_images * args.per_image
        exact = Scorer(build_model(weights), device=device)
        fast = Scorer(build_model(weights), device=device, precision=fast_precision)
        workers = args.workers
        modes = {
            "reference": lambda c, out, s=exact: reference_loop(s, c),
            "exact": lambda c, out, s=exact: job_scores(s, c, out, workers),
            "fast": lambda c, out, s=fast: job_scores(s, c, out, workers),
        }
        corpora = {"reference": ref_corpus, "exact": corpus, "fast": corpus}
        counts = {"reference": n_ref, "exact": n, "fast": n}
        # Warm-up (first-call allocations, oneDNN kernel generation), then rounds that
        # interleave the three modes: on a shared machine the speed of the matrix units
        # drifts over minutes, and a ratio within one round compares like with like.
        for name, run in modes.items():
            run(warm_corpus, warm_dir / f"{name}.jsonl")
        seconds: dict[str, list[float]] = {name: [] for name in modes}
        busy: dict[str, list[float]] = {name: [] for name in modes}
        scores: dict[str, np.ndarray] = {}
        peak_gpu: dict[str, float] = {name: 0.0 for name in modes}
        # Both scorers' weights stay on the device through every mode's peak.
        resident_mb = torch.cuda.memory_allocated(device) / 2**20 if cuda else 0.0
        timed_models = {"reference": None, "exact": exact, "fast": fast}
        for r in range(rounds):
            for name, run in modes.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                timer = ForwardTimer(timed_models[name]) if timed_models[name] else None
                with timer or contextlib.nullcontext():
                    scores[name], elapsed = run(corpora[name], root / f"{name}-{r}.jsonl")
                seconds[name].append(elapsed)
                if timer is not None:
                    busy[name].append(timer.busy_fraction)
                if cuda:
                    peak = torch.cuda.max_memory_allocated(device) / 2**20
                    peak_gpu[name] = max(peak_gpu[name], peak)
        # Best round per mode (as timeit reports: slower rounds are other load on the
        # machine, not the code) and, next to it, the median of the per-round ratios.
        rate = {m: [counts[m] / t for t in seconds[m]] for m in modes}
        best = {m: max(rate[m]) for m in modes}
        ref_scores, ex_scores, fa_scores = scores["reference"], scores["exact"], scores["fast"]

        def ratios(a: str, b: str) -> dict:
            """How many times faster b is than a (captions/s)."""
            per_round = [y / x for x, y in zip(rate[a], rate[b], strict=True)]
            return {
                "best": round(best[b] / best[a], 2),
                "median_of_rounds": round(float(np.median(per_round)), 2),
                "per_round": [round(x, 2) for x in per_round],
            }

        def busy_of(name: str) -> dict:
            fastest = int(np.argmax(rate[name]))
            return {
                "best_round": round(busy[name][fastest], 4),
                "per_round": [round(x, 4) for x in busy[name]],
            }

        kept, pairs = order_kept(ref_scores, fa_scores[:n_ref], args.per_image)
        gflop = model_gflop(corpus, n_images, config)
        gflop_ref = model_gflop(ref_corpus, ref_images, config)
        # On CUDA one GEMM takes microseconds: more repeats per timer read.
        repeats = 100 if cuda else 10
        trials = args.peak_trials
        peak32 = matmul_peak(torch.float32, repeats, trials, device)
        peak16 = matmul_peak(fast_dtype, repeats, trials, device)
        peaks = {"fp32": round(peak32, 1), fast_precision: round(peak16, 1)}
        large32 = large16 = None
        if peak_size:
            big = (peak_size,) * 3
            large_repeats = 20 if cuda else 2
            large32 = matmul_peak(torch.float32, large_repeats, min(trials, 3), device, big)
            large16 = matmul_peak(fast_dtype, large_repeats, min(trials, 3), device, big)
            peaks[f"fp32_{peak_size}"] = round(large32, 1)
            peaks[f"{fast_precision}_{peak_size}"] = round(large16, 1)

        def peak_fractions(gflop_s: float, model_shaped: float, large: float | None) -> dict:
            out = {"model_shaped_gemm": round(gflop_s / model_shaped, 4)}
            if large:
                out[f"gemm_{peak_size}"] = round(gflop_s / large, 4)
            return out

        tok = default_tokenizer()
        lengths = [
            min(len(tok.token_ids(json.loads(line)["caption"])), config.context_length)
            for line in corpus.read_text().splitlines()
        ]
        results.update(
            {
                "captions": n,
                "images": n_images,
                "per_image": args.per_image,
                "rounds": rounds,
                "reference_loop": {
                    "captions": n_ref,
                    "captions_per_s": round(best["reference"], 2),
                    "seconds_per_round": [round(x, 2) for x in seconds["reference"]],
                    "matmul_peak_fraction": peak_fractions(
                        gflop_ref * best["reference"] / n_ref, peak32, large32
                    ),
                },
                "exact": {
                    "captions_per_s": round(best["exact"], 2),
                    "seconds_per_round": [round(x, 2) for x in seconds["exact"]],
                    "speedup": ratios("reference", "exact"),
                    "max_abs_delta_score": float(np.abs(ex_scores[:n_ref] - ref_scores).max()),
                    "matmul_peak_fraction": peak_fractions(
                        gflop * best["exact"] / n, peak32, large32
                    ),
                    "forward_busy_fraction": busy_of("exact"),
                },
                fast_key: {
                    "captions_per_s": round(best["fast"], 2),
                    "seconds_per_round": [round(x, 2) for x in seconds["fast"]],
                    "speedup": ratios("reference", "fast"),
                    "speedup_vs_exact": ratios("exact", "fast"),
                    "max_abs_delta_score": float(np.abs(fa_scores[:n_ref] - ref_scores).max()),
                    "pair_order_kept": round(kept, 4),
                    "pairs_compared": pairs,
                    "matmul_peak_fraction": peak_fractions(
                        gflop * best["fast"] / n, peak16, large16
                    ),
                    "forward_busy_fraction": busy_of("fast"),
                },
                "matmul_peak_gflops": peaks,
                "model_gflop_for_corpus": round(gflop, 1),
                "gflop_per_image": round(image_flops(config) / 1e9, 4),
                "gflop_per_caption_mean": round(
                    float(np.mean([caption_flops(config, k) for k in lengths])) / 1e9, 4
                ),
                "caption_tokens_mean": round(float(np.mean(lengths)), 1),
                "peak_rss_mb_in_process": round(peak_rss_mb(), 1),
            }
        )
        if cuda:
            results["fast_precision_in_use"] = fast.precision
            results["peak_gpu_memory_mb"] = {
                "reference_loop": round(peak_gpu["reference"], 1),
                "exact": round(peak_gpu["exact"], 1),
                fast_key: round(peak_gpu["fast"], 1),
                "resident_before_rounds": round(resident_mb, 1),
            }
        save()
        if cuda:  # an untimed run of each job mode under the profiler, on the reference's rows
            for name, key in (("exact", "exact"), ("fast", fast_key)):
                try:
                    results[key]["profiled_run"] = kernel_busy_fraction(
                        lambda run=modes[name], name=name: run(
                            ref_corpus, root / f"{name}-prof.jsonl"
                        ),
                        device,
                    )
                except Exception as exc:  # noqa: BLE001 - a profiler problem is a result too
                    results[key]["profiled_run"] = {"error": repr(exc)}
                save()
        if jpeg_images:
            results["jpeg"] = jpeg_mode(
                root / "jpeg",
                jpeg_images,
                args.jpeg_reference_images,
                exact,
                fast,
                fast_key,
                workers,
                args.seed,
            )
            save()
        del exact, fast, modes
        if stream_rows:
            results["stream_tiny_model"] = stream_job(root, stream_rows, TINY, device=args.device)
            save()
        if stream_full_rows:
            results[f"stream_{args.size}_{fast_precision}"] = stream_job(
                root, stream_full_rows, config, fast_precision, device=args.device
            )
    print(json.dumps(results, indent=2))
    save()
    return results


def jpeg_mode(
    root: Path,
    n_images: int,
    reference_images: int,
    exact: Scorer,
    fast: Scorer,
    fast_key: str,
    workers: int | None,
    seed: int,
) -> dict:
    """One caption per distinct JPEG, uncached: the ``specs score`` job in exact and fast
    mode (busy fraction included) against the reference-style loop on the first
    ``reference_images`` files."""
    start = time.perf_counter()
    corpus = make_jpeg_corpus(root, n_images, seed + 7)
    out: dict = {
        "images": n_images,
        "size": "640x480",
        "one_caption_each": True,
        "write_seconds": round(time.perf_counter() - start, 1),
    }
    ref_corpus = subset_corpus(corpus, min(reference_images, n_images), "jpeg-reference.jsonl")
    n_ref = len(ref_corpus.read_text().splitlines())
    ref_scores, ref_seconds = reference_loop(exact, ref_corpus)
    ref_rate = n_ref / ref_seconds
    out["reference_loop"] = {"pairs": n_ref, "pairs_per_s": round(ref_rate, 2)}
    for name, scorer in (("exact", exact), (fast_key, fast)):
        with ForwardTimer(scorer) as timer:
            scores, seconds = job_scores(scorer, corpus, root / f"{name}.jsonl", workers)
        out[name] = {
            "pairs_per_s": round(n_images / seconds, 2),
            "seconds": round(seconds, 2),
            "speedup_vs_reference_loop": round(n_images / seconds / ref_rate, 2),
            "forward_busy_fraction": round(timer.busy_fraction, 4),
            "max_abs_delta_score_vs_reference": float(np.abs(scores[:n_ref] - ref_scores).max()),
            "scores_file": f"{name}.jsonl",
        }
    return out


if __name__ == "__main__":
    main()

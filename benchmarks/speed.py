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
CUDA (``--stream-rows N`` turns them on; they then also run on the device).

Usage:
    python benchmarks/speed.py                       # ~10 minutes on 2 cores
    python benchmarks/speed.py --images 4 --stream-rows 0   # quick check
    PYTHONPATH=src python benchmarks/speed.py --device cuda --images 32 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

from specs_metric.factory import build_model
from specs_metric.job import JobConfig, run_job
from specs_metric.model import LongCLIP, ModelConfig
from specs_metric.numerics import strict_fp32, tf32_flags
from specs_metric.results import read_output
from specs_metric.scorer import Scorer
from specs_metric.tokenizer import default_tokenizer

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


def job_scores(scorer: Scorer, corpus: Path, out: Path, workers: int) -> tuple[np.ndarray, float]:
    config = JobConfig(input=corpus, output=out, num_workers=workers, show_progress=False)
    start = time.perf_counter()
    run_job(config, scorer)
    synchronize(scorer.device)
    elapsed = time.perf_counter() - start
    return np.array([r["score"] for r in read_output(out)]), elapsed


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
    dtype: torch.dtype, repeats: int = 10, trials: int = 5, device: str | torch.device = "cpu"
) -> float:
    """Measured GFLOP/s of a model-shaped GEMM (tokens x 512 @ 512 x 2048), best of trials.

    On CUDA, fp32 is measured with TF32 disabled (:func:`strict_fp32`), and the device is
    synchronised before each timer read.
    """
    device = torch.device(device)
    a = torch.randn(4096, 512).to(dtype).to(device)
    b = torch.randn(512, 2048).to(dtype).to(device)
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
            best = max(best, repeats * 2 * 4096 * 512 * 2048 / seconds / 1e9)
    return best


def model_gflop(corpus: Path, n_images: int) -> float:
    """Matmul FLOPs of the corpus at trimmed lengths (what an ideal implementation needs)."""
    tok = default_tokenizer()
    total = 0.0
    w, layers = B32.text_width, B32.text_layers
    for line in corpus.read_text().splitlines():
        n = min(len(tok.token_ids(json.loads(line)["caption"])), B32.context_length)
        total += layers * (24 * n * w * w + 4 * n * n * w)
    vw, n = B32.vision_width, (B32.image_resolution // B32.vision_patch_size) ** 2 + 1
    per_image = B32.vision_layers * (24 * n * vw * vw + 4 * n * n * vw) + 2 * n * 3 * 32 * 32 * vw
    return (total + n_images * per_image) / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--per-image", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
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
        "--rounds", type=int, default=5, help="timed rounds after a warm-up (best and median)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    fast_precision = args.fast_precision or ("fp16" if cuda else "bf16")
    if fast_precision == "fp16" and not cuda:
        parser.error("--fast-precision fp16 needs --device cuda")
    fast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[fast_precision]
    fast_key = f"fast_{fast_precision}"
    stream_rows = args.stream_rows if args.stream_rows is not None else (0 if cuda else 100_000)
    stream_full_rows = (
        args.stream_full_rows if args.stream_full_rows is not None else (0 if cuda else 1000)
    )

    torch.manual_seed(args.seed)
    weights = LongCLIP(B32).init_weights(torch.Generator().manual_seed(args.seed)).state_dict()
    host = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results: dict = {"machine": host}
    if cuda:
        results["machine"] = (
            f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {host}"
        )
        results["device"] = str(device)
        results["tf32"] = tf32_flags()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = make_corpus(root, args.images, args.per_image, args.seed)
        warm_dir = root / "warm"
        warm_dir.mkdir()
        warm_corpus = make_corpus(warm_dir, 2, args.per_image, args.seed + 1)
        n = args.images * args.per_image
        exact = Scorer(build_model(weights), device=device)
        fast = Scorer(build_model(weights), device=device, precision=fast_precision)
        modes = {
            "reference": lambda c, out, s=exact: reference_loop(s, c),
            "exact": lambda c, out, s=exact: job_scores(s, c, out, args.workers),
            "fast": lambda c, out, s=fast: job_scores(s, c, out, args.workers),
        }
        # Warm-up (first-call allocations, oneDNN kernel generation), then rounds that
        # interleave the three modes: on a shared machine the speed of the matrix units
        # drifts over minutes, and a ratio within one round compares like with like.
        for name, run in modes.items():
            run(warm_corpus, warm_dir / f"{name}.jsonl")
        seconds: dict[str, list[float]] = {name: [] for name in modes}
        scores: dict[str, np.ndarray] = {}
        peak_gpu: dict[str, float] = {name: 0.0 for name in modes}
        # Both scorers' weights stay on the device through every mode's peak.
        resident_mb = torch.cuda.memory_allocated(device) / 2**20 if cuda else 0.0
        for r in range(args.rounds):
            for name, run in modes.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                scores[name], elapsed = run(corpus, root / f"{name}-{r}.jsonl")
                seconds[name].append(elapsed)
                if cuda:
                    peak = torch.cuda.max_memory_allocated(device) / 2**20
                    peak_gpu[name] = max(peak_gpu[name], peak)
        # Best round per mode (as timeit reports: slower rounds are other load on the
        # machine, not the code) and, next to it, the median of the per-round ratios.
        t_ref, t_ex, t_fa = (min(seconds[m]) for m in modes)
        ref_scores, ex_scores, fa_scores = scores["reference"], scores["exact"], scores["fast"]

        def ratios(a: str, b: str) -> dict:
            per_round = [x / y for x, y in zip(seconds[a], seconds[b], strict=True)]
            return {
                "best": round(min(seconds[a]) / min(seconds[b]), 2),
                "median_of_rounds": round(float(np.median(per_round)), 2),
                "per_round": [round(x, 2) for x in per_round],
            }

        kept, pairs = order_kept(ref_scores, fa_scores, args.per_image)
        gflop = model_gflop(corpus, args.images)
        # On CUDA one GEMM takes microseconds: more repeats per timer read.
        repeats = 100 if cuda else 10
        peak32 = matmul_peak(torch.float32, repeats=repeats, device=device)
        peak16 = matmul_peak(fast_dtype, repeats=repeats, device=device)
        results.update(
            {
                "captions": n,
                "rounds": args.rounds,
                "reference_loop": {
                    "captions_per_s": round(n / t_ref, 2),
                    "seconds_per_round": [round(x, 2) for x in seconds["reference"]],
                },
                "exact": {
                    "captions_per_s": round(n / t_ex, 2),
                    "seconds_per_round": [round(x, 2) for x in seconds["exact"]],
                    "speedup": ratios("reference", "exact"),
                    "max_abs_delta_score": float(np.abs(ex_scores - ref_scores).max()),
                    "matmul_peak_fraction": round(gflop / t_ex / peak32, 3),
                },
                fast_key: {
                    "captions_per_s": round(n / t_fa, 2),
                    "seconds_per_round": [round(x, 2) for x in seconds["fast"]],
                    "speedup": ratios("reference", "fast"),
                    "speedup_vs_exact": ratios("exact", "fast"),
                    "max_abs_delta_score": float(np.abs(fa_scores - ref_scores).max()),
                    "pair_order_kept": round(kept, 4),
                    "pairs_compared": pairs,
                    "matmul_peak_fraction": round(gflop / t_fa / peak16, 3),
                },
                "reference_matmul_peak_fraction": round(gflop / t_ref / peak32, 3),
                "matmul_peak_gflops": {"fp32": round(peak32, 1), fast_precision: round(peak16, 1)},
                "model_gflop_for_corpus": round(gflop, 1),
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
        del exact, fast, modes
        if stream_rows:
            results["stream_tiny_model"] = stream_job(root, stream_rows, TINY, device=args.device)
        if stream_full_rows:
            results[f"stream_b32_{fast_precision}"] = stream_job(
                root, stream_full_rows, B32, fast_precision, device=args.device
            )
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Throughput of ``specs serve``: dynamic batching against one client without batching.

Starts ``specs serve`` twice, in two child processes on free ports of localhost:

- **no batching**: ``--max-batch-pairs PAIRS --max-wait-ms 0``, so every request is a batch
  of its own (and its images one forward pass);
- **batching**: ``--max-batch-pairs 64 --max-wait-ms 5`` (the defaults but the queue).

Against each it runs a closed loop of ``C`` clients (threads of this process, each with its
own kept-alive connection), each sending ``--requests`` requests of ``--pairs`` pairs and
waiting for each answer before the next: with 1 client and with ``--clients``. The four runs
are repeated ``--rounds`` times, interleaved (both servers stay up; an idle one costs
nothing), and the round with the median requests/s is reported: on a shared machine the
load changes between runs. Every pair has its own image (random shapes, PNG, sent as
base64), so the server's image-embedding memory never answers for the model; captions are
20-120 words. Reported per run: requests/s, pairs/s, the median and 95th percentile
latency, and the batching achieved (mean pairs per scored batch, from ``/health`` before
and after). The baseline of the speed-ups is measured in the same invocation: one client,
no batching.

The bundled demo model (64-pixel images, width 128) is so small that HTTP, JSON and image
decoding dominate; ``--b32`` serves a random checkpoint with SPECS's full ViT-B/32 shapes,
where the model dominates, as it does for the released model.

Usage:
    python benchmarks/serve.py                        # demo model, 8 clients
    python benchmarks/serve.py --b32 --requests 8     # B/32 shapes (slower)
    python benchmarks/serve.py --json serve.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

from specs_metric.integrations.client import SPECSClient  # noqa: E402
from specs_metric.io.writing import write_text  # noqa: E402

WORDS = (
    "a the red blue green small large round square circle star heart diamond striped dotted "
    "solid in on of left right top bottom middle corner background there is are two three"
).split()


def make_image(seed: int) -> bytes:
    """A 128x128 PNG of a few random shapes on a random background."""
    rng = random.Random(seed)
    img = Image.new("RGB", (128, 128), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 6)):
        x, y = rng.randrange(100), rng.randrange(100)
        size = rng.randint(8, 40)
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + size, y + size], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_requests(n: int, pairs: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for r in range(n):
        cells = []
        for p in range(pairs):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
            image = base64.b64encode(make_image(seed * 1_000_003 + r * pairs + p)).decode()
            cells.append({"image_b64": image, "caption": words})
        out.append(cells)
    return out


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "specs_metric", "serve", "--model", model, "--port", "0",
               "--device", "cpu", *extra]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, match.group(1)
    proc.kill()
    raise SystemExit("specs serve did not start:\n" + "".join(lines))


def closed_loop(url: str, clients: int, requests: list[list[list[dict]]]) -> dict:
    """``clients`` threads, thread c sending ``requests[c]`` one after the other."""
    client = SPECSClient(url, retries=0)
    before = client.health()
    latencies: list[float] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def run(c: int) -> None:
        mine = SPECSClient(url, retries=0)
        barrier.wait()
        for cells in requests[c]:
            t0 = time.perf_counter()
            try:
                results = mine.send(cells)
                bad = [r["error"] for r in results if r["error"]]
                if bad:
                    errors.append(bad[0])
            except Exception as exc:  # noqa: BLE001 (reported, not raised)
                errors.append(str(exc))
            latencies.append(time.perf_counter() - t0)
        mine.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = client.health()
    n_requests = sum(len(r) for r in requests[:clients])
    n_pairs = sum(len(cells) for r in requests[:clients] for cells in r)
    batches = after["batches"] - before["batches"]
    lat = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": n_requests,
        "pairs": n_pairs,
        "seconds": round(wall, 3),
        "requests_per_s": round(n_requests / wall, 1),
        "pairs_per_s": round(n_pairs / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "batches": batches,
        "mean_pairs_per_batch": round((after["pairs"] - before["pairs"]) / max(batches, 1), 2),
        "largest_batch": after["largest_batch"],
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def b32_checkpoint(folder: Path) -> str:
    """A random checkpoint with SPECS's ViT-B/32 shapes (LongCLIP, 248 positions)."""
    import torch

    from specs_metric.models.model import LongCLIP, ModelConfig

    config = ModelConfig(embed_dim=512, image_resolution=224, vision_layers=12,
                         vision_width=768, vision_patch_size=32, context_length=248,
                         vocab_size=49408, text_width=512, text_layers=12)  # fmt: skip
    path = folder / "b32-random.pt"
    torch.save(LongCLIP(config).init_weights(torch.Generator().manual_seed(0)).state_dict(), path)
    return str(path)


def _median_run(runs: list[dict]) -> dict:
    """The run with the median requests/s, with every round's requests/s beside it."""
    ordered = sorted(runs, key=lambda r: r["requests_per_s"])
    return {**ordered[len(ordered) // 2], "rounds_requests_per_s": [r["requests_per_s"]
                                                                   for r in runs]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="specs-synth-demo")
    ap.add_argument("--b32", action="store_true", help="a random model of ViT-B/32 shapes")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="requests per client")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per request")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the four runs, interleaved; the median is reported")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="specs-serve-bench-")
    model = b32_checkpoint(Path(tmp.name)) if args.b32 else args.model
    configs = {
        "no batching": ["--max-batch-pairs", str(args.pairs), "--max-wait-ms", "0"],
        "batching": ["--max-batch-pairs", "64", "--max-wait-ms", "5"],
    }
    # Both servers run at once (the idle one costs nothing) and the runs alternate, so a
    # change in the machine's load meets every configuration alike.
    servers = {name: start_server(model, extra + ["--max-queue-pairs", "4096"])
               for name, extra in configs.items()}  # fmt: skip
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for _, url in servers.values():  # warm-up: the first forward passes
            SPECSClient(url).send(make_requests(1, args.pairs, 999_999)[0])
        seed = 0
        for round_ in range(args.rounds):
            for name, (_, url) in servers.items():
                for clients in (1, args.clients):
                    # fresh images every run: the server's embedding memory never answers
                    reqs = [make_requests(args.requests, args.pairs, seed := seed + 1)
                            for _ in range(clients)]  # fmt: skip
                    run = {"server": name, "round": round_, **closed_loop(url, clients, reqs)}
                    results.setdefault((name, clients), []).append(run)
                    print(json.dumps(run), file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    runs = [_median_run(r) for r in results.values()]
    base = runs[0]
    for run in runs:
        run["speedup_vs_baseline"] = round(run["requests_per_s"] / base["requests_per_s"], 2)
    result = {
        "model": "random ViT-B/32 shapes" if args.b32 else args.model,
        "pairs_per_request": args.pairs,
        "requests_per_client": args.requests,
        "rounds": args.rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "baseline": "1 client, no batching",
        "runs": runs,
    }
    print(f"\nspecs serve, model {result['model']}, {args.pairs} pairs per request, median of "
          f"{args.rounds} rounds ({result['machine']}); baseline: 1 client, no batching")
    print("| server | clients | req/s | pairs/s | p50 ms | p95 ms | pairs/batch | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['server']} | {r['clients']} | {r['requests_per_s']} | {r['pairs_per_s']} | "
              f"{r['p50_ms']} | {r['p95_ms']} | {r['mean_pairs_per_batch']} | "
              f"{r['speedup_vs_baseline']}x |")  # fmt: skip
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")
    tmp.cleanup()
    failed = [r for r in runs if r["errors"]]
    if failed:  # every pair of the benchmark is valid: an error is a broken measurement
        raise SystemExit(f"{len(failed)} runs had errors, e.g. {failed[0]['first_error']}")
    return result


if __name__ == "__main__":
    main()

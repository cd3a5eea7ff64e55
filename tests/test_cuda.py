"""CUDA code paths of ``specs_metric`` in one short run (under 90 s on one GPU): a test
module, skipped where there is no GPU.

Checks, each against the CPU in fp32 (the reference numerics):

a. environment: Python, torch, CUDA and cuDNN versions, the GPU's name, capability and
   memory, bf16 support, the TF32 flags, and a matmul on the device;
b. scoring parity on a synthetic world (``specs_metric.synth.generate``, 120 scenes, seed 7;
   the bundled ``specs-synth-demo`` model; the 144 graded test candidates): the device in
   fp32 (library defaults, and again with TF32 off), fp16 and bf16 -> max |delta score| and
   the share of same-image caption pairs (CPU gap > 1e-3) whose order is kept. Expected:
   fp32 within 1e-5 (fails above 1e-4), fp16 / bf16 within 5e-3 keeping >= 99 % of the order;
c. the same with full-size LongCLIP-B/32 random weights (``speed.py``'s ``B32``) on 8 images
   x 8 captions, plus ``speed.py``'s reference-style model on the device;
d. the streaming job ``specs score`` in a subprocess on the device in fp16 against the CPU
   scores of (b); then ``--resume`` on the finished output: a no-op, identical bytes;
e. ``SPECSScore`` on the device (two updates, compute) against the mean of the CPU scores,
   then ``compute`` again inside a one-process process group (nccl on CUDA: the state is
   all-reduced on the device);
f. training: ``specs prepare`` on the world's train split, then ``specs train`` on the device
   from ``specs-synth-demo``, 20 steps in fp16 and in bf16 (``--deterministic``): exit 0,
   finite losses, the checkpoint loads with ``load()`` and scores, and a run resumed from the
   step-10 checkpoint ends with the same weights (max |delta weight|, expected 0);
g. ``specs bench intrinsic`` (``--json``) on the device against the same on the CPU: rates
   equal, or at most one image's per-image rates differ (both are reported); fp16 reported;
h. the device batch policy (``runtime.device_policy``): ``specs score`` with its defaults
   (on CUDA 256-image, 65,536-token batches, workers following the cores) in fp32 within
   1e-6 of the CPU (demo model on the world's candidates, and B/32 shapes on ``speed.py``'s
   corpus against the CPU job), fp16 / bf16 within the tolerances above;
i. fixed-shape image batches, reported (not failed): is each image's embedding bit-identical
   whatever its batch mates and position, when every batch is padded to the policy's batch
   size? And without padding (batches of 1, 7 and 256)? Per precision, the share of rows
   bit-identical to the image encoded alone and the max |delta|: the answer decides whether
   byte-identical resume can hold on CUDA with batching;
j. the pinned, non-blocking copy path (``Scorer.to_device``, one copy back per text call)
   against plain blocking copies: identical values; and whether fp16 / bf16 attention runs
   on the flash kernel and fp32 on the memory-efficient kernel (``sdpa_kernel`` allowing only
   that backend; reported).

Each check is one test (``test_check[a]`` ... ``test_check[g]``). A check records pass /
fail, its numbers and any traceback; a line is printed as it goes, and
``cuda_check.json`` is rewritten after every check and every expectation, so what finished
survives a timeout. The report goes to the folder ``$SPECS_CUDA_REPORT`` (else ``$OUT``,
else a pytest temporary folder); ``failed`` in it lists the checks that did not pass.
Temporary data lives in a temporary directory. Subprocesses run this checkout's ``src``
(``PYTHONPATH``).

The device is ``$SPECS_CUDA_DEVICE`` (default ``cuda``); the module is skipped when it is a
CUDA device and CUDA is not available, so CI without a GPU skips it at collection.
``SPECS_CUDA_DEVICE=cpu`` runs the same checks with the CPU as the "accelerator" (a wiring
check: fp16, which the Scorer and trainer refuse on a CPU, is replaced by bf16; training
runs bf16 and fp32). It took 1 to 3 minutes on 2 cores (75 s on an idle machine).

Usage:
    SPECS_CUDA_REPORT=runs/cuda-check python -m pytest -q tests/test_cuda.py   # GPU machine
    SPECS_CUDA_DEVICE=cpu python -m pytest -q tests/test_cuda.py -k "a or e"   # wiring check
    python tests/test_cuda.py --out DIR [--device cpu] [--only b,d]   # without pytest
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

try:  # the GPU machine may run this file as a script, without pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if __name__ == "__main__" and str(SRC) not in sys.path:  # a script run of this checkout
    sys.path.insert(1, str(SRC))

from specs_metric.data.scorefiles import read_score_rows  # noqa: E402
from specs_metric.models import fused  # noqa: E402
from specs_metric.models.factory import build_model  # noqa: E402
from specs_metric.models.model import LongCLIP  # noqa: E402
from specs_metric.models.weights.checkpoint import read_state_dict  # noqa: E402
from specs_metric.runtime.numerics import strict_fp32, tf32_flags  # noqa: E402
from specs_metric.runtime.policy import device_policy  # noqa: E402
from specs_metric.scoring.metric import SPECSScore  # noqa: E402
from specs_metric.scoring.scorer import Scorer, load  # noqa: E402
from specs_metric.synth import generate  # noqa: E402

DEVICE = os.environ.get("SPECS_CUDA_DEVICE", "cuda")

DEMO = "specs-synth-demo"
WORLD_SCENES, WORLD_SEED = 120, 7
FP32_FAIL, FP32_GOOD = 1e-4, 1e-5  # max |delta score| of device fp32 vs CPU fp32
POLICY_FP32_TOL = 1e-6  # specs score with the device's default batching, exact mode
HALF_TOL, ORDER_KEPT = 5e-3, 0.99  # fp16 / bf16
PG_ADDRESS = "tcp://127.0.0.1:29533"
TRAIN_STEPS, TRAIN_SAVE = 20, 10
TAIL = 3000  # characters of a subprocess's output kept in the report


# ----------------------------------------------------------------------------- helpers


def child_env() -> dict[str, str]:
    """This environment with the checkout's ``src`` first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


def cli(*args: object) -> list[str]:
    """A ``python -m specs_metric ARGS`` command line."""
    return [sys.executable, "-m", "specs_metric", *map(str, args)]


def tail(path: Path, chars: int = TAIL) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def run_commands(commands: dict[str, list[str]], logs: Path, timeout: float) -> dict[str, dict]:
    """Run the commands concurrently (output to ``logs/NAME.log``); wait for all of them.

    Several commands share the cores (``OMP_NUM_THREADS``, unless set). Returns per name:
    ``returncode`` (None after a timeout, when the child is killed), ``seconds``,
    ``command``, ``omp_num_threads`` and ``output_tail``.
    """
    logs.mkdir(parents=True, exist_ok=True)
    env = child_env()
    if len(commands) > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Concurrent children share the cores (oversubscribed, 2 CPU-bound runs on 2 cores
        # took 3x as long).
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(commands)))
    started: dict[str, tuple[subprocess.Popen, Path, float]] = {}
    for name, command in commands.items():
        log = logs / f"{name}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        started[name] = (proc, log, time.perf_counter())
    deadline = time.perf_counter() + timeout
    results = {}
    for name, (proc, log, start) in started.items():
        try:
            code = proc.wait(timeout=max(deadline - time.perf_counter(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        results[name] = {
            "returncode": code,
            "seconds": round(time.perf_counter() - start, 2),
            "command": shlex.join(commands[name]),
            "omp_num_threads": env.get("OMP_NUM_THREADS"),
            "output_tail": tail(log),
        }
    return results


def order_kept(reference: np.ndarray, other: np.ndarray, groups: Sequence) -> tuple[float, int]:
    """Share of same-group pairs with reference gap > 1e-3 that ``other`` orders alike."""
    members: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    kept = total = 0
    for idx in members.values():
        for i, j in itertools.combinations(idx, 2):
            if abs(reference[i] - reference[j]) > 1e-3:
                total += 1
                kept += int(np.sign(reference[i] - reference[j]) == np.sign(other[i] - other[j]))
    return kept / max(total, 1), total


def max_delta(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))))


def jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    return repr(value)


# ----------------------------------------------------------------------------- the report


class Check:
    """What one check records: numbers, expectations (pass/fail) and progress lines."""

    def __init__(self, key: str, on_change: Callable[[], None] = lambda: None) -> None:
        self.key = key
        self.numbers: dict[str, object] = {}
        self.expectations: list[dict] = []
        self.on_change = on_change

    def record(self, name: str, value: object) -> None:
        self.numbers[name] = value

    def expect(self, name: str, ok: bool, detail: str = "") -> bool:
        self.expectations.append({"name": name, "ok": bool(ok), "detail": detail})
        self.say(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
        self.on_change()  # what is known so far survives a timeout
        return bool(ok)

    def say(self, line: str) -> None:
        print(f"    [{self.key}] {line}", flush=True)


class Report:
    """``OUT/cuda_check.json``, rewritten after every check."""

    def __init__(self, out: Path, device: torch.device) -> None:
        self.path = out / "cuda_check.json"
        self.start = time.perf_counter()
        self.data: dict = {
            "script": "tests/test_cuda.py",
            "argv": sys.argv[1:],
            "device": str(device),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "complete": False,
            "elapsed_s": 0.0,
            "failed": [],
            "checks": {},
        }

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        # A check still "running" when the file is read was cut off: not passed.
        self.data["failed"] = [k for k, v in self.data["checks"].items() if v["status"] != "pass"]
        if self.data.get("error"):
            self.data["failed"].insert(0, "setup")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=jsonable) + "\n")
        os.replace(tmp, self.path)

    def run(self, key: str, title: str, body: Callable[[Check], None]) -> None:
        check = Check(key, self.write)
        entry: dict = {
            "title": title,
            "status": "running",
            "numbers": check.numbers,
            "expectations": check.expectations,
        }
        self.data["checks"][key] = entry
        self.write()
        print(f"[{key}] {title}", flush=True)
        start = time.perf_counter()
        error = None
        try:
            body(check)
        except Exception:  # one check's failure must not stop the others
            error = traceback.format_exc()
        failed = [e["name"] for e in check.expectations if not e["ok"]]
        status = "error" if error else "fail" if failed else "pass"
        entry.update(
            status=status,
            seconds=round(time.perf_counter() - start, 2),
            numbers=check.numbers,
            expectations=check.expectations,
            error=error,
        )
        self.write()
        if error:
            last = error.strip().splitlines()[-1]
            print(f"[{key}] ERROR after {entry['seconds']} s: {last}", flush=True)
        else:
            why = f": {', '.join(failed)}" if failed else ""
            print(f"[{key}] {status.upper()} in {entry['seconds']} s{why}", flush=True)


# ----------------------------------------------------------------------------- shared data


class Context:
    """Settings and data shared by the checks, made when first needed."""

    def __init__(self, device: torch.device, tmp: Path, timeout: float) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.tmp = tmp
        self.timeout = timeout
        # fp16 needs CUDA (Scorer and trainer refuse it on a CPU): bf16 stands in for it.
        self.fast = "fp16" if self.cuda else "bf16"
        self.half = ("fp16", "bf16") if self.cuda else ("bf16",)

    @cached_property
    def world(self) -> Path:
        root = self.tmp / "world"
        generate(root, n=WORLD_SCENES, seed=WORLD_SEED)
        return root

    @cached_property
    def graded(self) -> list[dict]:
        text = (self.world / "graded_test.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    @property
    def images(self) -> list[Path]:
        return [self.world / r["image"] for r in self.graded]

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self.graded]

    @property
    def groups(self) -> list[str]:
        return [r["image"] for r in self.graded]

    @cached_property
    def cpu_scores(self) -> np.ndarray:
        """CPU fp32 scores of the graded test candidates: the reference of b, d and e."""
        return load(DEMO, device="cpu").score(self.images, self.captions)


def compare(
    check: Check, name: str, reference: np.ndarray, scores: np.ndarray, groups, precision: str
) -> None:
    """Record max |delta| and the order kept; expect the tolerance of ``precision``."""
    delta = max_delta(reference, scores)
    kept, pairs = order_kept(reference, scores, groups)
    check.record(
        name,
        {
            "max_abs_delta": delta,
            "order_kept": kept,
            "pairs": pairs,
            "finite": bool(np.isfinite(scores).all()),
        },
    )
    detail = f"max|d|={delta:.2e}, order kept {kept:.4f} of {pairs} pairs"
    if precision == "fp32":
        check.record(f"{name}_within_{FP32_GOOD:g}", delta <= FP32_GOOD)
        check.expect(f"{name} within {FP32_FAIL:g}", delta <= FP32_FAIL, detail)
    else:
        check.expect(
            f"{name} within {HALF_TOL:g} and >= {ORDER_KEPT:.0%} order kept",
            delta <= HALF_TOL and kept >= ORDER_KEPT,
            detail,
        )


def device_variants(ctx: Context) -> list[tuple[str, str, bool]]:
    """(name, precision, TF32 off) of the device runs compared with CPU fp32."""
    # (TF32 flags only act on CUDA: on a CPU the second run checks the wiring.)
    variants = [("device_fp32", "fp32", False), ("device_fp32_tf32_off", "fp32", True)]
    variants += [(f"device_{p}", p, False) for p in ctx.half]
    return variants


# ----------------------------------------------------------------------------- checks


def package_versions() -> dict[str, str | None]:
    """Versions of the runtime dependencies (None: not installed)."""
    found: dict[str, str | None] = {}
    for name in ("numpy", "pillow", "ftfy", "regex", "safetensors", "pyarrow", "tqdm"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_environment(c: Check, ctx: Context) -> None:
    c.record("python", platform.python_version())
    c.record("torch", torch.__version__)
    c.record("torch_cuda", torch.version.cuda)
    c.record("cuda_available", torch.cuda.is_available())
    c.record(
        "host",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads",
    )
    c.record("tf32_flags", tf32_flags())
    c.record("packages", package_versions())
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        c.record("device_name", torch.cuda.get_device_name(ctx.device))
        c.record("capability", list(torch.cuda.get_device_capability(ctx.device)))
        c.record("memory_gib", round(props.total_memory / 2**30, 1))
        c.record("device_count", torch.cuda.device_count())
        c.record("cudnn", torch.backends.cudnn.version())
        c.record("nccl_available", dist.is_available() and dist.is_nccl_available())
        bf16 = torch.cuda.is_bf16_supported()
    else:
        c.record("device_name", platform.processor() or platform.machine())
        bf16 = fused.native_bf16()
    c.record("bf16_supported", bf16)
    c.expect("bf16 supported", bf16)
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    on_device = (x.to(ctx.device) @ x.to(ctx.device)).cpu()
    c.expect("float64 matmul on the device", torch.allclose(on_device, x @ x, atol=1e-9))


def check_synth_parity(c: Check, ctx: Context) -> None:
    start = time.perf_counter()
    c.record("candidates", len(ctx.graded))
    c.record("world_seconds", round(time.perf_counter() - start, 2))
    reference = ctx.cpu_scores
    c.record("cpu_fp32_mean", float(reference.mean()))
    scorer = None
    for name, precision, tf32_off in device_variants(ctx):
        if scorer is None or scorer.precision != precision:  # the fp32 runs share one
            scorer = load(DEMO, device=ctx.device, precision=precision)
        c.record(f"{name}_precision_in_use", scorer.precision)
        with strict_fp32() if tf32_off else contextlib.nullcontext():
            scores = scorer.score(ctx.images, ctx.captions)
        compare(c, name, reference, scores, ctx.groups, precision)


def _speed_benchmark():
    """benchmarks/speed.py, the source of the B/32 shapes and the reference-style loop (a
    script that imports its neighbour ``reference_style``, hence its folder on the path)."""
    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)
    import speed

    return speed


def check_b32_parity(c: Check, ctx: Context) -> None:
    speed = _speed_benchmark()
    B32, make_corpus, reference_loop = speed.B32, speed.make_corpus, speed.reference_loop
    root = ctx.tmp / "b32"
    root.mkdir()
    corpus = make_corpus(root, 8, 8, seed=0)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    images = [root / r["image"] for r in rows]
    captions = [r["caption"] for r in rows]
    groups = [r["image"] for r in rows]
    weights = LongCLIP(B32).init_weights(torch.Generator().manual_seed(0)).state_dict()
    reference = Scorer(build_model(weights), device="cpu").score(images, captions)
    c.record("captions", len(rows))
    scorer = None
    for name, precision, tf32_off in device_variants(ctx):
        if scorer is None or scorer.precision != precision:  # the fp32 runs share one
            scorer = None
            if ctx.cuda:
                torch.cuda.empty_cache()
            scorer = Scorer(build_model(weights), device=ctx.device, precision=precision)
        c.record(f"{name}_precision_in_use", scorer.precision)
        with strict_fp32() if tf32_off else contextlib.nullcontext():
            scores = scorer.score(images, captions)
        compare(c, name, reference, scores, groups, precision)
        if name == "device_fp32":
            # speed.py's baseline: the reference-style model, moved to the device.
            style, _ = reference_loop(scorer, corpus)
            compare(c, "reference_style_on_device", reference, style, groups, "fp32")


def check_score_job(c: Check, ctx: Context) -> None:
    out = ctx.tmp / "score" / "scores.jsonl"
    command = cli(
        "score",
        "--model",
        DEMO,
        "--device",
        ctx.device,
        "--precision",
        ctx.fast,
        "--input",
        ctx.world / "graded_test.jsonl",
        "--output",
        out,
        "--no-progress",
    )
    first = run_commands({"score": command}, ctx.tmp / "logs", ctx.timeout)["score"]
    c.record("score_run", first)
    if not c.expect(
        "specs score exits 0",
        first["returncode"] == 0,
        f"{first['seconds']} s, returncode {first['returncode']}",
    ):
        return
    rows = list(read_score_rows(out))
    errors = [r["error"] for r in rows if r["error"]]
    c.record("rows", len(rows))
    c.expect(
        "one output row per input row, no errors",
        len(rows) == len(ctx.graded) and not errors,
        f"{len(rows)} rows, errors {errors[:3]}",
    )
    scores = np.array([r["score"] for r in rows], dtype=float)
    compare(c, f"job_{ctx.fast}_vs_cpu_fp32", ctx.cpu_scores, scores, ctx.groups, ctx.fast)
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    c.record("summary", summary)
    c.expect(
        "summary names the device and precision",
        summary["device"].startswith(ctx.device.type) and summary["precision"] == ctx.fast,
        f"device {summary['device']}, precision {summary['precision']}",
    )
    before = out.read_bytes()
    second = run_commands({"resume": [*command, "--resume"]}, ctx.tmp / "logs", ctx.timeout)
    second = second["resume"]
    c.record("resume_run", second)
    c.expect("--resume exits 0", second["returncode"] == 0, f"{second['seconds']} s")
    after_summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    c.expect(
        "--resume on a finished output is a no-op (identical bytes, nothing encoded)",
        out.read_bytes() == before and after_summary["images_encoded_rank0"] == 0,
        f"images encoded by the resume: {after_summary['images_encoded_rank0']}",
    )


def check_metric(c: Check, ctx: Context) -> None:
    scorer = load(DEMO, device=ctx.device)
    metric = SPECSScore(scorer)
    half = len(ctx.graded) // 2
    metric.update(ctx.images[:half], ctx.captions[:half])
    metric.update(ctx.images[half:], ctx.captions[half:])
    value = metric.compute()
    expected = float(np.mean(ctx.cpu_scores))
    c.record("compute", value)
    c.record("cpu_mean", expected)
    c.record("count", metric.count)
    c.expect(
        f"compute() equals the mean of CPU scores within {FP32_FAIL:g}",
        abs(value - expected) <= FP32_FAIL and metric.count == len(ctx.graded),
        f"|d|={abs(value - expected):.2e}",
    )
    backend = "nccl" if ctx.cuda else "gloo"
    c.record("backend", backend)
    if ctx.cuda and ctx.device.index is not None:
        # (set_device refuses a device without an index; compute() uses the current one)
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(
        backend,
        init_method=PG_ADDRESS,
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        synced = metric.compute()
    finally:
        dist.destroy_process_group()
    c.record("compute_in_process_group", synced)
    c.expect(
        f"compute() in a 1-process {backend} group equals compute()",
        synced == value,
        f"{synced!r} vs {value!r}",
    )


def read_losses(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def check_training(c: Check, ctx: Context) -> None:
    root = ctx.tmp / "train"
    logs = ctx.tmp / "logs"
    data = root / "prepared.parquet"
    prep = run_commands(
        {
            "prepare": cli(
                "prepare", "--input", ctx.world / "train.parquet", "--output", data, "--quiet"
            )
        },
        logs,
        ctx.timeout,
    )["prepare"]
    c.record("prepare", prep)
    if not c.expect("specs prepare exits 0", prep["returncode"] == 0, f"{prep['seconds']} s"):
        return
    precisions = ("fp16", "bf16") if ctx.cuda else ("bf16", "fp32")
    common = [
        "--init",
        DEMO,
        "--data",
        data,
        "--max-steps",
        TRAIN_STEPS,
        "--batch-size",
        16,
        "--grad-accum",
        1,
        "--lr",
        1e-4,
        "--warmup-steps",
        2,
        "--save-every",
        TRAIN_SAVE,
        "--seed",
        3,
        "--workers",
        0,
        "--device",
        ctx.device,
        "--quiet",
        "--no-tensorboard",
    ]

    def train(suffix: str, extra: Callable[[str], list], deterministic: bool) -> dict[str, dict]:
        flags = ["--deterministic"] if deterministic else []
        commands = {
            f"{p}-{suffix}": cli(
                "train",
                *common,
                "--precision",
                p,
                "--output",
                root / f"{p}-{suffix}",
                *flags,
                *extra(p),
            )
            for p in precisions
        }
        return run_commands(commands, logs, ctx.timeout)

    deterministic = True
    straight = train("straight", lambda p: [], deterministic)
    if any(r["returncode"] != 0 and "eterministic" in r["output_tail"] for r in straight.values()):
        # An op without a deterministic CUDA kernel: record it, then compare resumed and
        # uninterrupted runs with the default kernels (whose weights may then differ a little).
        c.record("deterministic_failure", straight)
        c.expect("--deterministic training runs", False, "see deterministic_failure")
        deterministic = False
        straight = train("straight-nd", lambda p: [], deterministic)
    suffix = "straight" if deterministic else "straight-nd"
    c.record("deterministic", deterministic)
    for p in precisions:
        run = straight[f"{p}-{suffix}"]
        c.record(f"{p}_run", run)
        if not c.expect(f"{p}: specs train exits 0", run["returncode"] == 0, f"{run['seconds']} s"):
            continue
        out = root / f"{p}-{suffix}"
        log = read_losses(out / "train_log.csv")
        losses = [r["loss"] for r in log]
        c.record(f"{p}_losses", losses)
        c.expect(
            f"{p}: {TRAIN_STEPS} logged updates, all losses finite",
            len(log) == TRAIN_STEPS and all(math.isfinite(x) for x in losses),
            f"{len(log)} rows, first {losses[:1]}, last {losses[-1:]}",
        )
        scorer = load(out / "model.safetensors", device=ctx.device)
        scores = scorer.score(ctx.images, ctx.captions)
        c.record(f"{p}_trained_mean_score", float(scores.mean()))
        c.expect(
            f"{p}: trained checkpoint loads with load() and scores",
            bool(np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()),
            f"mean score {scores.mean():.4f} over {len(scores)} candidates",
        )

    def from_checkpoint(p: str) -> list:
        return ["--resume", root / f"{p}-{suffix}" / "checkpoints" / f"step-{TRAIN_SAVE}"]

    ok = [p for p in precisions if straight[f"{p}-{suffix}"]["returncode"] == 0]
    precisions = tuple(ok)
    if not precisions:
        return
    resumed = train("resumed", from_checkpoint, deterministic)
    for p in precisions:
        run = resumed[f"{p}-resumed"]
        c.record(f"{p}_resume_run", run)
        if not c.expect(
            f"{p}: resume from step {TRAIN_SAVE} exits 0",
            run["returncode"] == 0,
            f"{run['seconds']} s",
        ):
            continue
        a = read_state_dict(root / f"{p}-{suffix}" / "model.safetensors")
        b = read_state_dict(root / f"{p}-resumed" / "model.safetensors")
        delta = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        c.record(f"{p}_resume_max_abs_delta_weight", delta)
        c.expect(
            f"{p}: resumed run ends with the uninterrupted run's weights",
            a.keys() == b.keys() and delta == 0.0,
            f"max|d weight|={delta:.3e}",
        )


def check_intrinsic(c: Check, ctx: Context) -> None:
    root = ctx.tmp / "intrinsic"
    root.mkdir()
    runs = {
        "device_fp32": (ctx.device, "fp32"),
        "cpu_fp32": ("cpu", "fp32"),
        f"device_{ctx.fast}": (ctx.device, ctx.fast),
    }
    commands = {
        name: cli(
            "bench",
            "intrinsic",
            "--model",
            DEMO,
            "--data",
            ctx.world,
            "--device",
            device,
            "--precision",
            precision,
            "--json",
            root / f"{name}.json",
        )
        for name, (device, precision) in runs.items()
    }
    results = run_commands(commands, ctx.tmp / "logs", ctx.timeout)
    payloads = {}
    for name, result in results.items():
        c.record(f"{name}_run", result)
        if c.expect(
            f"{name}: bench intrinsic exits 0", result["returncode"] == 0, f"{result['seconds']} s"
        ):
            payloads[name] = json.loads((root / f"{name}.json").read_text())
    for name, payload in payloads.items():
        rates = {k: payload[k] for k in ("positive", "negative", "average", "n_images")}
        c.record(f"{name}_rates", rates)
        if payload.get("timing"):
            c.record(f"{name}_prefix_reuse_max_abs_diff", payload["timing"]["max_abs_diff"])
    if "cpu_fp32" not in payloads:
        return
    cpu = payloads["cpu_fp32"]
    for name in [n for n in payloads if n != "cpu_fp32"]:
        other = payloads[name]
        flips = [
            a["id"]
            for a, b in zip(cpu["per_image"], other["per_image"], strict=True)
            if (a.get("positive"), a.get("negative")) != (b.get("positive"), b.get("negative"))
        ]
        deltas = [
            max_delta(a[key], b[key]) if a[key] else 0.0
            for a, b in zip(cpu["per_image"], other["per_image"], strict=True)
            for key in ("caption_scores", "neg_scores")
        ]
        same = all(cpu[k] == other[k] for k in ("positive", "negative", "average"))
        c.record(
            f"{name}_vs_cpu",
            {
                "rates_equal": same,
                "images_differing": flips,
                "max_abs_delta_score": max(deltas, default=0.0),
            },
        )
        detail = (
            f"rates {other['positive']:.2f}/{other['negative']:.2f} vs "
            f"{cpu['positive']:.2f}/{cpu['negative']:.2f}, {len(flips)} image(s) differ, "
            f"max|d score|={max(deltas, default=0.0):.2e}"
        )
        if name == "device_fp32":
            c.expect(
                "device fp32 rates equal CPU's (at most one image differs)",
                same or len(flips) <= 1,
                detail,
            )
        else:
            c.say(f"info {name} vs cpu fp32: {detail}")


def _job_on_device(
    ctx: Context, name: str, model: object, source: Path, precision: str, device: object = None
) -> tuple[dict, list[dict], dict]:
    """``specs score`` (defaults: batching by device) in a subprocess -> run, rows, job record."""
    out = ctx.tmp / "policy" / f"{name}.jsonl"
    command = cli(
        "score",
        "--model",
        model,
        "--device",
        device or ctx.device,
        "--precision",
        precision,
        "--input",
        source,
        "--output",
        out,
        "--no-progress",
    )
    run = run_commands({name: command}, ctx.tmp / "logs", ctx.timeout)[name]
    if run["returncode"] != 0:
        return run, [], {}
    record = json.loads(out.with_name(out.name + ".job.json").read_text())
    return run, list(read_score_rows(out)), record


def check_policy_jobs(c: Check, ctx: Context) -> None:
    policy = device_policy(ctx.device)
    c.record("policy", dataclasses.asdict(policy))
    source = ctx.world / "graded_test.jsonl"
    for precision in ("fp32", *ctx.half):
        name = f"demo_{precision}"
        run, rows, record = _job_on_device(ctx, name, DEMO, source, precision)
        c.record(f"{name}_run", {k: run[k] for k in ("returncode", "seconds", "command")})
        ok = run["returncode"] == 0
        detail = f"{run['seconds']} s" if ok else run["output_tail"][-800:]
        if not c.expect(f"{name}: specs score exits 0", ok, detail):
            continue
        c.record(
            f"{name}_batching",
            {k: record.get(k) for k in ("batch_size", "token_budget", "chunk_rows", "threads")},
        )
        scores = np.array([r["score"] for r in rows], dtype=float)
        if precision == "fp32":
            delta = max_delta(ctx.cpu_scores, scores)
            c.record(f"{name}_max_abs_delta_vs_cpu", delta)
            c.expect(
                f"{name}: within {POLICY_FP32_TOL:g} of the CPU with the device's batching",
                delta <= POLICY_FP32_TOL and record.get("batch_size") == policy.image_batch,
                f"max|d|={delta:.2e}, batch_size {record.get('batch_size')}",
            )
        else:
            compare(c, f"{name}_vs_cpu_fp32", ctx.cpu_scores, scores, ctx.groups, precision)
    # Full-size shapes: the CPU job (CPU defaults) against the device job (device defaults).
    speed = _speed_benchmark()
    root = ctx.tmp / "policy-b32"
    root.mkdir(parents=True, exist_ok=True)
    corpus = speed.make_corpus(root, 16, 8, seed=1)
    weights = LongCLIP(speed.B32).init_weights(torch.Generator().manual_seed(1)).state_dict()
    checkpoint = root / "b32.pt"
    torch.save(weights, checkpoint)
    cpu_run, cpu_rows, _ = _job_on_device(ctx, "b32_cpu", checkpoint, corpus, "fp32", "cpu")
    dev_run, dev_rows, _ = _job_on_device(ctx, "b32_device", checkpoint, corpus, "fp32")
    c.record("b32_runs", {"cpu": cpu_run["seconds"], "device": dev_run["seconds"]})
    ok = cpu_run["returncode"] == 0 and dev_run["returncode"] == 0
    tails = "" if ok else cpu_run["output_tail"][-400:] + dev_run["output_tail"][-400:]
    if c.expect("b32: both jobs exit 0", ok, tails):
        for key in ("score", "cosine"):
            delta = max_delta([r[key] for r in cpu_rows], [r[key] for r in dev_rows])
            c.record(f"b32_max_abs_delta_{key}", delta)
            c.expect(
                f"b32 {key}: device job within {POLICY_FP32_TOL:g} of CPU job",
                delta <= POLICY_FP32_TOL,
                f"max|d|={delta:.2e}",
            )


def _pixels(ctx: Context, count: int, resolution: int) -> torch.Tensor:
    """``count`` distinct preprocessed images (the world's, cycled with a shift if short)."""
    scorer = load(DEMO, device="cpu")
    files = list(dict.fromkeys(ctx.images))
    base = torch.stack([scorer.preprocess(f) for f in files[:count]])
    if resolution != base.shape[-1]:
        base = torch.nn.functional.interpolate(base, size=resolution, mode="bilinear")
    out = [base[i % len(base)].roll(i // len(base), dims=-1) for i in range(count)]
    return torch.stack(out)


def check_fixed_shape(c: Check, ctx: Context) -> None:
    """Report whether an image's embedding depends on its batch (mates, position, size)."""
    batch = device_policy(ctx.device).image_batch if ctx.cuda else 16
    speed = _speed_benchmark()
    weights = LongCLIP(speed.B32).init_weights(torch.Generator().manual_seed(2)).state_dict()
    pixels = _pixels(ctx, 2 * batch, speed.B32.image_resolution)
    probes = [0, 1, batch // 2, batch - 1]  # images followed through the layouts
    others = [i for i in range(batch) if i not in probes]
    layouts = {  # rows of each batch; every layout holds all probes
        "in_order": list(range(batch)),
        "reversed": list(reversed(range(batch))),
        "other_mates": probes + list(range(batch, 2 * batch - len(probes))),
        "partial_7": probes + others[:3],
    }
    c.record("batch", batch)
    for precision in ("fp32", *ctx.half):
        scorer = Scorer(build_model(weights), device=ctx.device, precision=precision)
        results = {}
        for padded in (True, False):

            def embed(rows: list[int], pad: bool = padded, s: Scorer = scorer) -> torch.Tensor:
                x = pixels[rows]
                if pad and len(rows) < batch:
                    x = torch.cat([x, x.new_zeros(batch - len(rows), *x.shape[1:])])
                return s.encode_pixels(x)[: len(rows)]

            alone = {i: embed([i])[0] for i in probes}
            same = total = 0
            worst = 0.0
            for rows in layouts.values():
                emb = embed(rows)
                for i in probes:
                    row = emb[rows.index(i)]
                    total += 1
                    same += int(torch.equal(row, alone[i]))
                    worst = max(worst, float((row - alone[i]).abs().max()))
            results["padded" if padded else "unpadded"] = {
                "rows_compared": total,
                "bit_identical_share": round(same / total, 4),
                "max_abs_delta": worst,
            }
        c.record(precision, results)
        c.say(f"info {precision}: {results}")
        del scorer
        if ctx.cuda:
            torch.cuda.empty_cache()


def check_pinned_and_kernels(c: Check, ctx: Context) -> None:
    scorer = load(DEMO, device=ctx.device)
    pixels = _pixels(ctx, 24, scorer.resolution)
    ids, _ = scorer.tokenizer.fit(ctx.captions[:64], scorer.context_length)
    with torch.inference_mode(), scorer.forward_context():
        blocking_img = scorer.model.encode_image(pixels.to(ctx.device)).float().cpu()
    c.expect(
        "encode_pixels (pinned, non-blocking) equals a blocking copy",
        torch.equal(scorer.encode_pixels(pixels), blocking_img),
    )
    c.record("pinned_policy", device_policy(ctx.device).pin_memory)
    one_copy = scorer.embed_token_ids(ids, 2048, 16)
    per_batch = torch.empty_like(one_copy)
    from specs_metric.models.prefix import length_batches
    from specs_metric.processing.tokenizer import pad_ids
    from specs_metric.scoring.scorer import _pooled_length

    lengths = [_pooled_length(x) for x in ids]
    for rows in length_batches(lengths, 2048, 16):
        batch = pad_ids([ids[i][: lengths[i]] for i in rows])
        with torch.inference_mode(), scorer.forward_context():
            emb = scorer.model.encode_text(batch.to(ctx.device)).float().cpu()
        per_batch[torch.from_numpy(rows)] = emb
    c.expect(
        "embed_token_ids (one copy back) equals blocking per-batch copies",
        torch.equal(one_copy, per_batch),
    )
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:  # torch < 2.3
        c.record("sdpa_kernel", repr(exc))
        return
    tokens = pad_ids(ids[:32])
    wanted = {"fp32": SDPBackend.EFFICIENT_ATTENTION}
    wanted.update({p: SDPBackend.FLASH_ATTENTION for p in ctx.half})
    for precision, backend in wanted.items():
        model = (
            scorer if precision == "fp32" else load(DEMO, device=ctx.device, precision=precision)
        )
        # The causal blocks (is_causal, no mask) apart from the whole text tower, whose last
        # block pools one query per row under a boolean mask (which flash does not take).
        calls = [("text", lambda m=model: m.encode_tokens(tokens))]
        block = model.model.transformer.resblocks[0]
        if hasattr(block, "attn"):  # (not the CPU's fused bf16 blocks)
            weight = block.attn.in_proj_weight
            states = torch.randn(8, 77, weight.shape[1], device=ctx.device).to(weight.dtype)

            def causal_block(b=block, x=states):
                with torch.inference_mode():
                    return b(x, causal=True)

            calls.append(("text_causal_block", causal_block))
        calls.append(("image", lambda m=model: m.encode_pixels(pixels)))
        for tower, call in calls:
            try:
                with sdpa_kernel([backend]):
                    call()
                outcome = "ran"
            except RuntimeError as exc:
                outcome = f"refused: {str(exc).splitlines()[0][:300]}"
            c.record(f"sdpa_{precision}_{tower}_{backend.name.lower()}", outcome)
            c.say(f"info {precision} {tower} tower on {backend.name}: {outcome}")


CHECKS: dict[str, tuple[str, Callable[[Check, Context], None]]] = {
    "a": ("environment", check_environment),
    "b": ("scoring parity on the synthetic world (specs-synth-demo)", check_synth_parity),
    "c": ("scoring parity with full-size LongCLIP-B/32 random weights", check_b32_parity),
    "d": ("specs score streaming job on the device, and --resume", check_score_job),
    "e": ("SPECSScore on the device, and in a 1-process process group", check_metric),
    "f": ("training on the device (prepare, train, load, resume)", check_training),
    "g": ("specs bench intrinsic on the device vs the CPU", check_intrinsic),
    "h": ("specs score with the device's default batching vs the CPU", check_policy_jobs),
    "i": (
        "fixed-shape image batches: embeddings independent of the batch (report)",
        check_fixed_shape,
    ),
    "j": (
        "pinned non-blocking copies vs blocking; SDPA kernels (report)",
        check_pinned_and_kernels,
    ),
}
KEYS = {
    "a": "a_environment",
    "b": "b_synth_parity",
    "c": "c_b32_parity",
    "d": "d_score_job",
    "e": "e_metric",
    "f": "f_training",
    "g": "g_intrinsic",
    "h": "h_policy_jobs",
    "i": "i_fixed_shape",
    "j": "j_pinned_and_kernels",
}


# ----------------------------------------------------------------------------- pytest

if pytest is not None:
    pytestmark = pytest.mark.skipif(
        torch.device(DEVICE).type == "cuda" and not torch.cuda.is_available(),
        reason=f"device {DEVICE}: no CUDA GPU here",
    )

    @pytest.fixture(scope="module")
    def report(tmp_path_factory):
        folder = os.environ.get("SPECS_CUDA_REPORT") or os.environ.get("OUT")
        out = Path(folder) if folder else tmp_path_factory.mktemp("cuda-check")
        out.mkdir(parents=True, exist_ok=True)
        found = Report(out, torch.device(DEVICE))
        found.write()
        yield found
        found.data["complete"] = True
        found.write()

    @pytest.fixture(scope="module")
    def context(tmp_path_factory):
        timeout = float(os.environ.get("SPECS_CUDA_TIMEOUT", "300"))
        return Context(torch.device(DEVICE), tmp_path_factory.mktemp("cuda-data"), timeout)

    @pytest.mark.parametrize("key", list(CHECKS))
    def test_check(key, report, context):
        title, body = CHECKS[key]
        report.run(KEYS[key], title, lambda c: body(c, context))
        entry = report.data["checks"][KEYS[key]]
        failed = [f"{e['name']}: {e['detail']}" for e in entry["expectations"] if not e["ok"]]
        assert entry["status"] == "pass", entry.get("error") or "; ".join(failed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for cuda_check.json")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1 ..., or cpu")
    parser.add_argument("--only", default="", help="comma-separated checks to run, e.g. b,d")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300,
        help="seconds allowed to each group of subprocesses (default 300)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    report = Report(args.out, device)
    wanted = [k.strip() for k in args.only.split(",") if k.strip()] or list(CHECKS)
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown:
        parser.error(f"--only: unknown check(s) {unknown}; choose from {','.join(CHECKS)}")
    print(f"cuda_check on {device}: checks {','.join(wanted)}; report {report.path}", flush=True)
    report.write()
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            report.data["error"] = (
                f"--device {args.device}: torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"
            )
            print(f"ERROR: {report.data['error']}", flush=True)
            return 0
        with tempfile.TemporaryDirectory(prefix="cuda-check-") as tmp:
            ctx = Context(device, Path(tmp), args.timeout)
            for key in wanted:
                title, body = CHECKS[key]
                report.run(KEYS[key], title, lambda c, body=body: body(c, ctx))
        report.data["complete"] = True
    except BaseException:  # noqa: B036 - the report must survive anything, exit code 0
        report.data["error"] = traceback.format_exc()
        print(report.data["error"], flush=True)
    finally:
        report.write()
    failed = report.data["failed"]
    print(
        f"done in {report.data['elapsed_s']} s: "
        f"{'all passed' if not failed else 'not passed: ' + ', '.join(failed)}; "
        f"{report.path}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

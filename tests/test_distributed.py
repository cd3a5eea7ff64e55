"""Process groups of the ``specs`` commands: opened from torchrun's environment, then closed."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from factories import make_state_dict
from specs_metric.cli import main
from specs_metric.runtime.distributed import shard_range
from subprocesses import free_port


@pytest.fixture()
def retrieval_args(tmp_path):
    torch.save(make_state_dict(seed=5), tmp_path / "tiny.pt")
    rows = []
    for i in range(4):
        Image.new("RGB", (40, 30), (60 * i, 20, 200 - 40 * i)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"picture number {i}"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["bench", "retrieval", "--model", str(tmp_path / "tiny.pt"), "--data",
            str(tmp_path / "pairs.jsonl"), "--workers", "0", "--quiet", "--device", "cpu"]


def _cli_worker(rank: int, world: int, port: int, argv: list[str], queue) -> None:
    # What torchrun puts in each worker's environment.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    code = main(argv)
    queue.put((rank, code, dist.is_initialized()))


def test_commands_close_the_group_they_open(retrieval_args):
    # A rank that exits with its gloo group still open can abort at interpreter exit.
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_cli_worker, args=(2, free_port(), retrieval_args, queue), nprocs=2,
                       start_method="spawn")
    results = sorted(queue.get(timeout=120) for _ in range(2))
    assert results == [(0, 0, False), (1, 0, False)]


def test_commands_leave_a_callers_group_open(retrieval_args, tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert main(retrieval_args) == 0
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_shards_cover_the_rows_once_in_order():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            blocks = [list(shard_range(n, r, world)) for r in range(world)]
            assert sum(blocks, []) == list(range(n))
            sizes = [len(b) for b in blocks]
            assert max(sizes) - min(sizes) <= 1

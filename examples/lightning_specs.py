"""SPECS in a Lightning validation loop: ``self.log("val/specs", metric)``.

A LightningModule "captions" the validation images (here: a lookup of the captions in
``examples/captions.jsonl``, standing in for a captioning model's ``generate``), scores them
with :class:`specs_metric.integrations.lightning.SPECSMetric` and logs the epoch mean. The
validation loader shards the pairs over the ranks without the distributed sampler's
padding, so under DDP every pair is scored exactly once and the logged value equals
``specs score``'s mean of the same pairs.

Run (needs ``pip install 'specs-metric[lightning]'``)::

    python examples/lightning_specs.py                               # one process
    python examples/lightning_specs.py --devices 2 --strategy ddp    # 2 CPU processes (gloo)
    python examples/lightning_specs.py --model specs-b32 --json val.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from specs_metric.integrations.lightning import SPECSMetric, unrepeated_sampler
from specs_metric.io.jsonio import read_jsonl
from specs_metric.io.writing import write_text

HERE = Path(__file__).resolve().parent


class Pairs(Dataset):
    """(image path, reference caption) rows of a JSONL file."""

    def __init__(self, path: Path) -> None:
        rows = [rec for _, rec in read_jsonl(path, objects=True)]
        self.rows = [(str(path.parent / r["image"]), r["caption"]) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def collate(batch):
    images, captions = zip(*batch, strict=True)
    return list(images), list(captions)


class Captioner(L.LightningModule):
    def __init__(self, model: str, data: Path) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)  # the "captioning model" being trained
        self.data = data
        self.val_specs = SPECSMetric(model, device="cpu")

    def training_step(self, batch, batch_idx):
        return self.layer(torch.randn(2, 4)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        images, captions = batch
        generated = captions  # a real captioner: generated = self.generate(images)
        self.val_specs.update(images, generated)
        # Logging the Metric object: Lightning calls compute() at the end of the epoch
        # (state summed over the ranks) and resets it.
        self.log("val/specs", self.val_specs, on_step=False, on_epoch=True,
                 batch_size=len(images))  # fmt: skip

    def val_dataloader(self):
        pairs = Pairs(self.data)
        sampler = unrepeated_sampler(pairs, self.trainer)  # no padding: each pair once
        return DataLoader(pairs, batch_size=2, collate_fn=collate, sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description="SPECS in a Lightning validation loop")
    ap.add_argument("--model", default="specs-synth-demo")
    ap.add_argument("--data", type=Path, default=HERE / "captions.jsonl")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--json", type=Path, help="write the logged val/specs here (rank 0)")
    args = ap.parse_args()
    module = Captioner(args.model, args.data)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=args.strategy, max_epochs=1,
        limit_train_batches=2, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    train = DataLoader(Pairs(args.data), batch_size=2, collate_fn=collate)
    trainer.fit(module, train)
    if trainer.is_global_zero:
        value = float(trainer.callback_metrics["val/specs"])
        print(f"val/specs = {value:.6f} ({trainer.world_size} process(es))")
        if args.json:
            result = {"val/specs": value, "world_size": trainer.world_size}
            write_text(args.json, json.dumps(result) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

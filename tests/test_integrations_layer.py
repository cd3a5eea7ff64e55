"""The integrations layer stays optional: nothing below it (nor the command line outside
its `serve` command and `--log-to` hooks) imports the tools it integrates, every such
import in the layer is guarded or lives in a module that names its extra, and the service
client needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from subprocesses import child_env

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "specs_metric"
OPTIONAL = {"trl", "lightning", "pytorch_lightning", "torchmetrics", "tensorboard",
            "tensorboardX", "wandb", "fastapi", "uvicorn", "starlette", "lmms_eval",
            "transformers", "accelerate"}  # fmt: skip


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_core_imports_no_integrated_tool():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "integrations":
            continue
        for package in _imported_packages(path) & OPTIONAL:
            wrong.append(f"{rel}: {package}")
    assert not wrong, wrong


def test_light_modules_load_without_the_tools():
    """The client, the reward helpers and the lmms-eval task functions import neither
    torch's tools nor the integrated packages; the client not even torch."""
    code = (
        "import sys\n"
        "import specs_metric.integrations.client, specs_metric.integrations.rewards\n"
        "print('torch' in sys.modules)\n"
        "import specs_metric.integrations.lmms_eval, specs_metric.integrations.logging\n"
        "import specs_metric.integrations.trl, specs_metric.integrations.batcher\n"
        f"print(sorted(m for m in {sorted(OPTIONAL)!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["False", "[]"]

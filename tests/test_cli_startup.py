"""The command line loads command modules lazily: ``specs --help`` imports no torch."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from specs_metric.cli import BENCH_COMMANDS, COMMANDS, build_parser, main
from subprocesses import child_env

_PROBE = """
import json, sys
from specs_metric.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def _fresh_process(*argv: str) -> dict:
    """Run ``specs ARGV`` in a new interpreter; report its exit code and whether torch loaded."""
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], env=child_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["bench", "--help"]])
def test_help_does_not_import_torch(argv):
    assert _fresh_process(*argv) == {"code": 0, "torch": False}


def test_models_does_not_import_torch():
    assert _fresh_process("models") == {"code": 0, "torch": False}


def test_a_command_line_imports_only_its_command():
    seen = _fresh_process("score", "--help")
    assert seen["code"] == 0  # score's own parser was built (its --help printed)
    parser = build_parser(["bench", "human", "--help"])
    bench = _subcommands(parser)["bench"]
    human = _subcommands(bench)["human"]
    assert any(a.dest == "full_precision_weights" for a in human._actions)
    # the other commands are listed without their options
    assert not any(a.dest == "input" for a in _subcommands(parser)["score"]._actions)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {c.dest: c.help for c in action._choices_actions}


def test_command_table_help_equals_each_modules_help():
    full = build_parser()  # every module's register()
    assert {k: v for k, v in _help_lines(full).items() if k != "bench"} == {
        name: help_line for name, _, help_line in COMMANDS
    }
    assert _help_lines(_subcommands(full)["bench"]) == {
        name: help_line for name, _, help_line in BENCH_COMMANDS
    }
    lazy = build_parser(["--help"])
    assert _help_lines(lazy) == _help_lines(full)


def test_models_runs_through_the_lazy_parser(capsys):
    assert main(["models"]) == 0
    assert "specs-synth-demo" in capsys.readouterr().out

"""pipeline/cli.py: the lazy command table matches the command modules, and a command imports only its own module."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pipeline.commands
from pipeline.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[1]


def test_command_table_lists_every_command_of_every_command_module_and_nothing_else():
    found = {}
    for info in pkgutil.iter_modules(pipeline.commands.__path__):
        module = importlib.import_module(f"pipeline.commands.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            found[command.name] = info.name
    assert found == COMMANDS


def test_every_command_resolves_and_unknown_names_do_not():
    for name in cli.list_commands(None):
        assert cli.get_command(None, name).name == name
    assert cli.get_command(None, "no-such-command") is None


def test_run_does_not_import_the_other_commands_modules():
    code = ("import sys; from pipeline.cli import cli; cli.get_command(None, 'run'); "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.commands.')))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    assert p.stdout.strip() == "['pipeline.commands.run']"

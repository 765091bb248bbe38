"""The command line's commands, one module per command family.

The one convention: a module here defines its click commands (or one click group) and lists them in
`COMMANDS`; `pipeline/cli.py` registers every module's `COMMANDS` on the `clip-pipeline` group. A
command parses its options, calls the library (pipeline/run, query, model, ...) and maps errors to
exit codes; it holds no logic another command or a test would need. Heavy imports stay inside the
command functions so `clip-pipeline --help` stays fast.
"""

from __future__ import annotations

import json
import sys

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def ignore_signals() -> None:
    """The result is decided: a SIGINT/SIGTERM now must not turn it into a traceback or a death by
    signal (interpreter shutdown puts Python-level handlers back to the default; ignored stays ignored)."""
    import signal

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def fail(message: str, code: int = 2) -> None:
    ignore_signals()
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def load_config(config, inputs, output_dir, sets, devices=(), input_list=None):
    """The run's config from the command line: a TOML file, then -i/-o/-d/--list/--set on top."""
    from pipeline import config as cfgmod

    if input_list:
        sets = (*sets, f"input.list={json.dumps(input_list)}")
    return cfgmod.load(config, sets, input_paths=inputs, output_dir=output_dir, devices=devices)

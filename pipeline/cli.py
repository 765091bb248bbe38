"""The `clip-pipeline` command line (click): the group, and every command module's commands on it.

The group loads a command's module only when that command runs (`COMMANDS`: name -> module), so
`clip-pipeline run` does not import eval's, bench's or the cluster's dependencies: that halves the
main process's start-up (0.19 -> 0.09 s here), which a short job pays before any worker starts.
`--help` imports them all to list them. tests/test_cli.py checks the table against each module's
own `COMMANDS` list, so the two cannot drift.
"""

from __future__ import annotations

import importlib

import click

from pipeline.commands import CONTEXT

#: command name -> its module in pipeline/commands/ (each module lists its commands in COMMANDS)
COMMANDS = {
    "run": "run", "build-model": "model", "devices": "devices", "inspect": "inspect", "report": "report",
    "search": "search", "index": "index", "eval": "evaluate", "bench": "bench", "compile": "toolchain",
    "verify": "toolchain", "fetch-vocab": "text", "tokenize": "text", "embed-text": "text", "classify": "text",
    "plan": "cluster", "run-range": "cluster", "merge": "cluster", "status": "cluster", "serve": "serve",
}


def command_module(name: str):
    return importlib.import_module(f"pipeline.commands.{COMMANDS[name]}")


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use (click's documented lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        return next(c for c in command_module(cmd_name).COMMANDS if c.name == cmd_name)


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(package_name="clip-pipeline")
def cli() -> None:
    """Turn image directories into CLIP ViT-B/32 image embeddings, fast, on CPUs and SOPHON TPUs.

    Start with `clip-pipeline run --config configs/cpu.toml`, which embeds the bundled sample
    images with a synthetic model (random weights, built on first use).
    """


def main() -> None:
    cli()


if __name__ == "__main__":
    main()

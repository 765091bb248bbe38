"""The `clip-pipeline` command line (click): the group, and every command module's commands on it."""

from __future__ import annotations

import click

from pipeline.commands import (
    CONTEXT,
    bench,
    cluster,
    devices,
    evaluate,
    index,
    inspect,
    model,
    report,
    run,
    search,
    serve,
    text,
    toolchain,
)

COMMAND_MODULES = (run, model, devices, inspect, report, search, index, evaluate, bench, toolchain, text, cluster, serve)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="clip-pipeline")
def cli() -> None:
    """Turn image directories into CLIP ViT-B/32 image embeddings, fast, on CPUs and SOPHON TPUs.

    Start with `clip-pipeline run --config configs/cpu.toml`, which embeds the bundled sample
    images with a synthetic model (random weights, built on first use).
    """


for _module in COMMAND_MODULES:
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()

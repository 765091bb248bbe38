"""Runs into another directory than the configured output, whose shards a run then adopts.

`run --update` embeds its new inputs in `OUT/updates/.u-NNNN/` and publishes them after the
existing shards (RunDir.publish_update); `run-range` embeds a planned range in its attempt
directory, which `merge` adopts (RunDir.adopt_shard); a query or an evaluation embeds its images in
a work directory. Each is an ordinary, resumable run of the Supervisor, told the directory to write
into (`Supervisor(out=...)`): the config's output.dir keeps meaning the user's configured output.
The output keys that differ are overrides, because they say how that directory is written and are
recorded in its manifest (dtype and layout are part of what the run makes; an attempt is always
resumed and never pickled), where the directory itself is only where.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from pipeline.config import Config, InputConfig


def run_into(cfg: Config, directory: str | os.PathLike, *, inputs: InputConfig | None = None, restart: bool = False,
             progress: Any = None, log: Any = None, supervise: dict[str, Any] | None = None, **output: Any):
    """Run cfg's pipeline into `directory` (resumed if it holds this run already; no pickle) and
    return its RunResult. `inputs`: other inputs than cfg's; `output`: output keys that differ
    there (e.g. layout, dtype); `supervise`: further Supervisor arguments (a cluster range)."""
    from pipeline.run.supervisor import Supervisor

    run_cfg = cfg.replace(output=replace(cfg.output, on_existing="resume", pickle=False, **output),
                          input=inputs or cfg.input)
    return Supervisor(run_cfg, out=os.path.abspath(directory), restart=restart, progress=progress, log=log,
                      **(supervise or {})).run()

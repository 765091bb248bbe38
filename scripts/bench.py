#!/usr/bin/env python3
"""Run `clip-pipeline bench` from a checkout without installing it: python3 scripts/bench.py --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.commands.bench import bench  # noqa: E402

if __name__ == "__main__":
    bench(prog_name="scripts/bench.py")

"""What a run measures and shows (pipeline/run/telemetry.py): the progress line."""

from __future__ import annotations

from pipeline import config as cfgmod


def test_progress_line_says_starting_while_the_model_loads(tmp_path):
    import time as _time

    from pipeline.run.progress import Progress
    from pipeline.run.start import RunStart
    from pipeline.run.supervisor import Supervisor

    cfg = cfgmod.load(None, ['infer.backend="fake"'], input_paths=[str(tmp_path)], output_dir=str(tmp_path / "o"))
    sup = Supervisor(cfg, progress=Progress("none"))
    sup.devices = ["cpu:0"]
    sup.start = RunStart(cfg, sup.rundir, sup.listing_path, devices=sup.devices)  # what prepare() finds
    sup.plan()
    sup.telemetry.start(_time.monotonic())
    assert sup.view.stage_line().startswith("starting: 1 device(s) loading the model"), sup.view.stage_line()
    sup.telemetry.on_device_ready(_time.monotonic())
    assert not sup.view.stage_line().startswith("starting: ")

"""`report`'s verdict and charts (pipeline/query/report.py)."""

from __future__ import annotations


def test_report_verdict_names_model_start_up():
    """The quick start's report said "input-bound (every stage mostly idle)" when 6.5 of 8 s were
    the model starting."""
    from pipeline.query.report import charts, svg_chart, verdict

    rep = {"run_s": 8.0, "startup_s": 6.5, "per_stage": {"decode": {"busy_fraction": 0.05},
                                                         "infer": {"busy_fraction": 0.1}},
           "timeline": [{"t": 1.0, "done": 0}, {"t": 8.0, "done": 16}]}
    assert verdict(rep).startswith("start-up-bound: the model took 6.5 of 8.0 s to start")
    assert "model start-up" in svg_chart(charts(rep)[0])
    rep["startup_s"] = 1.5
    assert verdict(rep) == "input-bound (every stage mostly idle): infer 10% busy on average (model start-up 1.5 s)"

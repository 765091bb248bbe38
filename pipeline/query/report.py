"""`clip-pipeline report OUT`: where the time went, from OUT/report.json.

Text summary by default; `--html` writes a self-contained page (inline SVG, no scripts, nothing
fetched) and `--png` an image (drawn with Pillow), both with throughput, per-stage utilisation and
queue fill over time plus a summary table.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.rundir import RunDir
from pipeline.query.inspection import read_run

COLORS = {"decode": "#1f77b4", "preprocess": "#9467bd", "infer": "#d62728", "sink": "#2ca02c",
          "throughput": "#ff7f0e"}
STAGES = ("decode", "preprocess", "infer", "sink")


class NoReport(Exception):
    """OUT has no readable report.json (the message says what to do)."""


def load_report(out: str | Path) -> dict[str, Any]:
    out = Path(out)
    read_run(out)  # NotARun if it is not a run directory at all
    p = RunDir(out).report
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise NoReport(f"{p} does not exist: the run has not finished once yet "
                       f"({p.name} is written when a run ends, also when interrupted)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NoReport(f"{p} is not valid JSON ({exc})") from None


def runs_of(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run recorded in a report.json, oldest first (the earlier ones under "history")."""
    return [*[{k: v for k, v in r.items() if k != "history"} for r in rep.get("history", []) or []],
            {k: v for k, v in rep.items() if k != "history"}]


def _work(run: dict[str, Any]) -> int:
    if "inputs_this_run" in run:
        return int(run["inputs_this_run"] or 0)
    c = run.get("counts", {})
    return int(c.get("embedded", 0) or 0) + int(c.get("failed", 0) or 0) - int(run.get("resumed_from", 0) or 0)


def working_run(runs: list[dict[str, Any]]) -> int:
    """Index of the run that did the most work (the latest among equals): a no-op re-run of a
    finished run does not hide the run that embedded the images."""
    return max(range(len(runs)), key=lambda i: (_work(runs[i]), i))


def runs_table(runs: list[dict[str, Any]], chosen: int) -> str:
    lines = [f"{len(runs)} runs over this output directory (report.json history):"]
    for i, r in enumerate(runs):
        mark = "*" if i == chosen else " "
        what = f" (update {r['update']}: run --update)" if r.get("update") else ""
        lines.append(f" {mark} run {i + 1}{what}: {r.get('finished', '?')}  {r.get('wall_s', 0):.1f} s, "
                     f"{_work(r)} inputs this run, {r.get('images_per_s') or 0:.1f} images/s")
    return "\n".join(lines)


@dataclass
class Series:
    name: str
    color: str
    xs: list[float]
    ys: list[float]


@dataclass
class Chart:
    title: str
    y_label: str
    series: list[Series]
    y_max: float
    x_max: float
    startup_s: float | None = None  # shaded and labelled: the model starting, before any device was ready


def charts(rep: dict[str, Any]) -> list[Chart]:
    """Throughput, stage utilisation and queue fill over time, from the report's timeline."""
    tl = [p for p in rep.get("timeline", []) if "t" in p]
    x_max = max([p["t"] for p in tl] + [rep.get("run_s") or 0, 1e-9])
    xs, rates = [], []
    prev_t, prev_done = 0.0, tl[0]["done"] if tl and rep.get("resumed_from") else 0
    if rep.get("resumed_from"):
        prev_done = rep["resumed_from"]
    for p in tl:
        dt = p["t"] - prev_t
        if dt > 0:
            xs.append(p["t"])
            rates.append(max(0.0, (p["done"] - prev_done) / dt))
        prev_t, prev_done = p["t"], p["done"]
    out = [Chart("Throughput", "images/s", [Series("images/s", COLORS["throughput"], xs, rates)],
                 max(rates + [1.0]) * 1.1, x_max)]
    util = [Series(s, COLORS[s], [p["t"] for p in tl if s in p.get("util", {})],
                   [100 * p["util"][s] for p in tl if s in p.get("util", {})]) for s in STAGES]
    out.append(Chart("Stage utilisation (busy % of the stage's workers)", "% busy",
                     [s for s in util if s.xs], 100.0, x_max))
    cap = rep.get("queue_occupancy", {}).get("capacity", {})
    fill = []
    for s in STAGES:
        pts = [(p["t"], 100 * p["queues"][s] / cap[s]) for p in tl if s in p.get("queues", {}) and cap.get(s)]
        if pts:
            fill.append(Series(f"into {s}", COLORS[s], [a for a, _ in pts], [b for _, b in pts]))
    if fill:
        top = max(100.0, max(max(s.ys) for s in fill))
        out.append(Chart("Queue fill (messages in transit, % of queue depth x receiving workers)", "% of depth",
                         fill, top * 1.05, x_max))
    for ch in out:
        ch.startup_s = rep.get("startup_s")
    return out


def verdict(rep: dict[str, Any]) -> str:
    """Which stage limited the run, from the mean busy fraction of each stage; a run that spent
    most of its time starting the model says so first (the stages idle while it loads)."""
    per = {s: v.get("busy_fraction") for s, v in rep.get("per_stage", {}).items() if v.get("busy_fraction") is not None}
    startup, run_s = rep.get("startup_s"), rep.get("run_s") or 0
    start = (f"start-up-bound: the model took {startup:.1f} of {run_s:.1f} s to start"
             if startup and run_s and startup >= 0.5 * run_s else "")
    if not per:
        return start or "no stage statistics recorded"
    top = max(per, key=lambda s: (per[s], s == "infer"))
    infer = per.get("infer")
    head = f"{top}-bound" if per[top] >= 0.5 else "input-bound (every stage mostly idle)"
    busy = f": infer {infer * 100:.0f}% busy on average" if infer is not None else ""
    if start:
        return start + (f"; infer {infer * 100:.0f}% busy on average" if infer is not None else "")
    note = f" (model start-up {startup:.1f} s)" if startup and startup >= 1 else ""
    return head + busy + note


def _precision(rep: dict[str, Any]) -> str:
    """" (bf16)" for an engine that records its precision (openvino), else nothing."""
    p = ((rep.get("model") or {}).get("engine") or {}).get("precision")
    return f" ({p})" if p else ""


def summary_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    c = rep.get("counts", {})
    rows = [
        ("wall time", f"{rep.get('wall_s', 0):.1f} s (pipeline running {rep.get('run_s', 0) or 0:.1f} s)"),
        ("throughput", f"{rep.get('images_per_s') or 0:.1f} images/s"),
        ("inputs", f"{c.get('listed', '?')} listed, {c.get('embedded', '?')} embedded, {c.get('failed', '?')} failed"
         + (f" ({rep['resumed_from']} from an earlier run)" if rep.get("resumed_from") else "")),
        ("bottleneck", verdict(rep)),
        ("failures by reason", ", ".join(f"{k} {v}" for k, v in rep.get("failures_by_reason", {}).items()) or "none"),
        ("backend / devices", f"{rep.get('backend', '?')}{_precision(rep)}: {', '.join(map(str, rep.get('devices', [])))}"),
        ("model", f"{(rep.get('model') or {}).get('path') or '-'} ({(rep.get('model') or {}).get('arch', '?')})"
         + (" — SYNTHETIC random weights, embeddings carry no meaning" if rep.get("synthetic_weights") else "")),
    ]
    if rep.get("restarts"):
        rows.append(("worker restarts", ", ".join(f"{k} {v}" for k, v in rep["restarts"].items())))
    if rep.get("removed_devices"):
        rows.append(("devices taken out", ", ".join(map(str, rep["removed_devices"]))))
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in rep.get("versions", {}).items())))
    return rows


def stage_rows(rep: dict[str, Any]) -> list[list[str]]:
    rows = []
    occ = rep.get("queue_occupancy", {})
    for s in STAGES:
        v = rep.get("per_stage", {}).get(s)
        if not v:
            continue
        q = ""
        if s in occ.get("capacity", {}):
            q = f"{occ.get('mean', {}).get(s, 0):g} / {occ.get('max', {}).get(s, 0)} of {occ['capacity'][s]}"
        bf = v.get("busy_fraction")
        rows.append([s, str(v.get("workers")), f"{v.get('busy_s', 0):.1f}",
                     "-" if bf is None else f"{bf * 100:.0f}%", f"{v.get('blocked_s', 0):.1f}",
                     f"{v.get('items_in', 0)}", f"{v.get('items_in_per_s') or 0:.1f}", q])
    return rows


STAGE_HEADER = ["stage", "workers", "busy s", "busy %", "blocked s", "messages in", "in/s", "queue mean / max of depth"]


def text_report(rep: dict[str, Any]) -> str:
    lines = [f"{k:18s} {v}" for k, v in summary_rows(rep)]
    rows = [STAGE_HEADER] + stage_rows(rep)
    widths = [max(len(r[i]) for r in rows) for i in range(len(STAGE_HEADER))]
    lines.append("")
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


# -- SVG / HTML ---------------------------------------------------------------------------------

def _ticks(top: float, n: int = 5) -> list[float]:
    import math

    if top <= 0:
        return [0.0]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(top / step) + 1)]


def svg_chart(ch: Chart, width: int = 900, height: int = 260) -> str:
    ml, mr, mt, mb = 60, 150, 30, 40
    pw, ph = width - ml - mr, height - mt - mb

    def X(x: float) -> float:
        return ml + pw * x / ch.x_max

    def Y(y: float) -> float:
        return mt + ph * (1 - min(y, ch.y_max) / ch.y_max)

    e = html.escape
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">'),
             f'<text x="{ml}" y="18" font-size="14" font-weight="bold">{e(ch.title)}</text>',
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    if ch.startup_s:
        w = max(0.0, X(min(ch.startup_s, ch.x_max)) - ml)
        parts.append(f'<rect x="{ml}" y="{mt}" width="{w:.1f}" height="{ph}" fill="#f0f0f0"/>'
                     f'<text x="{ml + 4}" y="{mt + 14}" fill="#777">model start-up</text>')
    for t in _ticks(ch.y_max):
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#eee"/>'
                     f'<text x="{ml - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in _ticks(ch.x_max, 8):
        parts.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" stroke="#999"/>'
                     f'<text x="{X(t):.1f}" y="{mt + ph + 17}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 5}" text-anchor="middle">seconds since start</text>')
    parts.append(f'<text transform="translate(14,{mt + ph / 2}) rotate(-90)" text-anchor="middle">{e(ch.y_label)}</text>')
    for i, s in enumerate(ch.series):
        pts = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(s.xs, s.ys))
        if len(s.xs) == 1:
            parts.append(f'<circle cx="{X(s.xs[0]):.1f}" cy="{Y(s.ys[0]):.1f}" r="3" fill="{s.color}"/>')
        elif pts:
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{s.color}" stroke-width="2"/>')
        ly = mt + 10 + 18 * i
        parts.append(f'<line x1="{ml + pw + 12}" x2="{ml + pw + 32}" y1="{ly}" y2="{ly}" stroke="{s.color}" stroke-width="3"/>'
                     f'<text x="{ml + pw + 38}" y="{ly + 4}">{e(s.name)}</text>')
    if not any(s.xs for s in ch.series):
        parts.append(f'<text x="{ml + pw / 2}" y="{mt + ph / 2}" text-anchor="middle" fill="#888">'
                     "no samples (the run was shorter than one sampling interval)</text>")
    parts.append("</svg>")
    return "".join(parts)


def html_report(rep: dict[str, Any], title: str) -> str:
    e = html.escape
    body = [f"<h1>clip-pipeline report: {e(title)}</h1>"]
    if rep.get("synthetic_weights"):
        body.append('<p class="warn">SYNTHETIC random weights: these embeddings carry no meaning.</p>')
    body.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary_rows(rep)) + "</table>")
    body.append("<h2>Stages</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in STAGE_HEADER) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in stage_rows(rep)) + "</table>")
    body.append("<h2>Over time</h2>")
    body += [f"<div>{svg_chart(ch)}</div>" for ch in charts(rep)]
    if rep.get("errors"):
        body.append("<h2>Worker errors (last 50)</h2><ul>" + "".join(
            f"<li>{e(str(x.get('worker')))}: {e(str(x.get('kind')))} {e(str(x.get('exc_type')))}: {e(str(x.get('message')))}</li>"
            for x in rep["errors"]) + "</ul>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1000px}table{border-collapse:collapse;margin:1em 0}"
             "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}th{background:#f4f4f4}"
             ".warn{color:#a00;font-weight:bold}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>clip-pipeline report: {e(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# -- PNG (Pillow) -------------------------------------------------------------------------------

def png_report(rep: dict[str, Any], path: str | Path, title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    chs = charts(rep)
    width, ch_h, head = 1000, 280, 130
    img = Image.new("RGB", (width, head + ch_h * len(chs)), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
        big = ImageFont.load_default(size=17)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = big = ImageFont.load_default()
    d.text((20, 12), f"clip-pipeline report: {title}", fill="black", font=big)
    for i, (k, v) in enumerate(summary_rows(rep)[:5]):
        d.text((20, 40 + 17 * i), f"{k}: {v}"[:150], fill="#a00" if "SYNTHETIC" in v else "black", font=font)
    ml, mr, mt, mb = 60, 170, 25, 35
    pw, ph = width - ml - mr, ch_h - mt - mb
    for n, ch in enumerate(chs):
        top = head + n * ch_h

        def X(x: float, ch: Chart = ch) -> float:
            return ml + pw * x / ch.x_max

        def Y(y: float, ch: Chart = ch, top: int = top) -> float:
            return top + mt + ph * (1 - min(y, ch.y_max) / ch.y_max)

        d.text((ml, top + 4), ch.title, fill="black", font=font)
        for t in _ticks(ch.y_max):
            d.line([(ml, Y(t)), (ml + pw, Y(t))], fill="#e6e6e6")
            d.text((ml - 8, Y(t)), f"{t:g}", fill="black", font=font, anchor="rm")
        for t in _ticks(ch.x_max, 8):
            d.text((X(t), top + mt + ph + 4), f"{t:g}", fill="black", font=font, anchor="mt")
        d.text((ml + pw / 2, top + ch_h - 12), "seconds since start", fill="black", font=font, anchor="mm")
        d.rectangle([ml, top + mt, ml + pw, top + mt + ph], outline="#999")
        for i, s in enumerate(ch.series):
            pts = [(X(x), Y(y)) for x, y in zip(s.xs, s.ys)]
            if len(pts) > 1:
                d.line(pts, fill=s.color, width=2)
            elif pts:
                x, y = pts[0]
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=s.color)
            ly = top + mt + 10 + 18 * i
            d.line([(ml + pw + 12, ly), (ml + pw + 32, ly)], fill=s.color, width=3)
            d.text((ml + pw + 38, ly), s.name, fill="black", font=font, anchor="lm")
    img.save(path)

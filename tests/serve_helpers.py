"""Shared by the serve tests: a served run, and JSON calls to it over real HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, cli, cli_env


def require_web() -> None:
    for mod in ("flask", "waitress"):
        try:
            __import__(mod)
        except ImportError:
            pytest.skip(f"{mod} is not installed: pip install 'clip-pipeline[serve]'")


def make_run(d: Path, photos: list[Path], model: Path, name: str = "photos") -> Path:
    """A real run of the tiny synthetic model over copies of `photos` (the copies may be deleted)."""
    src = d / "images"
    src.mkdir(parents=True)
    for p in photos:
        shutil.copy(p, src / p.name)
    out = d / name
    r = subprocess.run(cli("run", "-i", str(src), "-o", str(out), "--progress", "none", "--set", f'model.path="{model}"',
                           "--set", "output.shard_size=5", "--set", 'output.dtype="float16"'),
                       capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return out


def call(base: str, path: str, body: object = None, *, raw: bytes | None = None, headers: dict | None = None,
         method: str | None = None) -> tuple[int, object, dict]:
    """(status, parsed JSON or bytes, headers with lower-case names) of one request; never raises on 4xx/5xx."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, payload, hdrs = resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        status, payload, hdrs = exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}
    if hdrs.get("content-type", "").startswith("application/json"):
        return status, json.loads(payload), hdrs
    return status, payload, hdrs

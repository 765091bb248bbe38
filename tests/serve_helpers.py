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


def raw_http(port: int, head: bytes, body_parts=(), timeout: float = 20.0) -> tuple[int, dict, bytes, int]:
    """(status, headers with lower-case names, body, body bytes sent) of one request written by hand on
    a socket: `head` (request line and headers, without the blank line), then `body_parts` sent until
    the server answers (the rest are not sent), so that a refused huge body costs only what was sent.
    It reads until the server closes: a request that succeeds needs `Connection: close`."""
    import select
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sent = 0
    try:
        sock.sendall(head + b"\r\n\r\n")
        for part in body_parts:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer came: stop sending
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(part)
        data = b""
        while True:
            try:
                got = sock.recv(65536)
            except ConnectionResetError:
                break
            if not got:
                break
            data += got
    finally:
        sock.close()
    head_out, _, payload = data.partition(b"\r\n\r\n")
    lines = head_out.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), f"no HTTP answer (got {data[:200]!r})"
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, payload, sent

"""Opening runs and serving the app with waitress (a production WSGI server: threads, request limits)."""

from __future__ import annotations

import ipaddress
import os
import threading
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

TOKEN_ENV = "CLIP_PIPELINE_SERVE_TOKEN"


def require_web() -> None:
    """ConfigError naming the extra when Flask or waitress is missing."""
    try:
        import flask  # noqa: F401
        import waitress  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"clip-pipeline serve needs Flask and waitress ({exc.name} is missing): "
                          "pip install 'clip-pipeline[serve]'") from None


def index_names(outs: list[str]) -> list[str]:
    """One index name per run directory: its base name; two runs with one name are refused."""
    names = [Path(os.path.abspath(o)).name or "run" for o in outs]
    seen: dict[str, str] = {}
    for name, out in zip(names, outs, strict=True):
        if name in seen:
            raise ConfigError(f"{seen[name]} and {out} would both be served as index {name!r}: serve runs whose "
                              "directories have different names (a symlink with another name will do)")
        seen[name] = out
    return names


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Service:
    """The app for some runs, its decode pool, and a waitress server (`start` in a thread, or `run`)."""

    def __init__(self, outs: list[str], settings: Any, *, use_index: bool = True, nprobe: int | None = None,
                 text_backend: str | None = None, decode_workers: int = 2, log=print):
        require_web()
        from pipeline.serve.app import create_app
        from pipeline.serve.decode import DecodePool
        from pipeline.serve.engine import RunIndex

        for out in outs:
            if not os.path.isdir(out):
                raise ConfigError(f"{out} is not a directory: give the output directory of a run")
        self.indices = [RunIndex(out, name, use_index=use_index, nprobe=nprobe, text_backend=text_backend, log=log)
                        for out, name in zip(outs, index_names(outs), strict=True)]
        timeout = min([settings.decode_timeout_s] + [ix.cfg.preprocess.decode_timeout_s for ix in self.indices])
        self.pool = DecodePool(decode_workers, timeout)
        self.app = create_app(self.indices, settings, self.pool)
        self.settings = settings
        self.server = None

    def warm_up(self, log=print) -> None:
        """Open each run's text tower and image model now, so that the first queries do not pay for it."""
        from pipeline.serve.engine import QueryError

        for ix in self.indices:
            ix.text_encoder()
            try:
                ix.image_device()
            except QueryError as exc:
                log(f"note: {exc}")
            except Exception as exc:  # noqa: BLE001 - image queries will say so; text and vectors still work
                log(f"note: image queries on {ix.name!r} will fail: cannot open its model: {exc}")

    def listen(self, host: str, port: int, threads: int = 8):
        from waitress.server import create_server

        # waitress reads a whole body before the app sees it: its own limit (a plain-text 413) stops
        # anything far over ours; up to twice our limit the app answers the JSON 413 itself.
        self.server = create_server(self.app, host=host, port=port, threads=threads,
                                    max_request_body_size=2 * self.settings.max_body_bytes, expose_tracebacks=False,
                                    ident="clip-pipeline", clear_untrusted_proxy_headers=True)
        if is_loopback(host):  # only names of this machine: no DNS rebinding from a web page
            port = self.port
            self.settings.allowed_hosts = (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}")
        return self.server

    @property
    def port(self) -> int:
        return int(self.server.effective_port)

    def start(self, host: str = "127.0.0.1", port: int = 0, threads: int = 8) -> threading.Thread:
        """Serve in a daemon thread (tests, benchmarks); `close()` stops it."""
        self.listen(host, port, threads)
        thread = threading.Thread(target=self.server.run, daemon=True, name="serve")
        thread.start()
        return thread

    def close(self) -> None:
        if self.server is not None:
            self.server.task_dispatcher.shutdown(timeout=5)  # let running requests finish their writes
            self.server.close()
        self.pool.close()

"""Opening runs and serving the app with waitress (a production WSGI server: threads, request limits)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
import time
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


LINGER_S = 10.0  # after an error answer, how long the rest of a refused body is read and dropped


def waitress_json_errors(max_body: int, cors_origins: tuple[str, ...] = ()) -> type:
    """A waitress channel class whose own errors (a body over `max_body`, a bad request line, headers
    too large, bad chunked encoding) answer JSON like the app's, through waitress's seams: the
    channel's `error_task_class` writes the body, its `parser_class` keeps a refused request from
    being told `100 Continue` (waitress would then read the body up to its limit).

    After such an answer the channel half-closes and reads and drops what the client still sends,
    up to 4 x `max_body` bytes or LINGER_S seconds (nginx's lingering close): a client that writes
    its whole body before reading (urllib, requests) then reads the 413 instead of a connection reset.
    Nothing is kept, so a huge body costs time on the wire, never memory; past the bound, the reset."""
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser
    from waitress.task import ErrorTask

    drain_bytes = 4 * max_body

    class JsonErrorTask(ErrorTask):
        def execute(self):
            e = self.request.error
            if e.code == 413:
                reason = f"the request body is over the limit of {max_body:,} bytes (serve --max-body-mb)"
            elif e.code == 431:
                reason = f"the request line and headers are too large ({e.body})"
            elif e.code == 500:
                reason = "internal error; the service's log has the details"
            else:
                reason = f"{e.reason.lower()}: {e.body}"
            body = json.dumps({"error": reason, "status": e.code}).encode()
            self.status = f"{e.code} {e.reason}"
            self.response_headers.extend([("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff")])
            origin = self.request.headers.get("ORIGIN")
            if origin and origin in cors_origins:  # so that a page on a named origin can read the reason
                self.response_headers.extend([("Access-Control-Allow-Origin", origin), ("Vary", "Origin")])
            self.channel.linger = True
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class RefusingParser(HTTPRequestParser):
        def received(self, data):
            n = super().received(data)
            if self.error is not None:
                self.expect_continue = False
            return n

    class JsonErrorChannel(HTTPChannel):
        error_task_class = JsonErrorTask
        parser_class = RefusingParser
        linger = False  # set by an error answer: drain before closing
        draining_until = 0.0
        drained = 0

        def handle_close(self):
            if self.linger and not self.draining_until and self.socket is not None:
                try:
                    self.socket.shutdown(socket.SHUT_WR)  # the answer is flushed: the client sees its end
                except OSError:
                    return super().handle_close()
                self.will_close = False
                self.draining_until = time.time() + LINGER_S
                self.last_activity = self.draining_until - self.adj.channel_timeout  # idle: closed by then
                return None
            return super().handle_close()

        def received(self, data):
            if not self.draining_until:
                return super().received(data)
            self.drained += len(data)
            self.last_activity = self.draining_until - self.adj.channel_timeout
            if self.drained > drain_bytes or time.time() > self.draining_until:
                super().handle_close()  # enough: the client gets a reset for the rest
            return True

    return JsonErrorChannel


class Service:
    """The app for some runs, its decode pool, and a waitress server (`start` in a thread, or `run`)."""

    def __init__(self, outs: list[str], settings: Any, *, use_index: bool = True, nprobe: int | None = None,
                 text_backend: str | None = None, decode_workers: int = 2, image_timeout_s: float = 300.0, log=print):
        require_web()
        from pipeline.serve.app import create_app
        from pipeline.serve.decode import DecodePool
        from pipeline.serve.engine import RunIndex

        for out in outs:
            if not os.path.isdir(out):
                raise ConfigError(f"{out} is not a directory: give the output directory of a run")
        self.indices = [RunIndex(out, name, use_index=use_index, nprobe=nprobe, text_backend=text_backend,
                                 image_timeout_s=image_timeout_s, log=log)
                        for out, name in zip(outs, index_names(outs), strict=True)]
        timeout = min([settings.decode_timeout_s] + [ix.cfg.preprocess.decode_timeout_s for ix in self.indices])
        self.pool = DecodePool(decode_workers, timeout)
        self.app = create_app(self.indices, settings, self.pool)
        self.settings = settings
        self.server = None
        self._thread: threading.Thread | None = None
        self._closing = False

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
        from waitress.server import BaseWSGIServer, create_server

        # waitress reads a whole body before the app sees it, so its limit is ours: a body over it is
        # refused from its Content-Length (or, chunked, once past it), never buffered; waitress
        # refuses at >= its limit, hence the + 1.
        max_body = self.settings.max_body_bytes
        channel = waitress_json_errors(max_body, self.settings.cors_origins)
        sockets: dict = {}  # waitress's socket map: its listening servers (one per address) and, later, channels
        self.server = create_server(self.app, map=sockets, host=host, port=port, threads=threads,
                                    max_request_body_size=max_body + 1, expose_tracebacks=False,
                                    ident="clip-pipeline", clear_untrusted_proxy_headers=True)
        for listener in list(sockets.values()):
            if isinstance(listener, BaseWSGIServer):
                listener.channel_class = channel  # read by its handle_accept, for every connection
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
        self._thread = threading.Thread(target=self._serve, daemon=True, name="serve")
        self._thread.start()
        return self._thread

    def _serve(self) -> None:
        try:
            self.server.run()
        except OSError:
            # close() from another thread closes sockets under the loop's select (EBADF): its end
            if not self._closing:
                raise

    def close(self) -> None:
        self._closing = True
        if self.server is not None:
            self.server.task_dispatcher.shutdown(timeout=5)  # let running requests finish their writes
            self.server.close()
            if self._thread is not None:
                self._thread.join(5)
        for ix in self.indices:
            ix.close()
        self.pool.close()

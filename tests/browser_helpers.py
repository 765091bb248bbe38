"""Headless Chromium driven through its DevTools protocol (a websocket), for the serve page tests.

Debian's `chromium` package (`apt-get install chromium`); no browser is downloaded at test time.
`chromium_or_skip()` gives the executable or skips with the reason.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_or_skip() -> str:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            break
    else:
        pytest.skip("no Chromium: apt-get install chromium (Debian's package; .ci/run installs it)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        pytest.skip("websocket-client is not installed: pip install 'clip-pipeline[test]'")
    return path


class Browser:
    """One headless Chromium with one page; `call` sends a DevTools command and waits for its answer."""

    def __init__(self, exe: str, profile: Path, width: int = 1280, height: int = 900):
        import websocket

        port_file = profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)  # a stale one from an earlier browser on this profile
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not (port_file.exists() and port_file.read_text().strip()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start (exit {self.proc.returncode})")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            page = next(t for t in targets if t.get("type") == "page")
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
            self.ids = itertools.count(1)
            self.events: list[dict] = []
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.viewport(width, height)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=mobile)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str):
        """Evaluate (awaiting a promise) and return the value; a page exception fails the test."""
        res = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise AssertionError(f"javascript error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        """Poll until the expression is truthy (an exception counts as not yet: the page may still be loading)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                value = self.js(expression)
            except AssertionError as exc:
                value, last = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for: {expression} (last error: {last})")
            time.sleep(0.1)

    def set_file(self, expression: str, path: str | os.PathLike) -> None:
        """Put a file into the <input type=file> the expression evaluates to (as a user picking it)."""
        obj = self.call("Runtime.evaluate", expression=expression)["result"]
        self.call("DOM.setFileInputFiles", files=[str(path)], objectId=obj["objectId"])

    def screenshot(self, path: str | os.PathLike) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            if getattr(self, "ws", None):
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()

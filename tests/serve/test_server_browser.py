"""clip-pipeline serve in a real headless Chromium: our page, and clip-retrieval's own clip-front pointed at us.

Chromium is Debian's package, driven through its DevTools protocol (tests/browser_helpers.py).
clip-front is the built page inside the clip-retrieval wheel (`front/build/`, MIT), extracted at
test time from $CLIP_RETRIEVAL_WHEEL or ~/.cache/clip-pipeline/ (.ci/run puts it there with
`pip download clip-retrieval==2.45.0 --no-deps`) and served as it is. Screenshots are kept in
$CLIP_PIPELINE_TEST_ARTIFACTS/serve (default: $TMPDIR/clip-pipeline-test-artifacts/serve).
"""

from __future__ import annotations

import functools
import http.server
import os
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest
from browser_helpers import Browser, chromium_or_skip
from serve_helpers import call, make_run, require_web

from pipeline.output import load_embeddings

require_web()

from pipeline.serve.app import Settings  # noqa: E402
from pipeline.serve.server import Service  # noqa: E402

WHEEL = "clip_retrieval-2.45.0-py3-none-any.whl"


def artifacts() -> Path:
    d = Path(os.environ.get("CLIP_PIPELINE_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "clip-pipeline-test-artifacts")
    (d / "serve").mkdir(parents=True, exist_ok=True)
    return d / "serve"


def front_build(dest: Path) -> Path:
    wheel = Path(os.environ.get("CLIP_RETRIEVAL_WHEEL") or Path.home() / ".cache" / "clip-pipeline" / WHEEL)
    if not wheel.is_file():
        pytest.skip(f"clip-front needs the clip-retrieval wheel at {wheel}: pip download clip-retrieval==2.45.0 "
                    "--no-deps -d ~/.cache/clip-pipeline (or set CLIP_RETRIEVAL_WHEEL)")
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.startswith("front/build/")]
        if not members:
            pytest.skip(f"{wheel} holds no front/build/")
        z.extractall(dest, members)
    return dest / "front" / "build"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D401 - keep the test output clean
        pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory, photos, tiny_model):
    exe = chromium_or_skip()
    d = tmp_path_factory.mktemp("browser")
    out = make_run(d, photos, tiny_model)
    paths, _ = load_embeddings(out)
    return exe, d, out, paths


@pytest.fixture()
def browser(setup, tmp_path):
    b = Browser(setup[0], tmp_path / "profile")
    yield b
    b.close()


def expected_top(base: str, body: dict) -> int:
    status, got, _ = call(base, "knn-service", {**body, "num_images": 1})
    assert status == 200, got
    return got[0]["id"]


def test_our_page_text_image_more_like_this_and_phone(setup, browser, tmp_path):
    _, _, out, paths = setup
    svc = Service([str(out)], Settings(cache_dir=tmp_path / "cache"))
    svc.start()
    base = f"http://127.0.0.1:{svc.port}/"
    b = browser
    try:
        b.goto(base)
        b.wait_for("document.querySelector('#status').textContent.includes('12 images')")
        assert b.js("!document.querySelector('#synthetic').hidden"), "the SYNTHETIC-weights warning is not shown"
        # text search, typed and submitted like a user
        want = expected_top(base, {"text": "a photo of a dog"})
        b.js("document.querySelector('#text').value = 'a photo of a dog'; "
             "document.querySelector('#search').requestSubmit(); true")
        b.wait_for("document.querySelectorAll('#grid figure').length > 0 && "
                   "document.querySelector('#status').textContent.includes('results')")
        assert b.js("document.querySelector('#grid figure').dataset.id") == str(want)
        assert b.wait_for("[...document.querySelectorAll('#grid img')].slice(0, 4).every(i => i.complete && i.naturalWidth > 0)")
        b.screenshot(artifacts() / "page-text.png")
        # image search: the file input, as a user picking a file
        b.set_file("document.querySelector('#file')", paths[6])
        b.wait_for(f"document.querySelector('#status').textContent.includes('results for image {Path(paths[6]).name}')")
        assert b.js("document.querySelector('#grid figure').dataset.id") == "6"
        assert b.js("document.querySelector('#grid figure figcaption').textContent").endswith(paths[6])
        # more like this: click the third result
        third = b.js("document.querySelectorAll('#grid figure')[2].dataset.id")
        b.js("document.querySelectorAll('#grid figure')[2].click(); true")
        b.wait_for("document.querySelector('#status').textContent.includes('results for more like')")
        assert b.js("document.querySelector('#grid figure').dataset.id") == third
        # a phone-sized window: nothing wider than the screen, two columns of results
        b.viewport(375, 740, mobile=True)
        b.wait_for("document.documentElement.scrollWidth <= 375")
        cols = b.js("getComputedStyle(document.querySelector('#grid')).gridTemplateColumns.split(' ').length")
        assert cols == 2
        b.screenshot(artifacts() / "page-phone.png")
    finally:
        svc.close()


@pytest.mark.parametrize("token", [None, "s3cret-T0ken"])
def test_clip_front_searches_our_run_unchanged(setup, browser, tmp_path, token):
    """With --token, clip-front (which sends no headers) is given the token in its back URL's path."""
    _, _, out, paths = setup
    build = front_build(tmp_path / "front")
    static = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(build)))
    threading.Thread(target=static.serve_forever, daemon=True).start()
    front = f"http://127.0.0.1:{static.server_address[1]}"
    svc = Service([str(out)], Settings(cache_dir=tmp_path / "cache", cors_origins=(front,), token=token))
    svc.start()
    host = f"http://127.0.0.1:{svc.port}"
    back = host + (f"/t/{token}" if token else "")
    thumb = f"{host}/thumb/photos/"  # signed (?sig=...) when there is a token; never the token itself
    shot = "clip-front" + ("-token" if token else "")
    b = browser
    root = "document.querySelector('clip-front')?.shadowRoot"
    try:
        b.goto(f"{front}/?back={back}&index=photos")
        b.wait_for(f"{root}?.querySelector('#searchBar') && "
                   f"[...{root}.querySelectorAll('option')].some(o => o.value === 'photos')")
        # text search through its own search bar and button (with its default options: deduplicate, safe mode...)
        want = expected_top(back + "/", {"text": "a red circle", "deduplicate": True})
        b.js(f"const s = {root}.querySelector('#searchBar'); s.value = 'a red circle'; "
             "s.dispatchEvent(new Event('input')); true")
        b.js(f"{root}.querySelector('#textSearch').click(); true")
        first = b.wait_for(f"{root}.querySelector('img.pic') && {root}.querySelector('img.pic').src")
        assert first.split("?")[0] == f"{thumb}{want}" and (token is None) == ("?sig=" not in first), first
        assert b.wait_for(f"{root}.querySelector('img.pic').complete && {root}.querySelector('img.pic').naturalWidth > 0")
        b.screenshot(artifacts() / f"{shot}-text.png")
        # image search through its file chooser
        b.set_file(f"{root}.querySelector('#filechooser')", paths[9])
        first = b.wait_for(f"{root}.querySelector('img.pic') && "
                           f"{root}.querySelector('img.pic').src.split('?')[0].endsWith('/9') "
                           f"&& {root}.querySelector('img.pic').src")
        assert first.split("?")[0] == f"{thumb}9"
        assert b.wait_for(f"{root}.querySelector('img.pic').complete && {root}.querySelector('img.pic').naturalWidth > 0")
        b.screenshot(artifacts() / f"{shot}-image.png")
    finally:
        svc.close()
        static.shutdown()

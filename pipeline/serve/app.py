"""The Flask application: clip-retrieval's clip-back API (`/indices-list`, `/knn-service`, `/metadata`),
`/info`, thumbnails by row (`/thumb/INDEX/ROW`) and our own page at `/`.

Every answer is JSON or an image; a bad request is a 4xx with {"error": reason}, never a traceback.
Requests are read as JSON whatever their Content-Type (clip-front posts text/plain).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import math
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from pipeline.data.rundir import atomic_write_bytes
from pipeline.serve.decode import DecodePool
from pipeline.serve.engine import QueryError, RunIndex, near_duplicates
from pipeline.wire.messages import ItemError
from pipeline.wire.pathcodec import decode as decode_path

STATIC = Path(__file__).with_name("static")
IGNORED_OPTIONS = {
    "use_safety_model": "no safety model is loaded: results are not filtered for NSFW content",
    "use_violence_detector": "no violence detector is loaded: results are not filtered for violence",
}
REFUSED_OPTIONS = {
    "image_url": "no outbound fetches: upload the image (image, base64) instead",
    "aesthetic_score": "no aesthetic embeddings are loaded",
    "use_mclip": "no multilingual text model is loaded",
    "modality=text": "the runs hold image embeddings only",
}


@dataclass
class Settings:
    token: str | None = None
    max_body_bytes: int = 16 << 20  # a JSON request, base64 image included
    max_upload_bytes: int = 10 << 20  # the decoded image
    max_pixels: int = 50_000_000  # an upload's pixel limit (also never above the run's max_pixels)
    decode_timeout_s: float = 10.0  # never above the run's decode_timeout_s
    max_result_ids: int = 10_000
    max_images: int = 1_000
    thumb_side: int = 256
    cache_dir: Path = field(default_factory=lambda: Path(os.path.expanduser("~/.cache/clip-pipeline/serve")))
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # Host headers answered (empty: any); set for loopback by Service.listen


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> Response:
    resp = jsonify({"error": message, "status": status})
    resp.status_code = status
    return resp


def _int_field(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key)
    if v is None or v == "":
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise BadRequest(f"{key} must be an integer, got {json.dumps(v)[:40]}")
    try:
        n = int(v)
    except ValueError:
        raise BadRequest(f"{key} must be an integer, got {str(v)[:40]!r}") from None
    if isinstance(v, float) and v != n:
        raise BadRequest(f"{key} must be an integer, got {v}")
    if not lo <= n <= hi:
        raise BadRequest(f"{key} must be between {lo} and {hi}, got {n}")
    return n


def _truthy(v: Any) -> bool:
    return v not in (None, False, "", 0, "false", "False")


class Api:
    """The request handlers over `indices` (names unique); `pool` decodes uploads and thumbnails."""

    def __init__(self, indices: list[RunIndex], settings: Settings, pool: DecodePool):
        self.indices, self.settings, self.pool = indices, settings, pool
        self.by_name = {ix.name: ix for ix in indices}
        self.secret = (settings.token or "").encode()

    # -- access ------------------------------------------------------------------------------------
    def signature(self, name: str, row: int) -> str:
        return hmac.new(self.secret, f"{name}/{row}".encode(), hashlib.sha256).hexdigest()[:32]

    def thumb_url(self, ix: RunIndex, row: int) -> str:
        url = f"{request.host_url}thumb/{ix.name}/{row}"
        return url + (f"?sig={self.signature(ix.name, row)}" if self.secret else "")

    def authorised(self) -> bool:
        if not self.secret or request.environ.get(TokenInPath.KEY):
            return True
        got = request.headers.get("Authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), self.secret)

    def check_access(self) -> Response | None:
        """Before every request: the Host (on loopback), then the bearer token."""
        allowed = self.settings.allowed_hosts
        if allowed and request.host.lower() not in allowed:
            # a page of another site whose name was made to resolve to 127.0.0.1 (DNS rebinding)
            return _error(403, f"Host {request.host[:80]!r} is not this service's address: it answers {', '.join(allowed)}")
        if request.method == "OPTIONS" or request.path == "/" or request.path.startswith("/static/"):
            return None  # the page and its assets hold nothing: it asks for the token itself
        if request.path.startswith("/thumb/") and self.secret:
            return None  # checked in thumb(): a bearer token or the URL's signature
        if not self.authorised():
            resp = _error(401, "this service needs a bearer token: send 'Authorization: Bearer TOKEN' "
                               "(the token given to `clip-pipeline serve --token` or $CLIP_PIPELINE_SERVE_TOKEN)")
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
        return None

    def add_headers(self, resp: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and origin in self.settings.cors_origins:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Vary"] = "Origin"
            resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        return resp

    # -- errors ------------------------------------------------------------------------------------
    def http_error(self, exc: HTTPException) -> Response:
        if exc.code == 413:
            return _error(413, f"the request body is over the limit of {self.settings.max_body_bytes:,} bytes "
                               "(serve --max-body-mb)")
        return _error(exc.code or 500, exc.description or exc.name)

    @staticmethod
    def internal_error(exc: Exception) -> Response:
        print(f"serve: error in {request.method} {request.path}:", file=sys.stderr)
        traceback.print_exc()
        return _error(500, f"internal error ({type(exc).__name__}); the service's log has the details")

    # -- requests ----------------------------------------------------------------------------------
    @staticmethod
    def body() -> dict:
        raw = request.get_data(cache=False)
        try:
            doc = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise BadRequest("the request body must be a JSON object")
        return doc

    def index_of(self, doc: dict) -> RunIndex:
        name = doc.get("indice_name")
        if name in (None, ""):
            return self.indices[0]
        if not isinstance(name, str) or name not in self.by_name:
            raise BadRequest(f"no index named {str(name)[:80]!r}; the indices are {sorted(self.by_name)}", 404)
        return self.by_name[name]

    @staticmethod
    def own_row(ix: RunIndex, url: str) -> int | None:
        """The row of one of our own thumbnail URLs (more like this from clip-front), else None."""
        parts = urlsplit(url)
        segs = parts.path.strip("/").split("/")
        if parts.netloc != request.host or len(segs) != 3 or segs[0] != "thumb" or segs[1] != ix.name:
            return None
        return int(segs[2]) if segs[2].isdigit() and int(segs[2]) < ix.rows else None

    def query_vector(self, ix: RunIndex, doc: dict) -> np.ndarray:
        """The query of a knn-service request, in clip-back's order: text, image, image_url, embedding_input; then id."""
        text, image, url, emb = (doc.get(k) for k in ("text", "image", "image_url", "embedding_input"))
        row = doc.get("id")
        if text not in (None, ""):
            if not isinstance(text, str):
                raise BadRequest("text must be a string")
            if len(text) > 2000:
                raise BadRequest(f"text is {len(text)} characters; at most 2000")
            return ix.text_vector(text)
        if image not in (None, ""):
            return ix.image_vector(*self.decode_upload(ix, image))
        if url not in (None, ""):
            mine = self.own_row(ix, url) if isinstance(url, str) else None
            if mine is None:
                raise BadRequest("image_url is refused: this service makes no outbound fetches; send the image "
                                 "itself (image: base64)")
            return ix.vectors([mine])[0]
        if emb not in (None, ""):
            try:
                v = np.asarray(emb, dtype=np.float32)
            except (TypeError, ValueError):
                raise BadRequest("embedding_input must be a list of numbers") from None
            if v.ndim != 1 or v.shape[0] != ix.dim or not np.isfinite(v).all():
                raise BadRequest(f"embedding_input must be {ix.dim} finite numbers for index {ix.name!r}")
            return v
        if row is not None:  # our extension: more like this row
            if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < ix.rows:
                raise BadRequest(f"id must be a row number of index {ix.name!r} (0 to {ix.rows - 1})")
            return ix.vectors([row])[0]
        raise BadRequest("give one query: text, image (base64), embedding_input or id")

    def decode_upload(self, ix: RunIndex, image: Any) -> tuple[np.ndarray, bytes]:
        """A base64 upload to (the run's crop of it, its bytes), within the upload limits and the run's
        own decode limits (a device that decodes files itself gets the bytes, checked by this decode)."""
        limit = self.settings.max_upload_bytes
        if not isinstance(image, str):
            raise BadRequest("image must be a base64 string")
        if image.startswith("data:") and "," in image[:200]:
            image = image.split(",", 1)[1]
        if len(image) > limit * 4 // 3 + 8:
            raise BadRequest(f"the image is over the upload limit of {limit:,} bytes (serve --max-upload-mb)", 413)
        try:
            data = base64.b64decode("".join(image.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"image is not valid base64 ({exc})") from None
        if not data:
            raise BadRequest("image is empty")
        opts = ix.decode_options()
        opts = dataclasses.replace(opts, max_pixels=min(opts.max_pixels, self.settings.max_pixels),
                                   max_file_bytes=min(opts.max_file_bytes, limit))
        if len(data) > opts.max_file_bytes:
            raise BadRequest(f"the image is {len(data):,} bytes, over the upload limit of {opts.max_file_bytes:,} "
                             "(serve --max-upload-mb, and the run's preprocess.max_file_bytes)", 413)
        try:
            return self.pool.call("crop", data, opts), data
        except ItemError as exc:
            raise BadRequest(f"the image cannot be used: {exc.reason} ({exc.message})",
                             413 if exc.reason == "too_large" else 400) from None

    # -- clip-back's API ---------------------------------------------------------------------------
    def indices_list(self) -> Response:
        return jsonify([ix.name for ix in self.indices])

    def info(self) -> Response:
        st = self.settings
        return jsonify({
            "indices": [ix.info() for ix in self.indices],
            "ignored_options": IGNORED_OPTIONS,
            "refused_options": REFUSED_OPTIONS,
            "limits": {"max_body_bytes": st.max_body_bytes, "max_upload_bytes": st.max_upload_bytes,
                       "max_pixels": st.max_pixels, "max_result_ids": st.max_result_ids, "max_images": st.max_images},
            "token_required": bool(self.secret),
        })

    def knn_service(self) -> Response:
        doc = self.body()
        ix = self.index_of(doc)
        if doc.get("modality", "image") not in ("image", None, ""):
            raise BadRequest(f"modality {str(doc.get('modality'))[:20]!r} is not served: the runs hold image "
                             "embeddings only (modality: image)")
        if _truthy(doc.get("use_mclip")):
            raise BadRequest("use_mclip is not supported: no multilingual text model is loaded")
        if doc.get("aesthetic_score") not in (None, ""):
            raise BadRequest("aesthetic_score is not supported: no aesthetic embeddings are loaded (leave it empty)")
        num_images = _int_field(doc, "num_images", 40, 1, self.settings.max_images)
        num_ids = max(_int_field(doc, "num_result_ids", num_images, 1, self.settings.max_result_ids), num_images)
        scores, rows = ix.search(self.query_vector(ix, doc), num_ids)
        if _truthy(doc.get("deduplicate")) and len(rows) > 1:
            keep = ~near_duplicates(ix.vectors(rows))
            scores, rows = scores[keep], rows[keep]
        out = []
        for rank, (s, r) in enumerate(zip(scores.tolist(), rows.tolist(), strict=True)):
            item: dict[str, Any] = {}
            if rank < num_images:  # clip-back: metadata for the first num_images, ids only after
                item.update(ix.metadata(r))
                item["url"] = self.thumb_url(ix, r)
            item["id"] = int(r)
            item["similarity"] = float(s) if math.isfinite(s) else None
            out.append(item)
        return jsonify(out)

    def metadata(self) -> Response:
        doc = self.body()
        ix = self.index_of(doc)
        ids = doc.get("ids")
        if not isinstance(ids, list) or len(ids) > self.settings.max_result_ids:
            raise BadRequest(f"ids must be a list of at most {self.settings.max_result_ids} row numbers")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < ix.rows:
                raise BadRequest(f"id {json.dumps(i)[:40]} is not a row of index {ix.name!r} (0 to {ix.rows - 1})")
        return jsonify([{"id": i, "metadata": {**ix.metadata(i), "url": self.thumb_url(ix, i)}} for i in ids])

    # -- images: only rows of a run's listing, never a path from the request ------------------------
    def thumb(self, name: str, row: int) -> Response:
        ix = self.by_name.get(name)
        if ix is None or not 0 <= row < ix.rows:
            return _error(404, f"no row {row} in an index named {name[:80]!r}")
        if self.secret and not self.authorised():
            sig = request.args.get("sig", "")
            if not hmac.compare_digest(sig.encode(), self.signature(name, row).encode()):
                return _error(401, "this thumbnail needs the bearer token or the signature of its URL")
        cache = self.thumb_cache(ix) / f"{row}.jpg"
        if cache.exists():
            data = cache.read_bytes()
        else:
            side = self.settings.thumb_side
            opts = dataclasses.replace(ix.decode_options(), mode="fast", exif_transpose=True, target=side)
            try:
                data = self.pool.call("thumb", decode_path(ix.paths[row]), opts, side)
            except ItemError as exc:
                return _error(404, f"row {row}'s image cannot be shown: {exc.reason} ({exc.message})")
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(cache, data)
            except OSError as exc:
                print(f"serve: warning: cannot cache a thumbnail in {cache.parent}: {exc}", file=sys.stderr)
        resp = Response(data, mimetype="image/jpeg")
        resp.headers["Cache-Control"] = "private, max-age=3600"
        return resp

    def thumb_cache(self, ix: RunIndex) -> Path:
        key = f"{ix.out.resolve()}\0{ix.manifest.get('fingerprint')}\0{self.settings.thumb_side}".encode()
        return self.settings.cache_dir / "thumbnails" / f"{ix.name[:40]}-{hashlib.sha256(key).hexdigest()[:16]}"

    # -- our page ----------------------------------------------------------------------------------
    @staticmethod
    def page() -> Response:
        resp = send_from_directory(STATIC, "index.html")
        resp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data: blob:; "
                                                   "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
        return resp

    @staticmethod
    def static_file(name: str) -> Response:
        return send_from_directory(STATIC, name)  # safe_join: nothing outside STATIC


class TokenInPath:
    """WSGI middleware: `/t/TOKEN/PATH` is PATH, authorised, for a client that cannot send the
    `Authorization` header: clip-front, whose `back` URL is the only thing it lets you set
    (`?back=http://HOST:PORT/t/TOKEN`). The prefix is removed before the app sees the path, so no
    answer, thumbnail URL or error log repeats the token; a wrong one is left in place (a 401)."""

    KEY = "clip_pipeline.token_in_path"

    def __init__(self, app, secret: bytes):
        self.app, self.secret = app, secret

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if self.secret and path.startswith("/t/"):
            token, _, rest = path[3:].partition("/")
            if hmac.compare_digest(token.encode("latin-1", "replace"), self.secret):
                environ["PATH_INFO"] = "/" + rest
                environ.pop("REQUEST_URI", None)  # waitress's raw copy of the path, token included
                environ[self.KEY] = True
        return self.app(environ, start_response)


def create_app(indices: list[RunIndex], settings: Settings, pool: DecodePool) -> Flask:
    """The WSGI app over `indices` (names unique); `pool` decodes uploads and thumbnails."""
    api = Api(indices, settings, pool)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.url_map.merge_slashes = False  # no redirects (with HTML bodies): a path either matches or is a JSON 404
    app.url_map.strict_slashes = False
    app.before_request(api.check_access)
    app.after_request(api.add_headers)
    app.register_error_handler(BadRequest, lambda exc: _error(exc.status, str(exc)))
    app.register_error_handler(QueryError, lambda exc: _error(exc.status, str(exc)))
    app.register_error_handler(HTTPException, api.http_error)
    app.register_error_handler(Exception, api.internal_error)
    app.wsgi_app = TokenInPath(app.wsgi_app, api.secret)
    app.add_url_rule("/indices-list", view_func=api.indices_list, methods=["GET"])
    app.add_url_rule("/info", view_func=api.info, methods=["GET"])
    # OPTIONS (a CORS preflight) gets Flask's automatic answer; add_headers adds the CORS headers
    app.add_url_rule("/knn-service", view_func=api.knn_service, methods=["POST"])
    app.add_url_rule("/metadata", view_func=api.metadata, methods=["POST"])
    app.add_url_rule("/thumb/<name>/<int:row>", view_func=api.thumb, methods=["GET"])
    app.add_url_rule("/", view_func=api.page, methods=["GET"])
    app.add_url_rule("/static/<path:name>", view_func=api.static_file, methods=["GET"])
    return app

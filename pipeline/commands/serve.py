"""`clip-pipeline serve OUT [OUT...]`: search runs from a browser (clip-back's API and our own page)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from pipeline.backends import NAMES as BACKEND_NAMES
from pipeline.commands import CONTEXT
from pipeline.config import ConfigError


@click.command("serve", context_settings=CONTEXT)
@click.argument("outs", nargs=-1, required=True, metavar="OUT [OUT...]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the runs' images to the network (a warning).")
@click.option("--port", type=click.IntRange(0, 65535), default=1234, show_default=True, help="Port (0: any free one).")
@click.option("--token", default=None, metavar="TOKEN",
              help="Require 'Authorization: Bearer TOKEN' on every API call (default: $CLIP_PIPELINE_SERVE_TOKEN). "
                   "Clients that cannot send it (clip-front) put it in the path: http://HOST:PORT/t/TOKEN/... "
                   "(it then shows in their URL and history: README, serve).")
@click.option("--no-index", "no_index", is_flag=True, help="Exact search even where `clip-pipeline index` built an index.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="IVF indexes: lists visited per query.")
@click.option("--text-backend", type=click.Choice(BACKEND_NAMES), default=None,
              help="Where text queries are embedded (default: the run's backend).")
@click.option("--threads", type=click.IntRange(1, 256), default=8, show_default=True, help="Request threads.")
@click.option("--decode-workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Processes decoding uploads and making thumbnails.")
@click.option("--max-body-mb", type=click.FloatRange(0.01, 1024), default=16, show_default=True,
              help="Largest request body.")
@click.option("--max-upload-mb", type=click.FloatRange(0.01, 1024), default=10, show_default=True,
              help="Largest uploaded image (decoded bytes).")
@click.option("--decode-timeout", type=click.FloatRange(0.1, 600), default=10, show_default=True,
              help="Seconds one upload or thumbnail may take to decode (never above the run's preprocess.decode_timeout_s).")
@click.option("--image-timeout", type=click.FloatRange(1, 3600), default=300, show_default=True,
              help="Seconds one image query may take on a device that runs in its own process (sail device mode, "
                   "sim, sail on the cmodel: seconds to minutes per image); past it that process is restarted.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where thumbnails are cached (default: ~/.cache/clip-pipeline/serve).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="A web origin (e.g. http://127.0.0.1:8080) whose pages may call the API, such as a clip-front "
                   "served elsewhere (repeatable; default: none).")
def serve_cmd(outs, host, port, token, no_index, nprobe, text_backend, threads, decode_workers, max_body_mb,
              max_upload_mb, decode_timeout, image_timeout, cache_dir, cors_origins) -> None:
    """Serve runs for search: clip-retrieval's clip-back API and a web page at /.

    One index per run directory, named after it. Text queries use the run's paired text tower,
    image queries the run's model and preprocessing; the search uses the run's faiss index when
    there is one, else the exact scan. Exit status: 0 stopped with Ctrl-C; 2 bad usage or runs.
    """
    import logging

    from pipeline.serve.app import Settings
    from pipeline.serve.server import TOKEN_ENV, Service, is_loopback

    token = token or os.environ.get(TOKEN_ENV) or None
    settings = Settings(token=token, max_body_bytes=int(max_body_mb * (1 << 20)),
                        max_upload_bytes=int(max_upload_mb * (1 << 20)), decode_timeout_s=decode_timeout,
                        cache_dir=Path(cache_dir) if cache_dir else Settings().cache_dir,
                        cors_origins=tuple(cors_origins))
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth is N" on every busy moment
    try:
        service = Service(list(outs), settings, use_index=not no_index, nprobe=nprobe, text_backend=text_backend,
                          decode_workers=decode_workers, image_timeout_s=image_timeout, log=log)
        service.warm_up(log)
        service.listen(host, port, threads)
    except (ConfigError, FileNotFoundError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # the port is taken, the address is not ours...
        click.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    if not is_loopback(host):
        click.echo(f"warning: listening on {host}: anyone who can reach this machine can search these runs and see "
                   f"their images{'' if token else ' (no --token set)'}. Use --host 127.0.0.1 unless you mean it.",
                   err=True)
    for ix in service.indices:
        click.echo(f"index {ix.name!r}: {ix.rows:,} rows from {ix.out} ({ix.search_kind})", err=True)
        if ix.synthetic:
            click.echo(f"note: {ix.name!r} was made with SYNTHETIC random weights: the similarities carry no meaning.",
                       err=True)
        for note in ix.notes:
            click.echo(f"note: {ix.name!r}: {note}", err=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown if ':' not in shown else f'[{shown}]'}:{service.port}/" + (f"#token={token}" if token else "")
    click.echo(f"Serving on {url}  (Ctrl-C to stop)", err=True)
    try:
        service.server.run()
    except KeyboardInterrupt:
        pass
    finally:
        service.close()


COMMANDS = [serve_cmd]

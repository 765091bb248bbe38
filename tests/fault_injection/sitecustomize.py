"""Test-only fault injection, installed into every process of a run by the tests (never shipped).

The tests put this directory on PYTHONPATH (tests/robust_helpers.py `env(faults=...)`); Python
imports `sitecustomize` at start-up in the CLI process and in every spawned worker, and this module
then wraps production functions according to the environment:

  CLIP_PIPELINE_TEST_CRASH_ON=BYTES   a decode worker exits hard (os._exit(86)) on any input whose
                                      path contains BYTES, in every generation (the supervisor's
                                      "kills its worker twice -> crashed_worker" path).
  CLIP_PIPELINE_TEST_HANG_ON=BYTES    a decode worker hangs while reading any input whose path
                                      contains BYTES (as on a dead network mount), in every
                                      generation: the preprocess.decode_timeout_s test.
  CLIP_PIPELINE_TEST_UNREADABLE_DIR=BYTES  listing any directory whose path ends in BYTES fails with
                                      PermissionError (the tests run as root, which reads any mode).
  CLIP_PIPELINE_TEST_ENOSPC_MANIFEST=STATUS  writing a manifest with that status ("complete": the
                                      end of a run) fails with OSError(ENOSPC).
  CLIP_PIPELINE_TEST_ENOSPC_SHARD=N   writing shard N fails with OSError(ENOSPC), for platforms
                                      where the tests cannot mount a tiny tmpfs.
  CLIP_PIPELINE_TEST_DIE_IN_PUBLISH=shard:N | refresh
                                      `run --update` dies (os._exit(86)) right after moving its
                                      N-th shard into the output (RunDir.adopt_shard), or, with
                                      every shard moved, before the output's files are refreshed
                                      (RunDir.publish of the output, not of the update's attempt).

Production modules read no test variables: the hooks live here only.
"""

from __future__ import annotations

import errno
import os
import time

CRASH_ENV = "CLIP_PIPELINE_TEST_CRASH_ON"
HANG_ENV = "CLIP_PIPELINE_TEST_HANG_ON"
ENOSPC_ENV = "CLIP_PIPELINE_TEST_ENOSPC_SHARD"
UNREADABLE_DIR_ENV = "CLIP_PIPELINE_TEST_UNREADABLE_DIR"
ENOSPC_MANIFEST_ENV = "CLIP_PIPELINE_TEST_ENOSPC_MANIFEST"
DIE_ENV = "CLIP_PIPELINE_TEST_DIE_IN_PUBLISH"


def _install() -> None:
    crash_on = os.fsencode(os.environ.get(CRASH_ENV, "")) or None
    hang_on = os.fsencode(os.environ.get(HANG_ENV, "")) or None
    enospc = int(os.environ[ENOSPC_ENV]) if os.environ.get(ENOSPC_ENV, "").isdigit() else None
    full_at = os.environ.get(ENOSPC_MANIFEST_ENV) or None
    if full_at is not None:
        from pipeline.data import rundir

        write_manifest = rundir.RunDir.write_manifest

        def full_write_manifest(self, manifest):
            if manifest.get("status") == full_at:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.manifest))
            return write_manifest(self, manifest)

        rundir.RunDir.write_manifest = full_write_manifest
    locked = os.fsencode(os.environ.get(UNREADABLE_DIR_ENV, "")) or None
    if locked is not None:
        from pipeline.data import listing as source  # the walk (pipeline/data/listing.py)

        sorted_entries = source._sorted_entries

        def refusing_sorted_entries(d, follow):
            if d.rstrip(b"/").endswith(locked):
                raise PermissionError(13, "Permission denied", d)
            return sorted_entries(d, follow)

        source._sorted_entries = refusing_sorted_entries
    if crash_on is not None:
        from stages import decode

        handle_one = decode.DecodeCore.handle_one

        def crashing_handle_one(self, header):
            if crash_on in header["path"]:
                os._exit(86)
            return handle_one(self, header)

        decode.DecodeCore.handle_one = crashing_handle_one
    if hang_on is not None:
        from pipeline.data import images  # read at every call by pipeline.data.inputs.decode_input

        decode_file = images.decode_file

        def hanging_decode_file(path, opts):
            while hang_on in path:
                time.sleep(3600)
            return decode_file(path, opts)

        images.decode_file = hanging_decode_file
    if enospc is not None:
        from pipeline.data import rundir

        write_shard = rundir.write_shard

        def full_disk_write_shard(out_dir, k, *args, **kw):
            if k == enospc:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (test hook {ENOSPC_ENV})")
            return write_shard(out_dir, k, *args, **kw)

        rundir.write_shard = full_disk_write_shard
    die = os.environ.get(DIE_ENV, "")
    if die:
        _die_in_publish(die)


def _die_in_publish(when: str) -> None:
    from pipeline.data import rundir

    if when.startswith("shard:"):
        after, moved = int(when.split(":")[1]), []
        adopt_shard = rundir.RunDir.adopt_shard

        def dying_adopt_shard(self, src, j, k, **kw):
            adopt_shard(self, src, j, k, **kw)
            moved.append(k)
            if len(moved) == after:
                os._exit(86)

        rundir.RunDir.adopt_shard = dying_adopt_shard
    elif when == "refresh":
        publish = rundir.RunDir.publish

        def dying_publish(self, manifest, **kw):
            if rundir.UPDATES not in self.path.parts:  # the output itself, not the update's attempt
                os._exit(86)
            return publish(self, manifest, **kw)

        rundir.RunDir.publish = dying_publish


_install()

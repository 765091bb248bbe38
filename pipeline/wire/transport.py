"""ZeroMQ transport: endpoints, sockets and the wire format ([msgpack header, raw buffers...]).

Topology rule: every worker that *receives* binds its own PULL endpoint (`<stage>-<k>`); senders
connect a PUSH to every endpoint of the next stage with ZMQ_IMMEDIATE, so messages only go to
peers that are up, and a restarted worker is reconnected to automatically. Queue depth (config
[queues]) is the high-water mark on both ends of each pipe: a bound on messages *per peer*, not a
global count (ZeroMQ's HWMs are per pipe and approximate).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import zmq

OWNER = "owner"  # "PID START" of the process that made a run's socket directory


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), "" where
    unknown: with the pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _owner_alive(root: str) -> bool:
    try:
        with open(os.path.join(root, OWNER)) as fh:
            pid_text, _, start = fh.read().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return True  # no owner record (being created, or made by an older version): leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not start or process_start(pid) in ("", start)


def remove_stale_roots(tmp: str = "/tmp") -> list[str]:
    """Remove the socket directories (/tmp/clipp-*) of runs whose process is gone (kill -9 leaves
    them behind); returns what was removed. Only this user's, only with a dead owner."""
    removed = []
    try:
        names = [n for n in os.listdir(tmp) if n.startswith("clipp-")]
    except OSError:
        return removed
    for name in names:
        root = os.path.join(tmp, name)
        try:
            if os.stat(root).st_uid != os.getuid() or _owner_alive(root):
                continue
        except OSError:
            continue
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    return removed


@dataclass(frozen=True)
class Endpoints:
    """ipc:// addresses of one run, under a private temp directory."""

    root: str

    @classmethod
    def create(cls) -> Endpoints:
        remove_stale_roots()
        # ipc paths must stay under ~100 bytes: keep the directory short.
        root = tempfile.mkdtemp(prefix="clipp-", dir="/tmp")
        with open(os.path.join(root, OWNER), "w") as fh:
            fh.write(f"{os.getpid()} {process_start(os.getpid())}\n")
        return cls(root)

    def addr(self, name: str) -> str:
        return f"ipc://{self.root}/{name}"

    def stage(self, stage: str, index: int) -> str:
        return self.addr(f"{stage}-{index}")

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


RECONNECT_MS = 10  # ipc endpoints on this host: a failed try is two system calls


def pull(ctx: zmq.Context, addr: str, hwm: int) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(addr)
    return sock


def push(ctx: zmq.Context, addrs: Sequence[str], hwm: int, linger_ms: int = 0, immediate: bool = True) -> zmq.Socket:
    """immediate=False: messages sent before the peer is up wait in the pipe and are delivered when it
    binds (for small notices that must not be lost to a peer still starting, such as credits)."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.IMMEDIATE, int(immediate))
    # a peer that binds just after this connects is reached ~10 ms later, not at ZeroMQ's default
    # 100 ms retry: at a run's start every worker connects while the others are still importing
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
    sock.setsockopt(zmq.LINGER, linger_ms)
    for a in addrs:
        sock.connect(a)
    return sock


def pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def send(sock: zmq.Socket, header: dict[str, Any], *buffers: Any, flags: int = 0) -> None:
    """Send a header and zero-copy buffers (numpy arrays must be C-contiguous)."""
    if buffers:
        sock.send_multipart([pack(header), *buffers], flags=flags, copy=False)
    else:
        sock.send(pack(header), flags=flags)


def recv(sock: zmq.Socket, flags: int = 0) -> tuple[dict[str, Any], list[memoryview]]:
    frames = sock.recv_multipart(flags=flags, copy=False)
    header = msgpack.unpackb(frames[0].buffer, raw=False)
    return header, [f.buffer for f in frames[1:]]


def array_header(arr: np.ndarray) -> dict[str, Any]:
    return {"shape": list(arr.shape), "dtype": arr.dtype.str}


def array_from(header: dict[str, Any], buf: memoryview) -> np.ndarray:
    """A read-only view of a received buffer as the array the header describes."""
    return np.frombuffer(buf, dtype=np.dtype(header["dtype"])).reshape(header["shape"])


def fsencode(path: str | bytes) -> bytes:
    return path if isinstance(path, bytes) else os.fsencode(path)


class Outbox:
    """Messages to send without ever blocking the sender (the supervisor's to the sink and to the
    first stage): queued in order, sent while the peers take them; what would block waits."""

    def __init__(self) -> None:
        self.queue: list[tuple[zmq.Socket, dict]] = []

    def put(self, sock: zmq.Socket, header: dict) -> None:
        self.queue.append((sock, header))

    def pump(self) -> bool:
        """Send what the peers take now, in order; True when nothing is left waiting."""
        for i, (sock, header) in enumerate(self.queue):
            try:
                send(sock, header, flags=zmq.NOBLOCK)
            except zmq.Again:
                self.queue = self.queue[i:]
                return False
        self.queue = []
        return True

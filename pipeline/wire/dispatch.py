"""Credit-based dispatch into the inference processes: work goes where there is capacity.

Before, every sender into the infer stage had one PUSH socket connected to every device and
ZeroMQ round-robined between them, each pipe holding up to `queues.infer` images on both ends:
at the start everything queued on the first device that came up, a slow chip got as much as a
fast one, and at the end one device could hold hundreds of queued images while another idled
(issue #12, #20).

Now each infer process grants each upstream sender (decode, preprocess or, with a files device,
the source) a *window*: the number of images that sender may have outstanding at it (sent, not
yet finished). The window is `(1 + queues.infer_batches) x batch_size` split over the senders,
so a device holds the batch it runs plus `queues.infer_batches` prepared/queued batches, never
more (a sender can always have one message outstanding). A sender sends each message to the
device with the most free window (lowest outstanding/window), and when no device has room it
waits (that is its backpressure). Credits come back when the device has finished the images:
the infer loop counts the ids of every result or failure it sends to the sink by the sender they
came from. So no device idles while another holds queued work it could take: a device with a
free window takes the next message.

An infer process announces (peer index, generation, window) as soon as its input is bound, before
its model loads (the first window of work waits in its socket while the sender goes on: the first
batches are there when the model is), again with the model's own batch once open, and every
ANNOUNCE_INTERVAL_S. Restarts: a new generation resets what the senders count as outstanding there (its queue
died with it; the supervisor re-issues the ids). Messages carry the sender's index and generation
(`src`, `sg`), and credits for a previous generation of a sender are ignored. Nothing here affects
completion accounting: the sink still counts ids, and everything unresolved after a death is
re-issued as before.

`Credits` and `Origins` are the pure bookkeeping; `CreditSender` (a sender's sockets) and
`CreditReturner` (an infer process's) put them on the wire for the worker loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from pipeline.wire import transport

SEND_POLL_MS = 200  # no device has room: wait this long for credit before checking the worker is still wanted
CREDIT_RETRY_MS = 20  # a device with credit but not connected yet: try again this soon
ANNOUNCE_INTERVAL_S = 0.5  # an infer process repeats its window this often (a restarted sender learns it)


@dataclass
class Peer:
    gen: int = -1
    window: int = 0  # 0 = not announced yet (the device process has not bound its input): no work goes there
    out: int = 0  # images sent by this sender, not yet credited back


@dataclass
class Credits:
    """A sender's view of the devices' windows (pure: no sockets)."""

    n_peers: int
    gen: int = 0  # this sender's own generation (credits for older ones are ignored)
    peers: list[Peer] = field(default_factory=list)
    _next: int = 0

    def __post_init__(self) -> None:
        self.peers = [Peer() for _ in range(self.n_peers)]

    def on_credit(self, msg: dict) -> None:
        """{"peer": d, "gen": g, "w": window, "n": images finished, "sg": sender generation}."""
        d = int(msg["peer"])
        if not 0 <= d < self.n_peers:
            return
        p = self.peers[d]
        g = int(msg["gen"])
        if g < p.gen:
            return  # from a previous generation of that device
        if g > p.gen:
            p.gen, p.out = g, 0  # a restarted device: what was queued there died with it
        p.window = int(msg["w"])
        if msg.get("sg", self.gen) == self.gen:
            p.out = max(0, p.out - int(msg.get("n", 0)))

    def choose(self, exclude: frozenset[int] | set[int] = frozenset(), cap: int | None = None,
               n: int = 0) -> int | None:
        """The device with the most free window (ties: rotating), or None when none has room.

        `cap` (a tail piece of `n` images, see tail_images below): the device must also stay at
        or under `cap` images outstanding from this sender once it has the piece, so the last
        pieces of a run go to devices about to run dry instead of queueing behind a full window."""
        best, best_load = None, None
        for k in range(self.n_peers):
            d = (self._next + k) % self.n_peers
            p = self.peers[d]
            if d in exclude or p.window <= 0 or p.out >= p.window or (cap is not None and p.out + n > cap):
                continue
            load = p.out / p.window
            if best_load is None or load < best_load:
                best, best_load = d, load
        if best is not None:
            self._next = (best + 1) % self.n_peers
        return best

    def on_sent(self, d: int, n: int) -> None:
        self.peers[d].out += n

    def outstanding(self) -> list[int]:
        return [p.out for p in self.peers]


# The tail of a run (issue #20). With whole batches and a window of (1 + infer_batches) batches,
# the run ends with one device running its last queued batch while the others idle: up to a
# window of images on one device, ~1.5 s of a CPU core per batch of 16, ~8% of a 192-image job
# on 2 cores. So the source sends the last `tail_images` inputs as small pieces marked "tail";
# the device runs a tail piece at once (no batch to fill, no batch_timeout wait), and a sender
# gives a tail piece only to a device that then holds at most one batch plus that piece (header
# "tail" = that cap in images: the batch it runs and the next piece ready, so the device never
# waits for the wire). The imbalance at the end is then about one piece instead of one window.
def tail_images(batch_size: int, extra_batches: int, n_devices: int) -> int:
    """Inputs at the end of a run sent as tail pieces: what all the devices' windows hold."""
    return max(0, n_devices * (1 + extra_batches) * batch_size) if n_devices > 1 else 0


def tail_cap(batch_size: int, pieces: int = 4) -> int:
    """Images a device may hold (from one sender) when it is given a tail piece."""
    return batch_size + tail_piece(batch_size, pieces)


def tail_piece(batch_size: int, pieces: int = 4) -> int:
    """Inputs per tail piece: a batch cut in `pieces` (Backend.tail_pieces: a quarter batch where
    the per-image cost of a small batch is about a full one's, as ViT-B/32 on a CPU core at fp32)."""
    return max(1, batch_size // max(1, pieces))


def window_for(batch_size: int, extra_batches: int, n_senders: int) -> int:
    """Images one sender may have outstanding at one device: the device holds the batch it runs
    plus `extra_batches` more, split over the senders (at least one image: one message)."""
    return max(1, -(-(1 + extra_batches) * batch_size // max(1, n_senders)))


def items_in(header: dict) -> int:
    return len(header["ids"]) if "ids" in header else 1


class Origins:
    """Infer side: which sender (and its generation) each held id came from, and the credits to
    return once the ids are finished."""

    def __init__(self) -> None:
        self.of: dict[int, tuple[int, int]] = {}
        self.due: dict[tuple[int, int], int] = {}

    def received(self, header: dict) -> None:
        if "src" not in header:
            return  # re-issued by the supervisor (files mode): not counted by any sender
        key = (int(header["src"]), int(header.get("sg", 0)))
        for i in (header["ids"] if "ids" in header else [header["id"]]):
            self.of[int(i)] = key

    def finished(self, header: dict) -> None:
        for i in (header["ids"] if "ids" in header else [header["id"]] if "id" in header else []):
            key = self.of.pop(int(i), None)
            if key is not None:
                self.due[key] = self.due.get(key, 0) + 1

    def take_due(self) -> dict[tuple[int, int], int]:
        due, self.due = self.due, {}
        return due


class CreditSender:
    """A sender into the infer stage (credit dispatch): one PUSH per device and a PULL where the
    devices return credits. `send` puts a message on the device with the most free window and
    waits for credit while none has room."""

    def __init__(self, ctx: zmq.Context, device_addrs: tuple[str, ...], hwm: int, credit_addr: str, index: int,
                 generation: int):
        self.peers = [transport.push(ctx, [a], hwm) for a in device_addrs]
        self.credit_in = transport.pull(ctx, credit_addr, hwm=100000)
        self.credits = Credits(len(device_addrs), gen=generation)
        self.index, self.generation = index, generation

    def send(self, header: dict, buffers: tuple, check_alive: Callable[[], None]) -> None:
        n = items_in(header)
        cap = int(header["tail"]) if header.get("tail") else None  # a tail piece (tail_images)
        header = {**header, "src": self.index, "sg": self.generation}
        tried: set[int] = set()
        while True:
            self.take_credits()
            d = self.credits.choose(tried, cap, n)
            if d is None:
                check_alive()
                self.credit_in.poll(CREDIT_RETRY_MS if tried else SEND_POLL_MS)
                tried.clear()
                continue
            try:
                transport.send(self.peers[d], header, *buffers, flags=zmq.NOBLOCK)
            except zmq.Again:  # that device is not connected (starting, restarting, gone)
                tried.add(d)
                continue
            self.credits.on_sent(d, n)
            return

    def take_credits(self) -> None:
        while True:
            try:
                h, _ = transport.recv(self.credit_in, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.credits.on_credit(h)

    def close(self) -> None:
        for s in (self.credit_in, *self.peers):
            s.close(0)


class CreditReturner:
    """An infer process with credit-dispatching senders: where each held id came from (`Origins`),
    credits back to those senders, and this device's window announced to all of them."""

    def __init__(self, ctx: zmq.Context, sender_addrs: tuple[str, ...], window: int, index: int, generation: int):
        # not IMMEDIATE: the first announcement, sent before this device's model loads, waits for a
        # sender still starting instead of being dropped (the next would come only after the load)
        self.out = [transport.push(ctx, [a], hwm=10000, immediate=False) for a in sender_addrs]
        self.origins = Origins()
        self.window = window
        self.base = {"t": "credit", "peer": index, "gen": generation, "w": window}
        self.last_announce = 0.0
        self.return_credits(announce=True)

    def set_window(self, window: int) -> None:
        """Announce another window (the device's own batch, known once its model is open)."""
        if window != self.window:
            self.window = window
            self.base = {**self.base, "w": window}
            self.return_credits(announce=True)

    def received(self, header: dict) -> None:
        self.origins.received(header)

    def finished(self, header: dict) -> None:
        self.origins.finished(header)  # these ids are done here: their senders get credit back

    def return_credits(self, announce: bool = False) -> None:
        """Credits for the ids finished since the last call, to the senders they came from; and
        every ANNOUNCE_INTERVAL_S (or when asked) this device's window to every sender (a sender
        that restarted learns it so, and a new generation of this device resets their counts)."""
        for (src, sg), n in self.origins.take_due().items():
            if 0 <= src < len(self.out):
                self._send(src, {**self.base, "n": n, "sg": sg})
        now = time.monotonic()
        if announce or now - self.last_announce >= ANNOUNCE_INTERVAL_S:
            self.last_announce = now
            for src in range(len(self.out)):
                self._send(src, {**self.base, "n": 0})

    def _send(self, src: int, header: dict) -> None:
        try:
            transport.send(self.out[src], header, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # that sender is gone: its next generation starts from the announcements

    def close(self) -> None:
        for s in self.out:
            s.close(0)

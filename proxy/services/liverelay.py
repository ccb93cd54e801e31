"""The live view across workers (``server.workers`` > 1).

SO_REUSEPORT hands each ``/live/events`` stream to one worker, which sees
only its own requests. So the parent, before it forks, makes one datagram
socket pair per worker and one shared byte per worker ("someone watches
me"); each worker reads its own pair and, while another worker's byte is
set, sends that worker a copy of every record it publishes. The worker
serving the stream publishes the copies as its own.

Invariants:
- nothing is built or sent while no worker has a watcher: the feed asks the
  shared bytes (a read of a few bytes, no system call) whether anyone does;
  a new watcher counts for every worker from the moment it is set;
- bounded: a copy that does not fit the socket buffer towards its worker
  (``SEND_BUFFER_BYTES``: a worker that stopped reading) or exceeds a
  datagram is dropped and counted, never queued in the process;
- local: socket pairs inherited across ``fork`` (no path, no port, no other
  process can connect), and the shared bytes an anonymous mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import socket
from typing import Any

import orjson

from .live import LiveFeed

log = logging.getLogger(__name__)

# A worker reads at most this many copies per wake-up before it yields to requests.
READ_BURST = 256
MAX_DATAGRAM = 64 * 1024
# What may wait for one worker, in the kernel and not in a process: a burst of
# records several times what the default send buffer would hold (it is the
# kernel's, typically 208 KiB; Linux doubles the value asked for).
SEND_BUFFER_BYTES = 1 << 20


class LiveRelay:
    def __init__(self, workers: int) -> None:
        """In the parent, before the workers are forked."""
        self.workers = workers
        self._pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(workers)]
        for send, _receive in self._pairs:
            send.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._watched = mmap.mmap(-1, workers)  # MAP_SHARED | MAP_ANONYMOUS: one byte per worker
        self.index = -1
        self.dropped = 0
        self._feed: LiveFeed | None = None

    def become(self, index: int) -> None:
        """In worker ``index`` after the fork: keep its own receiving end and
        every other worker's sending end, close the rest."""
        self.index = index
        for i, (send, receive) in enumerate(self._pairs):
            if i == index:
                send.close()
            else:
                receive.close()
                send.setblocking(False)

    def close(self) -> None:
        """In the parent once the workers are forked: it relays nothing."""
        for pair in self._pairs:
            for sock in pair:
                sock.close()

    # ------------------------------------------------------------- lifecycle

    def start(self, feed: LiveFeed) -> None:
        self._feed = feed
        feed.relay = self
        receive = self._pairs[self.index][1]
        receive.setblocking(False)
        asyncio.get_running_loop().add_reader(receive.fileno(), self._receive)

    async def stop(self) -> None:
        self.watched(False)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._pairs[self.index][1].fileno())

    # ------------------------------------------------------------- watching

    def watched(self, local: bool) -> None:
        """This worker has (or no longer has) a watcher of its own."""
        if self.index >= 0:
            self._watched[self.index] = 1 if local else 0

    def others_watched(self) -> bool:
        flags = self._watched
        return any(flags[i] for i in range(self.workers) if i != self.index)

    # ---------------------------------------------------------------- copies

    def send(self, record: dict[str, Any]) -> None:
        """A copy of a record this worker published, to every watched worker."""
        flags = self._watched
        peers = [i for i in range(self.workers) if i != self.index and flags[i]]
        if not peers:
            return
        data = orjson.dumps(record)
        if len(data) > MAX_DATAGRAM:
            self.dropped += len(peers)
            return
        for i in peers:
            try:
                self._pairs[i][0].send(data)
            except OSError:  # full (that worker is not reading) or gone: dropped
                self.dropped += 1

    def _receive(self) -> None:
        sock = self._pairs[self.index][1]
        for _ in range(READ_BURST):
            try:
                data = sock.recv(MAX_DATAGRAM)
            except OSError:  # nothing more now (BlockingIOError) or closing
                return
            try:
                record = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and self._feed is not None:
                self._feed.relayed(record)

"""In-memory devices with the interface of the kernel ones, so that two
dataplanes can be joined in a test without privileges.

* :class:`MemoryPipe` -- a TUN-like pair: whole IP packets written to one end
  are read from the other.
* :class:`MemoryUdp` -- a pair of "UDP sockets" for ESP in UDP that behave
  like :class:`espdp.io.udp.UdpEncapSocket` (same demux, same synthetic outer
  header, same stats), found by the outer header's destination.

Each end's queue is bounded (``maxlen``); what does not fit is counted as
``dropped`` on the receiving end, as a full socket buffer would.  ``fileno()``
is an eventfd that is readable while packets are queued.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from typing import Optional

from ..errors import ConfigError
from ._datagram import (
    HEADER_LEN,
    KEEPALIVE,
    NON_ESP_MARKER,
    IkeCallback,
    deliver,
    family_of,
    new_stats,
    pack_addr,
    parse_outer,
)


class _Endpoint:
    def __init__(self, maxlen: int) -> None:
        self._queue: deque = deque()
        self.maxlen = maxlen
        self.peer: Optional[_Endpoint] = None
        self._event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.closed = False

    def _push(self, item) -> None:
        if self.closed or len(self._queue) >= self.maxlen:
            self.stats["dropped"] += 1
            return
        self._queue.append(item)
        os.eventfd_write(self._event, 1)

    def _drained(self) -> None:
        if not self._queue:
            try:
                os.eventfd_read(self._event)
            except BlockingIOError:
                pass

    def pending(self) -> int:
        """How many packets wait to be read."""
        return len(self._queue)

    def fileno(self) -> int:
        return self._event

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.clear()
            os.close(self._event)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MemoryPipe(_Endpoint):
    """One end of an in-memory TUN-like pair; make a connected pair with :meth:`pair`."""

    def __init__(self, maxlen: int = 1024, name: str = "mem", mtu: int = 1400) -> None:
        super().__init__(maxlen)
        self.name = name
        self.mtu = mtu
        self.stats = {"received": 0, "sent": 0, "dropped": 0, "send_errors": 0}

    @classmethod
    def pair(cls, maxlen: int = 1024, mtu: int = 1400) -> tuple[MemoryPipe, MemoryPipe]:
        a, b = cls(maxlen, "mem-a", mtu), cls(maxlen, "mem-b", mtu)
        a.peer, b.peer = b, a
        return a, b

    def read_batch(self, batch) -> int:
        added = 0
        start = batch.headroom
        room = batch.slot_size - start
        while batch.count < batch.capacity and self._queue:
            packet = self._queue.popleft()
            if len(packet) > room:
                self.stats["dropped"] += 1
                continue
            i = batch.count
            memoryview(batch.data[i])[start:start + len(packet)] = packet
            batch.offset[i] = start
            batch.length[i] = len(packet)
            batch.mark[i] = 0
            batch.sa[i] = -1
            batch.count = i + 1
            added += 1
        self._drained()
        self.stats["received"] += added
        return added

    def write_batch(self, batch, indexes: Optional[Iterable[int]] = None) -> int:
        sent = 0
        for i in range(batch.count) if indexes is None else indexes:
            if self.peer is None:
                self.stats["send_errors"] += 1
                continue
            off = int(batch.offset[i])
            self.peer._push(bytes(batch.data[i, off:off + int(batch.length[i])]))
            sent += 1
        self.stats["sent"] += sent
        return sent

    def write(self, packet: bytes) -> None:
        """Hand one packet to the other end (a test's convenience)."""
        if self.peer is not None:
            self.peer._push(bytes(packet))
            self.stats["sent"] += 1


class MemoryUdp(_Endpoint):
    """One end of an in-memory UDP-encapsulation link; see :meth:`pair`.

    ``addr`` is this end's ``(host, port)``: the source the peer sees (change
    it to play a NAT rebinding) and the destination the peer must write to.
    """

    def __init__(self, addr: tuple, maxlen: int = 1024,
                 on_ike: Optional[IkeCallback] = None) -> None:
        super().__init__(maxlen)
        self.family = family_of(addr[0])
        self.addr = (addr[0], int(addr[1]))
        self.port = self.addr[1]
        self.on_ike = on_ike
        self.stats = new_stats()
        self._local = pack_addr(self.family, addr[0])
        self._hdr = HEADER_LEN[self.family]

    @classmethod
    def pair(cls, addr_a: tuple, addr_b: tuple, maxlen: int = 1024) -> tuple[MemoryUdp, MemoryUdp]:
        a, b = cls(addr_a, maxlen), cls(addr_b, maxlen)
        if a.family != b.family:
            raise ConfigError(f"{addr_a[0]} and {addr_b[0]} are of different families")
        a.peer, b.peer = b, a
        return a, b

    def read_batch(self, batch) -> int:
        if batch.headroom < self._hdr:
            raise ConfigError(f"batch headroom {batch.headroom} < {self._hdr} bytes of outer "
                              "IP + UDP header")
        added = 0
        start = batch.headroom + self._hdr
        room = batch.slot_size - start
        while batch.count < batch.capacity and self._queue:
            payload, source = self._queue.popleft()
            if len(payload) > room:
                self.stats["received"] += 1
                self.stats["truncated"] += 1
                continue
            memoryview(batch.data[batch.count])[start:start + len(payload)] = payload
            if deliver(batch, self.family, len(payload), source, self._local, self.port,
                       self.stats, self.on_ike):
                added += 1
        self._drained()
        return added

    def write_batch(self, batch, indexes: Optional[Iterable[int]] = None) -> int:
        sent = 0
        for i in range(batch.count) if indexes is None else indexes:
            slot = memoryview(batch.data[i])
            where = parse_outer(slot, int(batch.offset[i]), int(batch.length[i]))
            if where is None or where[0] != self.family:
                self.stats["bad_outer"] += 1
                continue
            _, host, port, begin, end = where
            if not self._reaches(host, port):
                self.stats["send_errors"] += 1  # nobody there: lost, as on a network
                continue
            self.peer._push((bytes(slot[begin:end]), self.addr))
            sent += 1
        self.stats["sent"] += sent
        return sent

    def _reaches(self, host: str, port: int) -> bool:
        peer = self.peer
        return (peer is not None and port == peer.port
                and pack_addr(self.family, host) == peer._local)

    def send_keepalive(self, peer: tuple) -> None:
        self._send(KEEPALIVE, peer)

    def send_ike(self, message: bytes, peer: tuple) -> None:
        self._send(NON_ESP_MARKER + message, peer)

    def _send(self, data: bytes, peer: tuple) -> None:
        if self._reaches(peer[0], peer[1]):
            self.peer._push((bytes(data), self.addr))
        else:
            self.stats["send_errors"] += 1

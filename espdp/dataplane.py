"""The dataplane loop: TUN -> policy -> encrypt -> UDP, UDP -> decrypt -> policy -> TUN.

It joins devices of :mod:`espdp.io` (real or in-memory) through the engine
and the XFRM model.  One thread, no blocking call: the owner calls
:meth:`Dataplane.handle_tun` / :meth:`handle_datagrams` when a device is
readable (or :meth:`run` does it with a selector), and :meth:`tick` for the
timers.

This first version asks the XFRM model about each outbound packet from
Python (policy lookup and SA choice) and checks each decrypted packet
against the inbound policies from Python; the crypto and the packet work
stay in the engine, a batch at a time.  Moving the per-packet decisions
into the engine (a flow cache) is the performance issue's work.
"""

from __future__ import annotations

import ipaddress
import logging
import selectors
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from .engine import FLAG_MAPPING, VERDICTS, PacketBatch
from .xfrm.policy import flow_of_packet

logger = logging.getLogger(__name__)

BATCH = 64
SLOT = 2048 + 256


@dataclass
class Counters:
    """What the loop did, besides the engine's own per-SA counters."""

    tun_in: int = 0
    tun_out: int = 0
    sent: int = 0
    received: int = 0
    clear: int = 0            # no policy asked for protection (dropped: see handle_tun)
    policy_drops: dict = field(default_factory=dict)   # block, acquire, inbound_policy, ...
    engine_drops: dict = field(default_factory=dict)   # verdict -> packets

    def drop(self, table: dict, reason: str) -> None:
        table[reason] = table.get(reason, 0) + 1


def _outer_source(packet: bytes) -> tuple[Any, int]:
    """Source address and UDP source port of an outer packet (as the io layer wrote it)."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        return ipaddress.IPv4Address(packet[12:16]), int.from_bytes(packet[ihl:ihl + 2], "big")
    return ipaddress.IPv6Address(packet[8:24]), int.from_bytes(packet[40:42], "big")


class Dataplane:
    """TUN and encapsulation sockets joined through the engine and an Xfrm model."""

    def __init__(self, xfrm: Any, tun: Any, sockets: dict[int, Any]) -> None:
        self.xfrm = xfrm
        self.tun = tun
        self.sockets = sockets            # outer family (4, 6) -> UDP encapsulation socket
        self.counters = Counters()
        self._out = PacketBatch(BATCH, SLOT)
        self._in = PacketBatch(BATCH, SLOT)

    # ------------------------------------------------------------ outbound

    def handle_tun(self, now: float) -> int:
        """Read a batch from the TUN, encrypt what the policies say, send it."""
        batch = self._out
        batch.clear()
        if not self.tun.read_batch(batch):
            return 0
        self.counters.tun_in += batch.count
        for i in range(batch.count):
            batch.sa[i] = -1
            flow = flow_of_packet(batch.packet(i))
            if flow is None:
                self.counters.drop(self.counters.policy_drops, "not_ip")
                continue
            decision = self.xfrm.outbound(flow, now)
            if decision.action == "encrypt":
                batch.sa[i] = decision.sa.index
            elif decision.action == "clear":
                # Routed into the tunnel but no policy protects it: the TUN is the
                # only way out, and writing it back would loop.  Counted, dropped.
                self.counters.clear += 1
                self.counters.drop(self.counters.policy_drops, "no_policy")
            else:
                reason = "acquire" if decision.action in ("drop", "queued") else "block"
                self.counters.drop(self.counters.policy_drops, reason)
        # Slots without an SA come back from the engine as no_sa: they were counted above.
        self.xfrm.sad.table.encrypt(batch)
        by_family: dict[int, list[int]] = {}
        for i in range(batch.count):
            if batch.sa[i] < 0:
                continue
            verdict = VERDICTS[batch.verdict[i]]
            if verdict != "ok":
                self.counters.drop(self.counters.engine_drops, verdict)
                continue
            family = 4 if batch.data[i, batch.offset[i]] >> 4 == 4 else 6
            by_family.setdefault(family, []).append(i)
        for family, indexes in by_family.items():
            sock = self.sockets.get(family)
            if sock is None:
                self.counters.drop(self.counters.policy_drops, f"no_ipv{family}_socket")
                continue
            self.counters.sent += sock.write_batch(batch, indexes)
        return batch.count

    # ------------------------------------------------------------ inbound

    def handle_datagrams(self, sock: Any, now: float) -> int:
        """Read a batch of ESP from ``sock``, decrypt, check policy, deliver to the TUN."""
        batch = self._in
        batch.clear()
        if not sock.read_batch(batch):
            return 0
        self.counters.received += batch.count
        # The outer source (for MAPPING) may be overwritten by decryption in place.
        heads = [batch.packet(i)[:48] for i in range(batch.count)]
        self.xfrm.sad.table.decrypt(batch)
        deliver = []
        for i in range(batch.count):
            verdict = VERDICTS[batch.verdict[i]]
            if verdict != "ok":
                self.counters.drop(self.counters.engine_drops, verdict)
                continue
            sa = self.xfrm.sad.table[int(batch.sa[i])]
            packet = batch.packet(i)
            if batch.flags[i] & FLAG_MAPPING:
                self.xfrm.report_mapping(sa, *_outer_source(heads[i]), now)
            flow = flow_of_packet(packet)
            if flow is None or not self.xfrm.inbound_check(sa, flow, now,
                                                           mark=int(batch.mark[i])):
                self.counters.drop(self.counters.policy_drops, "inbound_policy")
                continue
            deliver.append(i)
        if deliver:
            self.counters.tun_out += self.tun.write_batch(batch, deliver)
        return batch.count

    # ------------------------------------------------------------ loop

    def tick(self, now: float) -> list:
        return self.xfrm.tick(now)

    def run(self, stop: threading.Event, clock, tick_interval: float = 0.25,
            extra: Optional[dict] = None) -> None:
        """Serve until ``stop`` is set.  ``clock()`` gives ``now``; ``extra`` maps
        further file objects to ``callback(now)`` (the control socket)."""
        selector = selectors.DefaultSelector()
        selector.register(self.tun.fileno(), selectors.EVENT_READ, self.handle_tun)
        for sock in self.sockets.values():
            selector.register(sock.fileno(), selectors.EVENT_READ,
                              lambda now, s=sock: self.handle_datagrams(s, now))
        for fileobj, callback in (extra or {}).items():
            selector.register(fileobj, selectors.EVENT_READ, callback)
        next_tick = clock()
        try:
            while not stop.is_set():
                for key, _ in selector.select(tick_interval):
                    key.data(clock())
                now = clock()
                if now >= next_tick:
                    self.tick(now)
                    next_tick = now + tick_interval
        finally:
            selector.close()

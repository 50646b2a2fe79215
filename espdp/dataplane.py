"""The dataplane loop: TUN -> policy -> encrypt -> wire, wire -> decrypt -> policy -> TUN.

It joins devices of :mod:`espdp.io` (real or in-memory) through the engine
and the XFRM model.  One thread, no blocking call: the owner calls
:meth:`Dataplane.handle_tun` / :meth:`handle_datagrams` when a device is
readable (:class:`espdp.tunnel.Tunnel` does it with a selector), and
:meth:`tick` for the timers.

* Outbound, an encrypted packet leaves by the UDP socket of its outer family
  when its SA encapsulates (``sockets``), else by the raw ESP socket of that
  family (``esp_sockets``).  An inner packet that would not fit ``path_mtu``
  once encapsulated gets an ICMP "fragmentation needed" (IPv4 with DF) or
  "packet too big" (IPv6) back through the TUN, with the inner MTU that fits.
* Inbound, a decrypted packet that carries a mark (the SA's set-mark, or the
  outer packet's mark) goes to ``injector`` (the kernel, through a raw socket
  with SO_MARK, so ``ip rule fwmark`` and nftables see it) when there is one;
  unmarked packets go to the TUN.
* NAT keepalives (RFC 3948 section 2.3) go to the peer of every UDP
  encapsulated SA used for output that sent nothing for
  ``keepalive_interval`` seconds.

This version asks the XFRM model about each outbound packet from Python
(policy lookup and SA choice) and checks each decrypted packet against the
inbound policies from Python; the crypto and the packet work stay in the
engine, a batch at a time.  Moving the per-packet decisions into the engine
(a flow cache) is the performance issue's work.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import pmtu
from ._flow import FLAG_ACCEPTED, FlowCache, InboundCache
from .engine import FLAG_MAPPING, VERDICTS, PacketBatch
from .errors import FatalError
from .xfrm.policy import flow_key, flow_of_packet

logger = logging.getLogger(__name__)

BATCH = 64
FLOW_CACHE = 4096   # flows remembered per direction
SLOT = 2048 + 256
# (family, UDP or not) of PacketBatch.sent_groups' four lists
OUTER_GROUPS = ((4, True), (4, False), (6, True), (6, False))
# What reading a TUN fd says once its device was deleted (ip link del): EBADFD.
TUN_GONE = (errno.EBADFD, errno.ENODEV, errno.ENXIO)


@dataclass
class Counters:
    """What the loop did, besides the engine's own per-SA counters."""

    tun_in: int = 0
    tun_out: int = 0
    sent: int = 0
    received: int = 0
    injected: int = 0         # marked packets handed to the kernel
    clear: int = 0            # no policy asked for protection (dropped: see handle_tun)
    too_big: int = 0          # inner packets answered with ICMP too big
    keepalives: int = 0
    policy_drops: dict = field(default_factory=dict)   # block, acquire, inbound_policy, ...
    engine_drops: dict = field(default_factory=dict)   # verdict -> packets

    def drop(self, table: dict, reason: str, count: int = 1) -> None:
        table[reason] = table.get(reason, 0) + count

    def as_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self).items()}


def _outer_source(packet: bytes) -> tuple[Any, int]:
    """Source address and UDP source port of an outer packet (as the io layer wrote it)."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        return ipaddress.IPv4Address(packet[12:16]), int.from_bytes(packet[ihl:ihl + 2], "big")
    return ipaddress.IPv6Address(packet[8:24]), int.from_bytes(packet[40:42], "big")


class Dataplane:
    """TUN and wire devices joined through the engine and an Xfrm model.

    ``sockets``/``esp_sockets`` map the outer family (4, 6) to a UDP
    encapsulation socket / a raw ESP socket; ``injector`` takes marked
    decrypted packets; ``path_mtu`` is the MTU of the path to the peers.

    With several workers (:mod:`espdp.workers`) each has a Dataplane of its
    own (devices, batches, caches, counters) with its ``worker`` index into
    the engine's table, and ``lock`` (shared by all, held by the thread that
    runs the control plane) around every call into the XFRM model.
    """

    def __init__(self, xfrm: Any, tun: Any, sockets: dict[int, Any],
                 esp_sockets: Optional[dict[int, Any]] = None, injector: Any = None,
                 path_mtu: int = 1500, keepalive_interval: float = 0.0,
                 worker: int = 0, lock: Any = None) -> None:
        self.xfrm = xfrm
        self.worker = worker
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.tun = tun
        self.sockets = sockets
        self.esp_sockets = esp_sockets or {}
        self.injector = injector
        self.path_mtu = path_mtu
        self.keepalive_interval = keepalive_interval
        self.counters = Counters()
        self._out = PacketBatch(BATCH, SLOT)
        self._in = PacketBatch(BATCH, SLOT)
        self._icmp = PacketBatch(BATCH, SLOT)
        self._flows = FlowCache(FLOW_CACHE)    # outbound: flow -> SA
        self._accepted = InboundCache(FLOW_CACHE)  # inbound: (SA, mark, flow) allowed
        self._fits: dict[int, tuple] = {}      # engine SA index -> (info, {family: max inner})
        self._used: dict[int, Any] = {}        # engine SA index -> SA used for output
        self._idle: dict[int, int] = {}        # engine SA index -> oseq at the last check
        self._next_keepalive = 0.0
        # espdp.cluster: on a cluster node, the SegmentFilter that keeps only this
        # node's segments; called once per batch, before any crypto (None: all).
        self.cluster_filter: Any = None

    # ------------------------------------------------------------ outbound

    def handle_tun(self, now: float) -> int:
        """Read a batch from the TUN, encrypt what the policies say, send it.
        :class:`~espdp.errors.FatalError` when the TUN device is gone."""
        batch = self._out
        batch.clear()
        try:
            if not self.tun.read_batch(batch):
                return 0
        except OSError as e:
            if e.errno in TUN_GONE:
                name = getattr(self.tun, "name", None) or "device"
                raise FatalError(f"tun {name}: the device went away ({e.strerror})") from None
            raise
        self.counters.tun_in += batch.count
        # Flows decided before (in this SAD/SPD generation) get their SA in C; the
        # rest are decided here and remembered.
        misses = self._flows.classify(batch, self.xfrm.sad.table, self.xfrm.generation)
        chosen: dict[bytes, tuple] = {}   # flow key -> (SA, family, generation), this batch
        with self.lock:   # the slow path: the model decides (workers share it)
            for i in misses:
                packet = batch.packet(i)
                key = flow_key(packet)
                hit = chosen.get(key) if key is not None else None
                if hit is not None:  # the same flow as an earlier packet: the same decision
                    self._choose(batch, i, *hit)
                    continue
                flow = flow_of_packet(packet)
                if flow is None:
                    self.counters.drop(self.counters.policy_drops, "not_ip")
                    continue
                generation = self.xfrm.generation
                decision = self.xfrm.outbound(flow, now, packet=packet)
                if decision.action == "encrypt":
                    if key is not None:
                        chosen[key] = (decision.sa, flow.family, generation)
                    self._choose(batch, i, decision.sa, flow.family, generation)
                elif decision.action == "clear":
                    # Routed into the tunnel but no policy protects it: the TUN is the
                    # only way out, and writing it back would loop.  Counted, dropped.
                    self.counters.clear += 1
                    self.counters.drop(self.counters.policy_drops, "no_policy")
                elif decision.action != "queued":
                    reason = "acquire" if decision.action == "drop" else "block"
                    self.counters.drop(self.counters.policy_drops, reason)
        self._send_icmp()
        self._encrypt_and_send(batch)
        return batch.count

    def _choose(self, batch: PacketBatch, i: int, sa: Any, family: int,
                generation: Optional[int] = None) -> None:
        """Give slot ``i`` to ``sa`` unless it is too big for the path; remember the
        decision for the flow (valid in ``generation``, packets up to the limit)."""
        limit = self._max_inner(sa, family)
        length = int(batch.length[i])
        if length > limit:
            reply = pmtu.too_big_reply(batch.packet(i), limit)
            if reply is not None:
                self.counters.too_big += 1
                if self._icmp.count < self._icmp.capacity:
                    self._icmp.add(reply)
                return
            # IPv4 without DF: encrypted anyway, the kernel fragments the outer packet
        elif generation is not None:
            self._flows.insert(batch, i, sa.index, limit, generation)
        batch.sa[i] = sa.index
        self._used[sa.index] = sa

    def _max_inner(self, sa: Any, family: int) -> int:
        info = self.xfrm.sad.state_of(sa).info
        cached = self._fits.get(sa.index)
        if cached is None or cached[0] is not info:
            cached = self._fits[sa.index] = (info, {})
        fits = cached[1]
        if family not in fits:
            fits[family] = pmtu.max_inner(info, self.path_mtu, family)
        return fits[family]

    def _send_icmp(self) -> None:
        if self._icmp.count:
            self.counters.tun_out += self.tun.write_batch(self._icmp, range(self._icmp.count))
            self._icmp.clear()

    def _encrypt_and_send(self, batch: PacketBatch) -> None:
        if self.cluster_filter is not None:  # espdp.cluster: SAs armed on this node only
            self.cluster_filter.outbound(batch)
        # Slots without an SA come back from the engine as no_sa: they were counted.
        self.xfrm.sad.table.encrypt(batch, self.worker)
        failed, groups = batch.sent_groups()
        for verdict in failed:
            self.counters.drop(self.counters.engine_drops, VERDICTS[verdict])
        # Each packet leaves by the socket of its outer family and kind (UDP or ESP).
        for (family, is_udp), indexes in zip(OUTER_GROUPS, groups, strict=True):
            if not indexes:
                continue
            device = (self.sockets if is_udp else self.esp_sockets).get(family)
            if device is None:
                kind = "udp" if is_udp else "esp"
                self.counters.drop(self.counters.policy_drops,
                                   f"no_ipv{family}_{kind}_socket", len(indexes))
                continue
            self.counters.sent += device.write_batch(batch, indexes)

    def flush_queued(self, now: float) -> int:
        """Send the packets held while acquiring whose SA has arrived."""
        ready = self.xfrm.ready_queued()
        batch = self._out
        done = 0
        while ready:
            batch.clear()
            for sa, packet, flow, _mark in ready[:batch.capacity]:
                i = batch.add(packet)
                batch.sa[i] = -1
                self._choose(batch, i, sa, flow.family)
            ready = ready[batch.capacity:]
            self._send_icmp()
            self._encrypt_and_send(batch)
            done += batch.count
        return done

    # ------------------------------------------------------------ inbound

    def handle_datagrams(self, sock: Any, now: float) -> int:
        """Read a batch of ESP from ``sock``, decrypt, check policy, deliver it."""
        batch = self._in
        batch.clear()
        if not sock.read_batch(batch):
            return 0
        self.counters.received += batch.count
        if self.cluster_filter is not None:  # espdp.cluster: this node's segments only
            received = batch.count
            self.cluster_filter.inbound(batch)
            if not batch.count:
                return received
        n, top = batch.count, batch.headroom
        # The outer source (for MAPPING) may be overwritten by decryption in place.
        if (batch.offset[:n] == top).all():
            heads = batch.data[:n, top:top + 48].copy()
        else:
            heads = np.array([np.frombuffer(batch.packet(i)[:48].ljust(48, b"\0"), np.uint8)
                              for i in range(n)])
        table = self.xfrm.sad.table
        table.decrypt(batch, self.worker)
        failed, mapped = batch.received_verdicts(FLAG_MAPPING)
        for verdict in failed:
            self.counters.drop(self.counters.engine_drops, VERDICTS[verdict])
        # (SA, mark, flow) accepted before in this generation: flagged in C; the
        # others are checked against the inbound policies here, and flagged.
        generation = self.xfrm.generation
        unchecked = self._accepted.check(batch, generation)
        if mapped or len(unchecked):
            with self.lock:   # the slow path: the model decides (workers share it)
                for i in mapped:
                    sa = table.get(int(batch.sa[i]))
                    if sa is not None:
                        self.xfrm.report_mapping(sa, *_outer_source(bytes(heads[i])), now)
                for i in unchecked:
                    flow = flow_of_packet(batch.packet(i))
                    sa = table.get(int(batch.sa[i]))
                    if flow is None or sa is None or not self.xfrm.inbound_check(
                            sa, flow, now, mark=int(batch.mark[i])):
                        self.counters.drop(self.counters.policy_drops, "inbound_policy")
                        continue
                    batch.flags[i] |= FLAG_ACCEPTED
                    if self.xfrm.generation == generation:
                        self._accepted.insert(batch, i, generation)
        to_tun, to_kernel = batch.accepted_slots(FLAG_ACCEPTED, self.injector is not None)
        if to_tun:
            self.counters.tun_out += self.tun.write_batch(batch, to_tun)
        if to_kernel:
            self.counters.injected += self.injector.write_batch(batch, to_kernel)
        return batch.count

    # ------------------------------------------------------------ timers

    def tick(self, now: float) -> list:
        events = self.xfrm.tick(now)
        self.flush_queued(now)
        if self.keepalive_interval and now >= self._next_keepalive:
            self._next_keepalive = now + self.keepalive_interval
            self.send_keepalives()
        return events

    def take_used(self, other: Dataplane) -> None:
        """Count the SAs ``other`` (another worker's dataplane) sent with as used
        here, so that this one, which runs the timers, keeps their NAT mappings
        alive; ``other`` forgets those that are gone."""
        for index, sa in list(other._used.items()):
            if sa.dead:
                if other._used.get(index) is sa:
                    other._used.pop(index, None)
                    other._fits.pop(index, None)
            elif self._used.get(index) is not sa:
                self._used[index] = sa

    def send_keepalives(self) -> int:
        """One NAT keepalive to the peer of each UDP-encapsulated SA used for
        output that sent nothing since the previous call."""
        sent = 0
        for index, sa in list(self._used.items()):
            if sa.dead:
                self._used.pop(index, None)
                self._idle.pop(index, None)
                self._fits.pop(index, None)
                continue
            oseq, self._idle[index] = self._idle.get(index), sa.oseq
            info = self.xfrm.sad.state_of(sa).info
            if oseq != sa.oseq or info.encap is None:
                continue
            if self.cluster_filter is not None and not self.cluster_filter.armed(sa):
                continue  # espdp.cluster: the node that owns the peer sends them
            sock = self.sockets.get(info.dst.version)
            if sock is not None:
                sock.send_keepalive((str(info.dst), info.encap.dport))
                sent += 1
        self.counters.keepalives += sent
        return sent

    # ------------------------------------------------------------ loop

    def devices(self) -> list:
        """Every wire device (UDP and raw ESP sockets)."""
        return list(self.sockets.values()) + list(self.esp_sockets.values())

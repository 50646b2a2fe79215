"""Raw IP sockets: ESP without encapsulation (IP protocol 50), and the way
marked decrypted packets enter the kernel's stack.

:class:`RawEspSocket` is the wire device for peers that do not encapsulate.

* IPv4: ``socket(AF_INET, SOCK_RAW, IPPROTO_ESP)`` hands over each ESP
  packet with its IPv4 header (reassembled if it came in fragments), which
  is copied into the slot at the headroom as it is.  Packets go out with
  ``IP_HDRINCL`` to the destination in their header: the engine's outer
  header (TOS/ECN, DF, TTL) is sent as written; the kernel fills in the id
  when it is 0, the total length and the checksum.
* IPv6: a raw IPv6 socket never shows the IPv6 header, so a 40-byte one is
  written in front of the payload from what the kernel reports: the peer's
  address (source), the local address (``IPV6_PKTINFO``, destination), the
  traffic class (``IPV6_RECVTCLASS``), the flow label (``IPV6_FLOWINFO``),
  the hop limit (``IPV6_RECVHOPLIMIT``), next header 50 and the payload
  length.  Sending uses ``IPV6_HDRINCL`` (Linux 4.5; it is accepted on a
  protocol-50 socket and the traffic class, flow label and hop limit the
  engine wrote cross the wire unchanged -- the namespace test checks this
  on the running kernel): the whole packet goes to the destination in its
  header.  Where the kernel refuses the option (:attr:`RawEspSocket.hdrincl`
  False) the ESP part after the 40-byte header is sent with ``sendmsg`` and
  the engine's traffic class and hop limit as ``IPV6_TCLASS``/
  ``IPV6_HOPLIMIT`` ancillary data (the kernel then picks the flow label).
  An outer header with extension headers is counted ``bad_outer``.
* With a header included the kernel does not fragment: a packet larger
  than the route's MTU fails with EMSGSIZE and is counted ``send_errors``
  (the engine sizes packets by the path MTU before encrypting).
* Marks: a slot's non-zero mark is put on the socket (``SO_MARK``, the last
  value cached) before it is sent; with ``SO_RCVMARK`` (Linux 5.19,
  :attr:`RawEspSocket.rcvmark`) the mark of each received packet (set by
  netfilter, say) goes to ``batch.mark`` so inbound SAs with a ``mark``
  match against the outer packet's mark; 0 without it.
  :func:`enable_rcvmark` and :func:`mark_from_ancdata` are the two halves of
  that for any socket.
* The socket sees every ESP packet that reaches the host (a copy: the
  kernel's own XFRM still gets it and drops it when it has no state), but
  not ESP in UDP.  Errors never raise for one packet: a bad slot, a queued
  ICMP error or a send error that concerns one destination is counted.

:class:`KernelInjector` hands decrypted inner packets that carry a mark to
the kernel: ``socket(AF_INET[6], SOCK_RAW, IPPROTO_RAW)`` (the whole packet
is given, header included) with ``SO_MARK`` set to the packet's mark.  The
kernel treats it as a locally generated packet: it routes it with the mark
(``ip rule fwmark``), runs the output and postrouting hooks (nftables
``meta mark``, tc egress), and a packet for one of the host's own addresses
loops back through ``lo`` to the input path (prerouting, input) still
carrying its mark; a packet for another host leaves by the route the mark
selects (a blackhole or unreachable route there fails the send, counted).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable
from typing import Optional

from ..errors import ConfigError
from ._sockopt import (
    SO_MARK,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SocketDevice,
    address_family,
    enable_rcvmark,
    set_buffer,
)

IPPROTO_ESP = 50
IP_HDRINCL = getattr(socket, "IP_HDRINCL", 3)
IPV6_HDRINCL = 36   # Linux 4.5
IPV6_FLOWINFO = 11
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", 51)
IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)
IPV6_RECVTCLASS = getattr(socket, "IPV6_RECVTCLASS", 66)
IPV6_TCLASS = getattr(socket, "IPV6_TCLASS", 67)
# in6_pktinfo (20), hop limit, traffic class, flow info and the mark (4 each)
_ANCBUF = socket.CMSG_SPACE(20) + 4 * socket.CMSG_SPACE(4)
_SEND_ERRORS = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EMSGSIZE,
                errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOBUFS, errno.EADDRNOTAVAIL,
                errno.ENETDOWN, errno.EHOSTDOWN)
# sk_err left by an ICMP error for an earlier send: reported once by the next recv
_RECV_ERRORS = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOPROTOOPT,
                errno.EPROTO, errno.EMSGSIZE, errno.EHOSTDOWN, errno.ENETDOWN)
STAT_KEYS = ("received", "esp", "truncated", "sent", "send_errors", "bad_outer", "dropped",
             "recv_errors")

__all__ = ["KernelInjector", "RawEspSocket", "enable_rcvmark", "mark_from_ancdata"]


def mark_from_ancdata(ancdata) -> int:
    """The mark of a received packet from ``recvmsg`` ancillary data (the
    ``SOL_SOCKET``/``SO_MARK`` u32 that ``SO_RCVMARK`` adds); 0 when absent."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_MARK and len(data) >= 4:
            return struct.unpack("=I", data[:4])[0]
    return 0


def _send(stats: dict, send, *args) -> int:
    """One packet out: 1, or 0 with the reason counted (a full queue, or an error
    that concerns only this packet)."""
    try:
        send(*args)
    except (BlockingIOError, InterruptedError):
        stats["dropped"] += 1
        return 0
    except OSError as e:
        if e.errno not in _SEND_ERRORS:
            raise
        stats["send_errors"] += 1
        return 0
    return 1


def _raw_socket(family: int, proto: int, what: str) -> socket.socket:
    try:
        return socket.socket(family, socket.SOCK_RAW, proto)
    except PermissionError:
        raise ConfigError(f"{what} needs CAP_NET_RAW (run as root)") from None


class _MarkedSender:
    """SO_MARK on a socket, changed only when the next packet's mark differs."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.mark = 0

    def set(self, mark: int) -> None:
        if mark != self.mark:
            self._setsockopt(mark)
            self.mark = mark

    def probe(self) -> None:
        """Fail now, not at the first marked packet, where SO_MARK is not permitted."""
        self._setsockopt(0)

    def _setsockopt(self, mark: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except PermissionError:
            raise ConfigError("SO_MARK needs CAP_NET_ADMIN or CAP_NET_RAW "
                              "(run as root)") from None


class RawEspSocket(SocketDevice):
    """A non-blocking raw socket for IP protocol 50 of one family; see the module docstring.

    ``stats`` counts ``received``, ``esp`` (slots added), ``truncated`` (larger
    than the slot, or shorter than an IP header), ``bad_outer`` (a slot to send
    that is not IP + ESP of this family), ``sent``, ``send_errors``,
    ``dropped`` (EAGAIN on send) and ``recv_errors`` (an ICMP error for an
    earlier send, reported by the kernel on a later receive).
    ``rcvmark`` says whether received packets carry their mark (``SO_RCVMARK``
    asked for and granted); ``rcvmark_supported`` whether the kernel has it
    (None when not asked).  ``hdrincl``: IPv6 sends whole packets
    (``IPV6_HDRINCL``); always True for IPv4.
    """

    def __init__(self, family: int = socket.AF_INET, bind_addr: Optional[str] = None,
                 rcvbuf: int = 4 << 20, sndbuf: int = 4 << 20, rcvmark: bool = True) -> None:
        self.family = address_family(family)
        self.bind_addr = bind_addr
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        sock = _raw_socket(self.family, IPPROTO_ESP, "a raw ESP socket")
        try:
            if self.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_HDRINCL, 1)
                self.hdrincl = True
            else:
                for opt in (IPV6_RECVPKTINFO, IPV6_RECVHOPLIMIT, IPV6_RECVTCLASS, IPV6_FLOWINFO):
                    sock.setsockopt(socket.IPPROTO_IPV6, opt, 1)
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)
                    self.hdrincl = True
                except OSError as e:
                    if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
                        raise
                    self.hdrincl = False
            set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, rcvbuf)
            set_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, sndbuf)
            self.rcvmark_supported: Optional[bool] = enable_rcvmark(sock) if rcvmark else None
            self.rcvmark = bool(self.rcvmark_supported)
            if bind_addr:
                sock.bind((bind_addr, 0))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            where = f" on {bind_addr}" if bind_addr else ""
            raise ConfigError(f"raw ESP socket{where}: {e.strerror}") from None
        self.sock = sock
        self._marks = _MarkedSender(sock)

    def __repr__(self) -> str:
        fam = 4 if self.family == socket.AF_INET else 6
        where = f" {self.bind_addr}" if self.bind_addr else ""
        return f"<RawEspSocket v{fam}{where}>"

    # ------------------------------------------------------------ receive

    def read_batch(self, batch) -> int:
        """Receive until EAGAIN or the batch is full; returns the number of slots added."""
        v6 = self.family == socket.AF_INET6
        if v6 and batch.headroom < 40:
            raise ConfigError(f"batch headroom {batch.headroom} < 40 bytes of IPv6 header")
        added = 0
        start = batch.headroom
        data_at = start + (40 if v6 else 0)
        recv = self.sock.recvmsg_into
        while batch.count < batch.capacity:
            i = batch.count
            slot = memoryview(batch.data[i])
            try:
                n, ancdata, flags, peer = recv([slot[data_at:]], _ANCBUF)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno not in _RECV_ERRORS:
                    raise
                self.stats["recv_errors"] += 1
                continue
            self.stats["received"] += 1
            if flags & socket.MSG_TRUNC:
                self.stats["truncated"] += 1
                continue
            if v6:
                if n > 0xFFFF:
                    self.stats["truncated"] += 1
                    continue
                self._write_ipv6_header(slot, start, n, peer, ancdata)
                n += 40
            elif n < 20 or slot[start] >> 4 != 4 or n < (slot[start] & 0x0F) * 4:
                self.stats["truncated"] += 1
                continue
            batch.offset[i] = start
            batch.length[i] = n
            batch.mark[i] = mark_from_ancdata(ancdata) if self.rcvmark else 0
            batch.sa[i] = -1
            batch.count = i + 1
            self.stats["esp"] += 1
            added += 1
        return added

    @staticmethod
    def _write_ipv6_header(slot: memoryview, start: int, n: int, peer: tuple,
                           ancdata) -> None:
        local, hops, tclass, flow = bytes(16), 64, 0, 0
        for level, kind, data in ancdata:
            if level != socket.IPPROTO_IPV6 or len(data) < 4:
                continue
            if kind == IPV6_PKTINFO and len(data) >= 16:
                local = bytes(data[:16])
            elif kind == IPV6_HOPLIMIT:
                hops = struct.unpack("=i", data[:4])[0]
            elif kind == IPV6_TCLASS:
                tclass = struct.unpack("=i", data[:4])[0]
            elif kind == IPV6_FLOWINFO:
                flow = struct.unpack("!I", data[:4])[0] & 0xFFFFF
        src = socket.inet_pton(socket.AF_INET6, peer[0].split("%", 1)[0])
        struct.pack_into("!IHBB16s16s", slot, start, (6 << 28) | (tclass & 0xFF) << 20 | flow,
                         n, IPPROTO_ESP, hops & 0xFF, src, local)

    # ------------------------------------------------------------ send

    def write_batch(self, batch, indexes: Optional[Iterable[int]] = None) -> int:
        """Send each slot's whole outer IP + ESP packet to the destination in its
        header; returns how many were sent.  A slot's non-zero mark goes on the
        socket (SO_MARK) before it is sent."""
        sent = 0
        v4 = self.family == socket.AF_INET
        for i in range(batch.count) if indexes is None else indexes:
            off, length = int(batch.offset[i]), int(batch.length[i])
            packet = memoryview(batch.data[i])[off:off + length]
            if v4:
                if length < 20 or packet[0] >> 4 != 4 or packet[9] != IPPROTO_ESP \
                        or length < (packet[0] & 0x0F) * 4:
                    self.stats["bad_outer"] += 1
                    continue
                dst = socket.inet_ntop(socket.AF_INET, packet[16:20])
            else:
                if length < 40 or packet[0] >> 4 != 6 or packet[6] != IPPROTO_ESP:
                    self.stats["bad_outer"] += 1
                    continue
                dst = socket.inet_ntop(socket.AF_INET6, packet[24:40])
            self._marks.set(int(batch.mark[i]))
            if self.hdrincl:
                sent += _send(self.stats, self.sock.sendto, packet, (dst, 0))
            else:
                tclass = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
                cmsg = [(socket.IPPROTO_IPV6, IPV6_TCLASS, struct.pack("=i", tclass)),
                        (socket.IPPROTO_IPV6, IPV6_HOPLIMIT, struct.pack("=i", packet[7]))]
                sent += _send(self.stats, self.sock.sendmsg, [packet[40:]], cmsg, 0, (dst, 0))
        self.stats["sent"] += sent
        return sent


class KernelInjector:
    """Marked decrypted packets into the kernel's stack ("marked delivery"); see
    the module docstring.

    ``write_batch(batch, indexes)`` sends each slot's whole inner IPv4/IPv6
    packet (the version nibble picks the socket) to the destination in its
    header with the slot's mark as ``SO_MARK``.  ``stats`` counts ``sent``,
    ``send_errors`` (the route refused it: unreachable, blackhole, too big),
    ``dropped`` (EAGAIN) and ``bad_packet`` (neither a whole IPv4 nor IPv6
    header).  Needs CAP_NET_RAW (and CAP_NET_ADMIN on kernels before 5.17 for
    SO_MARK): without it the constructor raises :class:`ConfigError`.
    """

    def __init__(self) -> None:
        self.stats = {"sent": 0, "send_errors": 0, "dropped": 0, "bad_packet": 0}
        self._socks: dict[int, _MarkedSender] = {}
        try:
            for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
                sock = _raw_socket(family, socket.IPPROTO_RAW,
                                   "handing marked packets to the kernel")
                sender = self._socks[version] = _MarkedSender(sock)
                sock.setblocking(False)
                sender.probe()
        except BaseException:
            self.close()
            raise

    def read_batch(self, batch) -> int:
        """Nothing to read: an ``IPPROTO_RAW`` socket receives nothing."""
        return 0

    def write_batch(self, batch, indexes: Optional[Iterable[int]] = None) -> int:
        """Hand each slot's inner packet to the kernel with its mark; how many were sent."""
        sent = 0
        for i in range(batch.count) if indexes is None else indexes:
            off, length = int(batch.offset[i]), int(batch.length[i])
            packet = memoryview(batch.data[i])[off:off + length]
            version = packet[0] >> 4 if length else 0
            if version == 4 and length >= 20:
                dst = socket.inet_ntop(socket.AF_INET, packet[16:20])
            elif version == 6 and length >= 40:
                dst = socket.inet_ntop(socket.AF_INET6, packet[24:40])
            else:
                self.stats["bad_packet"] += 1
                continue
            sender = self._socks[version]
            sender.set(int(batch.mark[i]))
            sent += _send(self.stats, sender.sock.sendto, packet, (dst, 0))
        self.stats["sent"] += sent
        return sent

    def fileno(self) -> int:
        """The IPv4 socket's descriptor (for writability polling)."""
        return self._socks[4].sock.fileno()

    def close(self) -> None:
        for sender in self._socks.values():
            sender.sock.close()
        self._socks.clear()

    def __enter__(self) -> KernelInjector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<KernelInjector>"

"""Raw IP sockets: ESP without encapsulation (IP protocol 50), and the way
marked decrypted packets enter the kernel's stack.

:class:`RawEspSocket` is the wire device for peers that do not encapsulate.

* IPv4: ``socket(AF_INET, SOCK_RAW, IPPROTO_ESP)`` hands over each ESP
  packet with its IPv4 header, which is copied into the slot as it is.
  Packets go out with ``IP_HDRINCL``: the engine's outer header (TOS/ECN,
  DF, TTL) is sent as written; the kernel fills in the id when it is 0 and
  the checksum.
* IPv6: a raw IPv6 socket never shows the IPv6 header, so one is written in
  front of the payload from what the kernel reports: the peer's address,
  the local address (``IPV6_PKTINFO``), the traffic class
  (``IPV6_RECVTCLASS``) and the hop limit (``IPV6_RECVHOPLIMIT``), next
  header 50.  Sending uses ``sendmsg`` of the ESP part with the engine's
  traffic class and hop limit as ``IPV6_TCLASS``/``IPV6_HOPLIMIT`` ancillary
  data: Linux has ``IPV6_HDRINCL`` only for ``IPPROTO_RAW`` sockets, and the
  kernel must choose the route and fragment by the path MTU anyway.  An
  outer header with extension headers is counted ``bad_outer``.
* Marks: a slot's non-zero mark is put on the socket (``SO_MARK``) before it
  is sent; with ``SO_RCVMARK`` (Linux 5.19) the mark of each received packet
  goes to ``batch.mark`` so inbound SAs with a ``mark`` match it.
* The socket sees every ESP packet that reaches the host (not ESP in UDP).

:class:`KernelInjector` hands decrypted inner packets that carry a mark to
the kernel: ``socket(AF_INET[6], SOCK_RAW, IPPROTO_RAW)`` (the whole packet
is given, header included) with ``SO_MARK`` set to the packet's mark.  The
kernel treats it as a locally generated packet: it routes it with the mark
(``ip rule fwmark``), runs the output and postrouting hooks (nftables
``meta mark``, tc), and a packet for one of the host's own addresses loops
back through ``lo`` to the input path with its mark; a packet for another
host leaves by the route the mark selects.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable
from typing import Optional

from ..errors import ConfigError
from ._sockopt import SO_MARK, SO_RCVBUFFORCE, SocketDevice, enable_rcvmark, set_buffer

IPPROTO_ESP = 50
IP_HDRINCL = getattr(socket, "IP_HDRINCL", 3)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", 51)
IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)
IPV6_RECVTCLASS = getattr(socket, "IPV6_RECVTCLASS", 66)
IPV6_TCLASS = getattr(socket, "IPV6_TCLASS", 67)
_ANCBUF = socket.CMSG_SPACE(20) + 3 * socket.CMSG_SPACE(4)
_SEND_ERRORS = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EMSGSIZE,
                errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOBUFS)
STAT_KEYS = ("received", "esp", "truncated", "sent", "send_errors", "bad_outer", "dropped")


def mark_from_ancdata(ancdata) -> int:
    """The SO_MARK of a received packet (0 when the kernel did not report one)."""
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
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            except PermissionError:
                raise ConfigError("SO_MARK needs CAP_NET_ADMIN (run as root)") from None
            self.mark = mark


class RawEspSocket(SocketDevice):
    """IP protocol 50 for one family; see the module docstring."""

    def __init__(self, family: int = socket.AF_INET, bind_addr: Optional[str] = None,
                 rcvbuf: int = 4 << 20, rcvmark: bool = True) -> None:
        self.family = socket.AF_INET6 if family in (6, socket.AF_INET6) else socket.AF_INET
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        sock = _raw_socket(self.family, IPPROTO_ESP, "raw ESP")
        try:
            if self.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_HDRINCL, 1)
            else:
                for opt in (IPV6_RECVPKTINFO, IPV6_RECVHOPLIMIT, IPV6_RECVTCLASS):
                    sock.setsockopt(socket.IPPROTO_IPV6, opt, 1)
            set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, rcvbuf)
            self.rcvmark = enable_rcvmark(sock) if rcvmark else False
            if bind_addr:
                sock.bind((bind_addr, 0))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise ConfigError(f"raw ESP socket: {e.strerror}") from None
        self.sock = sock
        self._marks = _MarkedSender(sock)

    def __repr__(self) -> str:
        return f"<RawEspSocket v{4 if self.family == socket.AF_INET else 6}>"

    # ------------------------------------------------------------ receive

    def read_batch(self, batch) -> int:
        """Receive until EAGAIN or the batch is full; the number of slots added."""
        added = 0
        v6 = self.family == socket.AF_INET6
        start = batch.headroom
        data_at = start + (40 if v6 else 0)
        while batch.count < batch.capacity:
            i = batch.count
            view = memoryview(batch.data[i])[data_at:]
            try:
                n, ancdata, flags, peer = self.sock.recvmsg_into([view], _ANCBUF)
            except (BlockingIOError, InterruptedError):
                break
            self.stats["received"] += 1
            if flags & socket.MSG_TRUNC:
                self.stats["truncated"] += 1
                continue
            if v6:
                self._write_ipv6_header(memoryview(batch.data[i]), start, n, peer, ancdata)
                n += 40
            elif n < 20:
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
        local, hops, tclass = bytes(16), 64, 0
        for level, kind, data in ancdata:
            if level != socket.IPPROTO_IPV6:
                continue
            if kind == IPV6_PKTINFO and len(data) >= 16:
                local = bytes(data[:16])
            elif kind == IPV6_HOPLIMIT and len(data) >= 4:
                hops = struct.unpack("=i", data[:4])[0]
            elif kind == IPV6_TCLASS and len(data) >= 4:
                tclass = struct.unpack("=i", data[:4])[0]
        src = socket.inet_pton(socket.AF_INET6, peer[0].split("%", 1)[0])
        struct.pack_into("!IHBB16s16s", slot, start, (6 << 28) | (tclass & 0xFF) << 20, n,
                         IPPROTO_ESP, hops & 0xFF, src, local)

    # ------------------------------------------------------------ send

    def write_batch(self, batch, indexes: Optional[Iterable[int]] = None) -> int:
        """Send each slot's whole outer packet; how many were sent."""
        sent = 0
        for i in range(batch.count) if indexes is None else indexes:
            off, length = int(batch.offset[i]), int(batch.length[i])
            packet = memoryview(batch.data[i])[off:off + length]
            if self.family == socket.AF_INET:
                if length < 20 or packet[0] >> 4 != 4 or packet[9] != IPPROTO_ESP:
                    self.stats["bad_outer"] += 1
                    continue
                dst, send = socket.inet_ntop(socket.AF_INET, packet[16:20]), None
            else:
                if length < 40 or packet[0] >> 4 != 6 or packet[6] != IPPROTO_ESP:
                    self.stats["bad_outer"] += 1
                    continue
                dst = socket.inet_ntop(socket.AF_INET6, packet[24:40])
                tclass = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
                send = [(socket.IPPROTO_IPV6, IPV6_TCLASS, struct.pack("=i", tclass)),
                        (socket.IPPROTO_IPV6, IPV6_HOPLIMIT, struct.pack("=i", packet[7]))]
            self._marks.set(int(batch.mark[i]))
            if send is None:
                sent += _send(self.stats, self.sock.sendto, packet, (dst, 0))
            else:
                sent += _send(self.stats, self.sock.sendmsg, [packet[40:]], send, 0, (dst, 0))
        self.stats["sent"] += sent
        return sent


class KernelInjector:
    """Marked decrypted packets into the kernel's stack; see the module docstring."""

    def __init__(self) -> None:
        self.stats = {"sent": 0, "send_errors": 0, "dropped": 0, "bad_packet": 0}
        self._socks: dict[int, _MarkedSender] = {}
        try:
            for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
                sock = _raw_socket(family, socket.IPPROTO_RAW, "handing marked packets "
                                   "to the kernel")
                sock.setblocking(False)
                self._socks[version] = _MarkedSender(sock)
        except BaseException:
            self.close()
            raise

    def write_batch(self, batch, indexes: Optional[Iterable[int]] = None) -> int:
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

    def close(self) -> None:
        for sender in self._socks.values():
            sender.sock.close()
        self._socks.clear()

    def __repr__(self) -> str:
        return "<KernelInjector>"

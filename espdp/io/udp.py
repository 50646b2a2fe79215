"""ESP in UDP (RFC 3948) on a kernel socket, IPv4 or IPv6, port 4500 by default.

:meth:`UdpEncapSocket.read_batch` turns each ESP datagram into a whole outer
IP + UDP packet (a synthetic header with the peer's real address and port
and the local address from ``IP_PKTINFO``/``IPV6_PKTINFO``), which is what
the engine decrypts and what MAPPING detection compares; keepalives are
eaten and non-ESP (IKE) datagrams go to ``on_ike``.
:meth:`UdpEncapSocket.write_batch` sends the UDP payload of the whole packets
the engine wrote to the destination address and port in their outer header.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import Optional

from ..errors import ConfigError
from ._datagram import (
    HEADER_LEN,
    KEEPALIVE,
    NON_ESP_MARKER,
    IkeCallback,
    deliver,
    new_stats,
    pack_addr,
    parse_outer,
)

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_ANCBUF = socket.CMSG_SPACE(20)  # in6_pktinfo (20) >= in_pktinfo (12)


def _family(family: int) -> int:
    if family in (4, socket.AF_INET):
        return socket.AF_INET
    if family in (6, socket.AF_INET6):
        return socket.AF_INET6
    raise ConfigError(f"family {family}: expected 4, 6, AF_INET or AF_INET6")


class UdpEncapSocket:
    """A non-blocking UDP socket for ESP in UDP; see the module docstring.

    ``stats`` counts ``received``, ``esp``, ``keepalive``, ``non_esp``,
    ``ike_unhandled`` (non-ESP with no ``on_ike``), ``truncated``, ``sent``,
    ``send_errors``, ``bad_outer`` (a slot that is not IP + UDP of this
    family) and ``dropped`` (EAGAIN on send).  ``on_ike(message, (host, port))``
    gets the IKE message without the non-ESP marker; :meth:`send_ike` adds it.
    """

    def __init__(self, family: int = socket.AF_INET, port: int = 4500,
                 bind_addr: Optional[str] = None, reuse_port: bool = False,
                 rcvbuf: int = 4 << 20, sndbuf: int = 4 << 20,
                 on_ike: Optional[IkeCallback] = None) -> None:
        self.family = _family(family)
        self.on_ike = on_ike
        self.stats = new_stats()
        self._mark = 0
        wildcard = "0.0.0.0" if self.family == socket.AF_INET else "::"
        host = bind_addr or wildcard
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            if self.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, rcvbuf)
            self._set_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, sndbuf)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ConfigError(f"cannot bind UDP {host} port {port}: {exc.strerror}") from exc
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.bind_addr = bind_addr
        self._local = None if host == wildcard else pack_addr(self.family, host)
        self._hdr = HEADER_LEN[self.family]

    @staticmethod
    def _set_buffer(sock: socket.socket, opt: int, force: int, size: int) -> None:
        if not size:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)  # beyond rmem_max, needs root
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> UdpEncapSocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        fam = 4 if self.family == socket.AF_INET else 6
        return f"<UdpEncapSocket v{fam} port {self.port}>"

    def _local_addr(self, ancdata) -> bytes:
        if self._local is not None:
            return self._local
        for level, kind, data in ancdata:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
                return bytes(data[8:12])  # in_pktinfo.ipi_addr: the header's destination
            if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
                return bytes(data[:16])
        return bytes(4 if self.family == socket.AF_INET else 16)

    def read_batch(self, batch) -> int:
        """Receive until EAGAIN or the batch is full; returns the number of slots added."""
        if batch.headroom < self._hdr:
            raise ConfigError(f"batch headroom {batch.headroom} < {self._hdr} bytes of outer "
                              "IP + UDP header")
        added = 0
        start = batch.headroom + self._hdr
        recv = self.sock.recvmsg_into
        while batch.count < batch.capacity:
            view = memoryview(batch.data[batch.count])[start:]
            try:
                n, ancdata, flags, peer = recv([view], _ANCBUF)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:  # a queued ICMP error from an earlier send
                continue
            if flags & socket.MSG_TRUNC:
                self.stats["received"] += 1
                self.stats["truncated"] += 1
                continue
            if deliver(batch, self.family, n, peer, self._local_addr(ancdata), self.port,
                       self.stats, self.on_ike):
                added += 1
        return added

    def write_batch(self, batch, indexes: Optional[Iterable[int]] = None) -> int:
        """Send the UDP payload of each slot (whole outer IP + UDP + ESP packets) to the
        destination in its outer header; returns how many were sent.  A slot's
        non-zero mark goes on the socket (SO_MARK) before it is sent."""
        sent = 0
        sendto = self.sock.sendto
        for i in range(batch.count) if indexes is None else indexes:
            slot = memoryview(batch.data[i])
            where = parse_outer(slot, int(batch.offset[i]), int(batch.length[i]))
            if where is None or where[0] != self.family:
                self.stats["bad_outer"] += 1
                continue
            _, host, port, begin, end = where
            mark = int(batch.mark[i])
            if mark != self._mark:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
                except PermissionError as exc:
                    raise ConfigError("SO_MARK on the UDP socket needs CAP_NET_ADMIN") from exc
                self._mark = mark
            try:
                sendto(slot[begin:end], (host, port))
            except (BlockingIOError, InterruptedError):
                self.stats["dropped"] += 1
                continue
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH,
                                     errno.EMSGSIZE, errno.EINVAL, errno.EPERM, errno.EACCES):
                    raise
                self.stats["send_errors"] += 1
                continue
            sent += 1
        self.stats["sent"] += sent
        return sent

    def send_keepalive(self, peer: tuple) -> None:
        """Send a NAT keepalive (one 0xFF byte) to ``(host, port)``."""
        self._send(KEEPALIVE, peer)

    def send_ike(self, message: bytes, peer: tuple) -> None:
        """Send an IKE message to ``(host, port)`` behind the non-ESP marker."""
        self._send(NON_ESP_MARKER + message, peer)

    def _send(self, data: bytes, peer: tuple) -> None:
        try:
            self.sock.sendto(data, (peer[0], peer[1]))
        except (BlockingIOError, InterruptedError):
            self.stats["dropped"] += 1


__all__ = ["UdpEncapSocket"]

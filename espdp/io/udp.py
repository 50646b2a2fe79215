"""ESP in UDP (RFC 3948) on a kernel socket, IPv4 or IPv6, port 4500 by default.

:meth:`UdpEncapSocket.read_batch` turns each ESP datagram into a whole outer
IP + UDP packet (a synthetic header with the peer's real address and port
and the local address from ``IP_PKTINFO``/``IPV6_PKTINFO``), which is what
the engine decrypts and what MAPPING detection compares; keepalives are
eaten and non-ESP (IKE) datagrams go to ``on_ike``.
:meth:`UdpEncapSocket.write_batch` sends the UDP payload of the whole packets
the engine wrote to the destination address and port in their outer header.

Both use Linux's batched syscalls through :mod:`espdp._mmsg`: one
``recvmmsg(2)`` fills up to 64 slots straight in the batch (classification
and synthetic header in C), one ``sendmmsg(2)`` sends a run of slots of the
same mark, the GIL released during the syscall.  Where the platform has no
``recvmmsg``/``sendmmsg`` (the extension reports ``HAVE_MMSG`` False, is
missing, or the kernel answers ENOSYS) the socket falls back to one
``recvmsg_into``/``sendto`` per datagram from Python, with the same demux
(:func:`._datagram.deliver`) and counters; :attr:`UdpEncapSocket.io_path`
says which is used (``"mmsg"`` or ``"python"``).

``SO_RCVMARK`` (Linux >= 5.19) is turned on when the kernel has it
(:attr:`UdpEncapSocket.rcvmark`): the mark of each received packet (set by
netfilter, say) lands in ``batch.mark`` so inbound SAs with a mark match
against the outer packet's mark; 0 without it.
"""

from __future__ import annotations

import errno
import socket
import sys
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
from ._sockopt import (
    SO_MARK,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SocketDevice,
    address_family,
    enable_rcvmark,
    set_buffer,
)

try:
    from .. import _mmsg
except ImportError:  # built without the extension: the Python path below
    _mmsg = None

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
# in6_pktinfo (20) >= in_pktinfo (12), and the u32 of SO_MARK
_ANCBUF = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(4)
MMSG = _mmsg is not None and bool(_mmsg.HAVE_MMSG)


class UdpEncapSocket(SocketDevice):
    """A non-blocking UDP socket for ESP in UDP; see the module docstring.

    ``stats`` counts ``received``, ``esp``, ``keepalive``, ``non_esp``,
    ``ike_unhandled`` (non-ESP with no ``on_ike``), ``truncated``, ``sent``,
    ``send_errors``, ``bad_outer`` (a slot that is not IP + UDP of this
    family) and ``dropped`` (EAGAIN on send).  ``on_ike(message, (host, port))``
    gets the IKE message without the non-ESP marker; :meth:`send_ike` adds it.

    ``gso``: equal-sized datagrams to one peer leave as one UDP_SEGMENT message
    (Linux 4.18; turned off by itself where the kernel refuses it).
    ``gro``: UDP_GRO is on (Linux 5.0), so a burst from one peer (or a
    sender's UDP_SEGMENT message, whole) arrives as one message that the
    extension's ``GroReader`` cuts into slots; False where it was not asked
    for or the kernel refused it.
    ``io_path`` is ``"mmsg"`` (batched syscalls) or ``"python"`` (the fallback
    where they are missing); ``rcvmark`` says whether ``SO_RCVMARK`` is on.
    """

    io_path: str = "mmsg" if MMSG else "python"

    def __init__(self, family: int = socket.AF_INET, port: int = 4500,
                 bind_addr: Optional[str] = None, reuse_port: bool = False,
                 rcvbuf: int = 4 << 20, sndbuf: int = 4 << 20,
                 on_ike: Optional[IkeCallback] = None, gso: bool = True,
                 gro: bool = True) -> None:
        self.family = address_family(family)
        self.on_ike = on_ike
        self.stats = new_stats()
        self._mark = 0
        self.gso = gso   # UDP_SEGMENT on send; turned off if the kernel refuses it
        wildcard = "0.0.0.0" if self.family == socket.AF_INET else "::"
        host = bind_addr or wildcard
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            if self.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            self.rcvmark = enable_rcvmark(sock)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, rcvbuf)
            set_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, sndbuf)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ConfigError(f"cannot bind UDP {host} port {port}: {exc.strerror}") from exc
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._gro = None
        if gro and MMSG and hasattr(_mmsg, "GroReader") and _mmsg.enable_gro(sock.fileno()):
            self._gro = _mmsg.GroReader(sock.fileno())
        self.port = sock.getsockname()[1]
        self.bind_addr = bind_addr
        self._local = None if host == wildcard else pack_addr(self.family, host)
        self._hdr = HEADER_LEN[self.family]

    @property
    def gro(self) -> bool:
        return self._gro is not None

    @property
    def pending(self) -> bool:
        """Whether datagrams already received wait for the next batch (poll would
        not wake for them)."""
        return self._gro is not None and self._gro.pending

    def __repr__(self) -> str:
        fam = 4 if self.family == socket.AF_INET else 6
        return f"<UdpEncapSocket v{fam} port {self.port}>"

    def _control(self, ancdata) -> tuple[bytes, int]:
        """The local address (bound, or from pktinfo) and the packet's mark."""
        local, mark = self._local, 0
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_MARK and len(data) >= 4:
                mark = int.from_bytes(data[:4], sys.byteorder)
            elif local is not None:
                continue
            elif level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
                local = bytes(data[8:12])  # in_pktinfo.ipi_addr: the header's destination
            elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
                local = bytes(data[:16])
        if local is None:
            local = bytes(4 if self.family == socket.AF_INET else 16)
        return local, mark

    def read_batch(self, batch) -> int:
        """Receive until EAGAIN or the batch is full; returns the number of slots added."""
        if batch.headroom < self._hdr:
            raise ConfigError(f"batch headroom {batch.headroom} < {self._hdr} bytes of outer "
                              "IP + UDP header")
        if self.io_path == "mmsg":
            want_ike = self.on_ike is not None
            try:
                if self._gro is not None:
                    added, ike = self._gro.read(batch, self.family, self.port, self._local,
                                                self.stats, want_ike)
                else:
                    added, ike = _mmsg.recv_batch(self.sock.fileno(), batch, self.family,
                                                  self.port, self._local, self.stats, want_ike)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                self.io_path = "python"  # seccomp or an old kernel: fall back, loudly named
            else:
                for message, peer in ike:
                    self.on_ike(message, peer)
                return added
        return self._read_batch_py(batch)

    def _read_batch_py(self, batch) -> int:
        """The fallback: one ``recvmsg_into`` per datagram."""
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
            local, mark = self._control(ancdata)
            if deliver(batch, self.family, n, peer, local, self.port, self.stats, self.on_ike,
                       mark):
                added += 1
        return added

    def write_batch(self, batch, indexes: Optional[Iterable[int]] = None) -> int:
        """Send the UDP payload of each slot (whole outer IP + UDP + ESP packets) to the
        destination in its outer header; returns how many were sent.  A slot's
        non-zero mark goes on the socket (SO_MARK) before it is sent."""
        if self.io_path == "mmsg":
            try:
                sent, self._mark, self.gso = _mmsg.send_batch(
                    self.sock.fileno(), batch, indexes, self.family, self.stats, self._mark,
                    self.gso)
            except PermissionError as exc:
                self._mark = self.sock.getsockopt(socket.SOL_SOCKET, SO_MARK)
                raise ConfigError("SO_MARK on the UDP socket needs CAP_NET_ADMIN") from exc
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                self.io_path = "python"
            else:
                return sent
        return self._write_batch_py(batch, indexes)

    def _write_batch_py(self, batch, indexes: Optional[Iterable[int]] = None) -> int:
        """The fallback: one ``sendto`` per packet."""
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

"""Handing IKE to a local IKE daemon: the messages that arrive on the UDP
encapsulation port behind the non-ESP marker (RFC 3948), and the replies.

espdp owns the UDP port (4500) because ESP arrives there; IKE shares it.
:class:`IkeRelay` is the ``on_ike`` callback of the encapsulation sockets:
each IKE message goes, as one datagram, to a configured local endpoint
(``ike_forward = "127.0.0.1:4501"``) in a frame that keeps the peer's real
address and port::

    version 1 (1 byte) | family 4 or 6 (1) | peer port (2, network order) |
    peer address (4 or 16) | the IKE message (without the non-ESP marker)

The IKE daemon answers with the same frame on the same path (to the
relay's socket, which sent the request): the message goes to the peer
address and port of the frame from the UDP port, behind the non-ESP marker.
A frame that does not parse, or for a family with no socket, is counted and
dropped; nothing else is dropped: a message that cannot be handed on
(EAGAIN, an unreachable endpoint) is counted in ``stats``.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, Optional

from .config import host_port
from .errors import ConfigError

VERSION = 1
_HEAD = struct.Struct("!BBH")
_ADDR_LEN = {4: 4, 6: 16}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def frame(message: bytes, peer: tuple) -> bytes:
    """The relay's frame for ``message`` from (or to) ``peer`` = (host, port)."""
    family = 6 if ":" in peer[0] else 4
    return (_HEAD.pack(VERSION, family, peer[1])
            + socket.inet_pton(_AF[family], peer[0].split("%", 1)[0]) + message)


def unframe(data: bytes) -> Optional[tuple[bytes, tuple]]:
    """``(message, (host, port))`` of a frame, or None when it is not one."""
    if len(data) < _HEAD.size:
        return None
    version, family, port = _HEAD.unpack_from(data)
    if version != VERSION or family not in _ADDR_LEN:
        return None
    start = _HEAD.size + _ADDR_LEN[family]
    if len(data) < start:
        return None
    host = socket.inet_ntop(_AF[family], data[_HEAD.size:start])
    return data[start:], (host, port)


class IkeRelay:
    """``on_ike`` for the encapsulation sockets, and the way back; see the module."""

    def __init__(self, endpoint: str) -> None:
        where = host_port(endpoint)
        if where is None:
            raise ConfigError(f"ike_forward {endpoint!r}: expected HOST:PORT")
        family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
        self.endpoint = where
        self.sockets: dict[int, Any] = {}     # outer family -> UdpEncapSocket, set by the owner
        self.stats = {"to_ike": 0, "from_ike": 0, "forward_errors": 0, "bad_frames": 0,
                      "no_socket": 0}
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
            self.sock.connect(where)
        except OSError as e:
            self.sock.close()
            raise ConfigError(f"ike_forward {endpoint}: {e.strerror}") from None
        self.sock.setblocking(False)

    def __call__(self, message: bytes, peer: tuple) -> None:
        try:
            self.sock.send(frame(message, peer))
            self.stats["to_ike"] += 1
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNREFUSED, errno.ENETUNREACH):
                raise
            self.stats["forward_errors"] += 1

    def fileno(self) -> int:
        return self.sock.fileno()

    def handle(self, now: float = 0.0) -> int:
        """Send the IKE daemon's replies to their peers; how many went out."""
        sent = 0
        while True:
            try:
                data = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return sent
            except ConnectionRefusedError:  # an earlier forward found nobody listening
                self.stats["forward_errors"] += 1
                continue
            parsed = unframe(data)
            if parsed is None:
                self.stats["bad_frames"] += 1
                continue
            message, peer = parsed
            sock = self.sockets.get(6 if ":" in peer[0] else 4)
            if sock is None:
                self.stats["no_socket"] += 1
                continue
            sock.send_ike(message, peer)
            self.stats["from_ike"] += 1
            sent += 1

    def close(self) -> None:
        self.sock.close()

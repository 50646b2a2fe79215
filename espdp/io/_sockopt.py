"""Socket options and the device boilerplate the kernel-socket devices share."""

from __future__ import annotations

import errno
import socket

from ..errors import ConfigError

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_RCVMARK = 75   # Linux 5.19
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def address_family(family: int) -> int:
    """AF_INET or AF_INET6 for 4, 6 or either constant; ConfigError otherwise."""
    if family in (4, socket.AF_INET):
        return socket.AF_INET
    if family in (6, socket.AF_INET6):
        return socket.AF_INET6
    raise ConfigError(f"family {family}: expected 4, 6, AF_INET or AF_INET6")


def enable_rcvmark(sock: socket.socket) -> bool:
    """Ask for each received packet's mark (SO_RCVMARK); False when the kernel cannot."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVMARK, 1)
    except OSError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise
        return False
    return True


def set_buffer(sock: socket.socket, opt: int, force: int, size: int) -> None:
    """A socket buffer of ``size`` bytes: beyond rmem_max/wmem_max when root may."""
    if not size:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)


class SocketDevice:
    """``fileno``, ``close`` and the context manager of a device around ``self.sock``."""

    sock: socket.socket

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""TUN devices (``IFF_TUN | IFF_NO_PI``): created by name, or adopted from an
already open fd (Android's VpnService hands one over).

Reads and writes are whole IP packets; :meth:`Tun.read_batch` puts each one
at its slot's headroom so the engine can prepend the outer headers in place.

With ``offload`` (``IFF_VNET_HDR`` and ``TUNSETOFFLOAD``) the kernel hands
over TCP segments of up to 64 KiB, which :mod:`espdp._vnet` cuts into
MTU-sized packets, and decrypted segments of one TCP flow are written back
coalesced: one read and one write per 64 KiB instead of one a packet.  An
fd handed over with ``IFF_VNET_HDR`` already set (seen through TUNGETIFF) is
read and written with the header, whatever was asked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterable
from typing import Optional

from ..errors import ConfigError

try:
    from .. import _mmsg
except ImportError:  # built without the extension: the Python loops below
    _mmsg = None
try:
    from .. import _vnet
except ImportError:
    _vnet = None

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
IFNAMSIZ = 16
_IFREQ = 40  # sizeof(struct ifreq) on 64-bit Linux


def _ifreq(name: str, fmt: str = "", *values) -> bytes:
    req = struct.pack(f"{IFNAMSIZ}s" + fmt, name.encode(), *values)
    return req.ljust(_IFREQ, b"\0")


def _ioctl_if(name: str, request: int, fmt: str = "", *values) -> bytes:
    """An interface ioctl (SIOC*) on a throwaway AF_INET datagram socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return fcntl.ioctl(sock, request, _ifreq(name, fmt, *values))


def get_mtu(name: str) -> int:
    return struct.unpack_from("i", _ioctl_if(name, SIOCGIFMTU), IFNAMSIZ)[0]


def set_mtu(name: str, mtu: int) -> None:
    _ioctl_if(name, SIOCSIFMTU, "i", mtu)


def set_up(name: str) -> None:
    flags = struct.unpack_from("H", _ioctl_if(name, SIOCGIFFLAGS), IFNAMSIZ)[0]
    if not flags & IFF_UP:
        _ioctl_if(name, SIOCSIFFLAGS, "H", flags | IFF_UP)


class Tun:
    """A TUN device queue; use :meth:`create` or :meth:`from_fd`.

    ``stats`` counts ``received``, ``sent``, ``dropped`` (EAGAIN on write),
    ``send_errors`` (the kernel refused a packet, e.g. a malformed one) and
    ``truncated`` (a packet longer than a slot's room).  ``io_path`` is ``"c"``
    (the extension's loops) or ``"python"``.
    """

    io_path: str = "c" if _mmsg is not None and hasattr(_mmsg, "tun_read_batch") else "python"

    def __init__(self, fd: int, name: Optional[str], owns_fd: bool = True,
                 vnet: bool = False) -> None:
        self.fd = fd
        self.name = name
        self._owns = owns_fd
        self.stats = {"received": 0, "sent": 0, "dropped": 0, "send_errors": 0,
                      "truncated": 0}
        self._vnet = None
        if vnet:
            if _vnet is None:
                raise ConfigError(f"tun {name}: the fd has IFF_VNET_HDR set, which needs "
                                  "the extension (espdp._vnet): build it")
            self._vnet = _vnet.VnetTun(fd)
            self.stats.update(gso_in=0, gso_out=0, bad_offload=0)

    @property
    def pending(self) -> bool:
        """Whether part of a large TCP packet waits for the next batch (select()
        does not see it)."""
        return self._vnet is not None and self._vnet.pending

    @property
    def offload(self) -> bool:
        """Whether packets cross this fd with a virtio-net header (TSO in, GRO out)."""
        return self._vnet is not None

    @classmethod
    def create(cls, name: str, mtu: int = 1400, multi_queue: bool = False,
               offload: bool = False) -> Tun:
        """Open (or attach one more queue to) TUN device ``name``, set its MTU, bring it
        up; with ``offload``, with a virtio-net header and TCP segmentation offload
        (ConfigError when the kernel or the extension cannot)."""
        if offload and _vnet is None:
            raise ConfigError(f"tun {name}: offload needs the extension (espdp._vnet)")
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or " " in name:
            raise ConfigError(f"tun {name!r}: not a valid interface name (1..15 bytes)")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise ConfigError(f"tun {name}: {TUN_PATH} is missing (load the tun module, "
                              "or give the container the device)") from exc
        except PermissionError as exc:
            raise ConfigError(f"tun {name}: permission denied opening {TUN_PATH} "
                              "(needs CAP_NET_ADMIN)") from exc
        try:
            flags = (IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
                     | (IFF_VNET_HDR if offload else 0))
            try:
                res = fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, "H", flags))
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.EACCES):
                    raise ConfigError(f"tun {name}: permission denied creating the device "
                                      "(needs CAP_NET_ADMIN)") from exc
                if exc.errno == errno.EINVAL:
                    raise ConfigError(f"tun {name}: the device exists with other flags "
                                      "(multi-queue or tap?)") from exc
                raise ConfigError(f"tun {name}: TUNSETIFF failed: {exc.strerror}") from exc
            real = res[:IFNAMSIZ].split(b"\0", 1)[0].decode()
            if offload:
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                except OSError as exc:
                    raise ConfigError(f"tun {real}: the kernel refused TCP offload "
                                      f"(TUNSETOFFLOAD): {exc.strerror}; set offload = "
                                      "false") from exc
            try:
                set_mtu(real, mtu)
                set_up(real)
            except OSError as exc:
                raise ConfigError(f"tun {real}: cannot set MTU {mtu} and bring it up: "
                                  f"{exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, real, vnet=offload)

    @classmethod
    def from_fd(cls, fd: int, name: Optional[str] = None, owns_fd: bool = True) -> Tun:
        """Adopt an open TUN fd without reconfiguring the device (only the fd is made
        non-blocking).  The name is asked from the kernel (TUNGETIFF) when not given;
        ``close()`` closes the fd unless ``owns_fd`` is false."""
        flags = 0
        try:
            res = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ))
            flags = struct.unpack_from("H", res, IFNAMSIZ)[0]
            if name is None:
                name = res[:IFNAMSIZ].split(b"\0", 1)[0].decode() or None
        except OSError:
            pass  # not asking is fine: e.g. a sandbox forbids the ioctl
        try:
            os.set_blocking(fd, False)
        except OSError as exc:
            raise ConfigError(f"fd {fd}: {exc.strerror} (expected an open TUN device)") from None
        return cls(fd, name, owns_fd, vnet=bool(flags & IFF_VNET_HDR))

    @property
    def mtu(self) -> Optional[int]:
        if self.name is None:
            return None
        try:
            return get_mtu(self.name)
        except OSError:
            return None

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0 and self._owns:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Tun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Tun {self.name} fd {self.fd}>"

    def read_batch(self, batch) -> int:
        """Read packets into slots from ``batch.count`` on, each at the slot's headroom,
        until EAGAIN or the batch is full; returns the number added.  One ``read`` per
        packet (the TUN has no batch call) in C with the GIL released, or from Python
        where the extension lacks it (``io_path``).

        The kernel cuts a TUN packet longer than the buffer without saying so: the
        device's MTU must be below ``slot_size - headroom``.  A read that fills the
        whole room is counted ``truncated`` and dropped.  An error other than EAGAIN
        or EINTR is raised only when nothing was read; packets read are never lost."""
        if self._vnet is not None:
            return self._vnet.read_batch(batch, self.stats)
        if self.io_path == "c":
            return _mmsg.tun_read_batch(self.fd, batch, self.stats)
        added = truncated = 0
        start = batch.headroom
        room = batch.slot_size - start
        fd = self.fd
        try:
            while batch.count < batch.capacity:
                i = batch.count
                try:
                    n = os.readv(fd, [memoryview(batch.data[i])[start:]])
                except InterruptedError:
                    continue
                except BlockingIOError:
                    break
                except OSError:
                    if added:
                        break
                    raise
                if n <= 0:
                    break
                if n >= room:
                    truncated += 1
                    continue
                batch.offset[i] = start
                batch.length[i] = n
                batch.mark[i] = 0
                batch.sa[i] = -1
                batch.count = i + 1
                added += 1
        finally:
            self.stats["received"] += added
            self.stats["truncated"] += truncated
        return added

    def write_batch(self, batch, indexes: Optional[Iterable[int]] = None) -> int:
        """Write each given slot's ``[offset:offset + length]`` (all slots when None);
        returns the number written.  EAGAIN (the kernel's queue is full) counts this
        packet and the rest ``dropped``; a packet the kernel refuses (EINVAL, EIO,
        EFAULT, ENOMEM), or a slot whose offset + length overrun it, counts in
        ``send_errors`` and the rest are written."""
        if self._vnet is not None:
            return self._vnet.write_batch(batch, indexes, self.stats)
        if self.io_path == "c":
            return _mmsg.tun_write_batch(self.fd, batch, indexes, self.stats)
        order = list(range(batch.count) if indexes is None else indexes)
        for i in order:
            if not 0 <= i < batch.count:
                raise IndexError(f"slot {i} of a batch of {batch.count}")
        sent = k = 0
        fd = self.fd
        size = batch.slot_size
        try:
            while k < len(order):
                i = order[k]
                off, length = int(batch.offset[i]), int(batch.length[i])
                if off + length > size:
                    self.stats["send_errors"] += 1
                    k += 1
                    continue
                try:
                    os.write(fd, memoryview(batch.data[i])[off:off + length])
                except InterruptedError:
                    continue
                except BlockingIOError:
                    self.stats["dropped"] += len(order) - k
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EIO, errno.EFAULT, errno.ENOMEM):
                        raise
                    self.stats["send_errors"] += 1
                else:
                    sent += 1
                k += 1
        finally:
            self.stats["sent"] += sent
        return sent

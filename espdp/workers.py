"""The dataplane on several cores: worker threads (``workers = N`` in ``[tunnel]``).

Worker 0 is the thread that runs the :class:`~espdp.tunnel.Tunnel` (with the
control socket and the timers); workers 1..N-1 are threads of their own.
Each has a :class:`~espdp.dataplane.Dataplane` of its own: a queue of the
multi-queue TUN (the kernel spreads flows over the queues by their hash),
UDP sockets bound with ``SO_REUSEPORT`` to the same port (the kernel
spreads peers over them by 4-tuple), batches, flow caches and counters.
They share the engine's SA table (``SATable(workers=N)``: one sequence
number per SA handed out atomically, a replay window under a lock, crypto
contexts per worker) and the XFRM model, which every worker enters only
under one lock, on its slow path (a flow seen for the first time, a MAPPING,
an inbound policy check), as the control plane does for every command and
timer.  The per-packet work runs in C with the GIL released.

Raw ESP sockets receive a copy of every ESP packet each, so only worker 0
reads its raw sockets; the others send through raw sockets of their own
whose receive side drops everything in the kernel (a BPF filter).

A worker that fails (an exception out of its loop) stops the tunnel: the
error is raised by the next :meth:`Tunnel.poll` in the main thread.
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Optional

logger = logging.getLogger("espdp")

MAX_WORKERS = 64
SO_ATTACH_FILTER = 26


def serve(dp: Any, selector: selectors.BaseSelector, timeout: float,
          clock: Callable[[], float]) -> int:
    """One round of a dataplane's devices: what is readable (waiting up to
    ``timeout``), and what a device holds back where select() cannot see it (a
    large TUN packet or a coalesced UDP message cut only partly into the last
    batch).  The number of packets handled."""
    done = 0
    pending = {dev.fileno(): dev for dev in [dp.tun, *dp.devices()]
               if getattr(dev, "pending", False)}
    for key, _ in selector.select(0 if pending else timeout):
        pending.pop(key.fd, None)
        done += key.data(clock()) or 0
    for dev in pending.values():
        done += (dp.handle_tun(clock()) if dev is dp.tun
                 else dp.handle_datagrams(dev, clock())) or 0
    return done


def dataplane_selector(dp: Any, read_raw: bool = True) -> selectors.BaseSelector:
    sel = selectors.DefaultSelector()
    sel.register(dp.tun.fileno(), selectors.EVENT_READ, lambda now: dp.handle_tun(now))
    devices = list(dp.sockets.values()) + (list(dp.esp_sockets.values()) if read_raw else [])
    for dev in devices:
        sel.register(dev.fileno(), selectors.EVENT_READ,
                     lambda now, d=dev: dp.handle_datagrams(d, now))
    return sel


def drop_all_input(sock: socket.socket) -> None:
    """A classic BPF filter that accepts nothing: a send-only raw socket."""
    program = struct.pack("HBBI", 0x06, 0, 0, 0)          # BPF_RET | BPF_K, 0
    fprog = struct.pack("HL", 1, _address_of(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _address_of(data: bytes) -> int:
    import ctypes

    buf = ctypes.create_string_buffer(data, len(data))
    _address_of.keep = buf        # the kernel copies the program during setsockopt
    return ctypes.addressof(buf)


class Worker:
    """Dataplane ``dp`` served by a thread of its own until ``stop`` is set."""

    def __init__(self, dp: Any, clock: Callable[[], float], owned: list) -> None:
        self.dp = dp
        self.clock = clock
        self.owned = owned            # its devices, closed with it
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._selector = dataplane_selector(dp, read_raw=False)
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return
        self._stop.clear()
        self.thread = threading.Thread(target=self._run, name=f"espdp-worker-{self.dp.worker}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                serve(self.dp, self._selector, 0.1, self.clock)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            logger.error("worker %d failed: %s", self.dp.worker, e)
            self.error = e

    def stop(self) -> None:
        self._stop.set()
        t = self.thread
        if t is not None and t.is_alive() and t is not threading.current_thread():
            t.join()

    def close(self) -> None:
        self.stop()
        self._selector.close()
        for dev in reversed(self.owned):
            try:
                dev.close()
            except OSError:
                pass
        self.owned.clear()

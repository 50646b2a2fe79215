"""A tunnel for a program that embeds espdp: the mobile-client case.

:class:`Tunnel` joins a TUN device that someone else opened (Android's
VpnService hands over a file descriptor; a test hands over a
:class:`~espdp.io.memory.MemoryPipe`) to encapsulation sockets through the
engine and an XFRM model.  SAs and policies go in through the Python API
(:attr:`Tunnel.xfrm`, or ``ip xfrm`` lines with :meth:`Tunnel.execute`);
ACQUIRE, EXPIRE, MAPPING and the other events reach callbacks given to
:meth:`Tunnel.subscribe`.

It starts no thread unless asked: the host program either calls
:meth:`Tunnel.poll` from its own loop (``fileno()`` of each device in
:meth:`Tunnel.filenos` tells when), or :meth:`Tunnel.run` blocks until
:meth:`Tunnel.stop`, or :meth:`Tunnel.start` runs that in one thread.
:meth:`Tunnel.close` stops it and closes what it opened (never the TUN fd
it was given, unless told to own it).

>>> from espdp.io.memory import MemoryPipe
>>> app_side, tun = MemoryPipe.pair()
>>> with Tunnel(tun, udp_port=0, bind={4: "127.0.0.1"}) as t:
...     _ = t.execute("ip xfrm policy add src 10.0.0.0/8 dst 10.0.0.0/8 dir out action block")
...     t.poll()
0
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Optional

from .dataplane import Dataplane
from .errors import ConfigError, FatalError
from .io.tun import Tun
from .io.udp import UdpEncapSocket
from .workers import MAX_WORKERS, Worker, dataplane_selector, drop_all_input, serve
from .xfrm import Xfrm

FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


class Tunnel:
    """A TUN, the sockets to the peers and an XFRM model; see the module docstring.

    ``tun``: an io device (``Tun``, ``MemoryPipe``...).  ``udp_port``: the
    port of the UDP encapsulation sockets (0: any free port), one per family
    in ``families``, bound to ``bind[family]`` when given.  ``raw_esp``: also
    open raw ESP sockets (root).  ``injector``: where marked decrypted
    packets go (see :class:`~espdp.dataplane.Dataplane`).  ``sockets``
    replaces the UDP sockets (in-memory ones in tests).  ``on_ike(message,
    peer)`` receives IKE messages that arrive on the UDP port.

    ``workers`` > 1 runs the dataplane on that many threads (see
    :mod:`espdp.workers`): ``tun_queue()`` opens one more queue of the
    (multi-queue) TUN for each extra worker, ``injector_factory()`` one more
    injector.  Everything that touches the XFRM model then holds ``lock``.
    """

    def __init__(self, tun: Any, *, xfrm: Optional[Xfrm] = None, udp_port: int = 4500,
                 families: Iterable[int] = (4, 6), bind: Optional[dict] = None,
                 raw_esp: bool = False, injector: Any = None,
                 sockets: Optional[dict] = None, path_mtu: int = 1500,
                 keepalive_interval: float = 20.0,
                 on_ike: Optional[Callable[[bytes, tuple], Any]] = None,
                 clock: Callable[[], float] = time.monotonic,
                 tick_interval: float = 0.25, workers: int = 1,
                 tun_queue: Optional[Callable[[], Any]] = None,
                 injector_factory: Optional[Callable[[], Any]] = None) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ConfigError(f"workers: {workers} (1..{MAX_WORKERS})")
        if workers > 1 and (tun_queue is None or sockets is not None):
            raise ConfigError("several workers need a multi-queue TUN (tun_queue) and "
                              "sockets of their own")
        self.xfrm = xfrm if xfrm is not None else Xfrm()
        self.clock = clock
        self.tick_interval = tick_interval
        self._owned: list = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._extra: dict = {}
        self._after: list = []
        self.workers: list[Worker] = []
        self.lock: Any = threading.RLock() if workers > 1 else contextlib.nullcontext()
        self._selector: Optional[selectors.BaseSelector] = None
        try:
            own = sockets is None
            sockets, esp_sockets = self._devices(sockets, families, udp_port, bind, raw_esp,
                                                 on_ike, reuse=workers > 1, owned=self._owned)
            self.dataplane = Dataplane(self.xfrm, tun, sockets, esp_sockets, injector,
                                       path_mtu=path_mtu, keepalive_interval=keepalive_interval,
                                       lock=self.lock if workers > 1 else None)
            if workers > 1:
                self.xfrm.sad.table.set_workers(workers)
                ports = {fam: s.port for fam, s in sockets.items()} if own else {}
                for k in range(1, workers):
                    owned: list = []
                    try:
                        queue = tun_queue()
                        owned.append(queue)
                        w_sockets, w_esp = self._devices(
                            None, families, 0, bind, raw_esp, on_ike, reuse=True, owned=owned,
                            ports=ports, read_raw=False)
                        w_injector = injector_factory() if injector_factory else None
                        if w_injector is not None:
                            owned.append(w_injector)
                        dp = Dataplane(self.xfrm, queue, w_sockets, w_esp, w_injector,
                                       path_mtu=path_mtu, worker=k, lock=self.lock)
                    except BaseException:
                        for dev in owned:
                            dev.close()
                        raise
                    self.workers.append(Worker(dp, clock, owned))
        except BaseException:
            self.close()
            raise
        self._next_tick = clock()

    @staticmethod
    def _devices(sockets: Optional[dict], families: Iterable[int], udp_port: int,
                 bind: Optional[dict], raw_esp: bool, on_ike: Any, reuse: bool, owned: list,
                 ports: Optional[dict] = None, read_raw: bool = True) -> tuple[dict, dict]:
        """The UDP (unless given) and raw ESP sockets of one worker, appended to ``owned``."""
        if sockets is None:
            sockets = {}
            for fam in families:
                port = (ports or {}).get(fam, udp_port)
                sock = UdpEncapSocket(FAMILIES[fam], port, (bind or {}).get(fam),
                                      reuse_port=reuse, on_ike=on_ike)
                owned.append(sock)
                sockets[fam] = sock
        esp_sockets = {}
        if raw_esp:
            from .io.raw import RawEspSocket

            for fam in families:
                sock = RawEspSocket(FAMILIES[fam], (bind or {}).get(fam))
                owned.append(sock)
                if not read_raw:
                    drop_all_input(sock.sock)
                esp_sockets[fam] = sock
        return sockets, esp_sockets

    @classmethod
    def from_fd(cls, fd: int, *, owns_fd: bool = False, **kw: Any) -> Tunnel:
        """A tunnel on a TUN fd opened by someone else (closed by us only if ``owns_fd``)."""
        tun = Tun.from_fd(fd, owns_fd=owns_fd)
        try:
            self = cls(tun, **kw)
        except BaseException:
            tun.close()
            raise
        self._owned.append(tun)
        return self

    def _own(self, device: Any) -> Any:
        self._owned.append(device)
        return device

    # ------------------------------------------------------------ control

    def execute(self, line: str) -> dict:
        """One ``ip xfrm state|policy ...`` line (see :meth:`Xfrm.execute`)."""
        with self.lock:
            return self.xfrm.execute(line, self.clock())

    def subscribe(self, callback: Callable[[Any], Any], groups: Any = None) -> int:
        """``callback(event)`` for each event of ``groups`` (acquire, expire,
        mapping, SA, policy, aevent...; all when None), called from the
        thread that runs the tunnel."""
        return self.xfrm.subscribe(callback, groups)

    def watch(self, fileobj: Any, callback: Callable[[float], Any]) -> None:
        """Call ``callback(now)`` when ``fileobj`` is readable (the control socket)."""
        self._extra[fileobj] = callback
        if self._selector is not None:
            self._selector.register(fileobj, selectors.EVENT_READ, self._locked(callback))

    def after_poll(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` at the end of each :meth:`poll` (to flush events)."""
        self._after.append(callback)

    @property
    def counters(self):
        return self.dataplane.counters

    # ------------------------------------------------------------ running

    def filenos(self) -> list[int]:
        """The descriptors to watch for reading when driving :meth:`poll` yourself."""
        dp = self.dataplane
        return [dp.tun.fileno()] + [d.fileno() for d in dp.devices()]

    def _selector_for(self) -> selectors.BaseSelector:
        if self._selector is None:
            sel = dataplane_selector(self.dataplane)
            for fileobj, callback in self._extra.items():
                sel.register(fileobj, selectors.EVENT_READ, self._locked(callback))
            self._selector = sel
        return self._selector

    def _locked(self, callback: Callable[[float], Any]) -> Callable[[float], Any]:
        """``callback`` holding the model's lock (a control socket, an IKE relay)."""
        def call(now: float) -> Any:
            with self.lock:
                callback(now)
            return 0
        return call

    def poll(self, timeout: float = 0.0) -> int:
        """Serve what is readable (waiting up to ``timeout`` seconds) and run the
        timers when due; the number of packets handled.  Raises
        :class:`~espdp.errors.FatalError` when the TUN device went away."""
        for w in self.workers:
            if isinstance(w.error, FatalError):
                raise w.error
            if w.error is not None:
                raise FatalError(f"dataplane worker {w.dp.worker} failed: {w.error}")
            w.start()
        done = serve(self.dataplane, self._selector_for(), timeout, self.clock)
        now = self.clock()
        with self.lock:
            if now >= self._next_tick:
                for w in self.workers:
                    self.dataplane.take_used(w.dp)
                self.dataplane.tick(now)
                self._next_tick = now + self.tick_interval
            for callback in self._after:
                callback()
        return done

    def counter_totals(self) -> dict:
        """The loop's counters summed over the workers."""
        total: dict = {}
        for dp in self.dataplanes():
            for key, value in dp.counters.as_dict().items():
                if isinstance(value, dict):
                    into = total.setdefault(key, {})
                    for reason, n in value.items():
                        into[reason] = into.get(reason, 0) + n
                else:
                    total[key] = total.get(key, 0) + value
        return total

    def dataplanes(self) -> list:
        """Worker 0's dataplane and the others'."""
        return [self.dataplane] + [w.dp for w in self.workers]

    def run(self) -> None:
        """Serve in this thread until :meth:`stop` (from a callback, a signal
        handler or another thread)."""
        while not self._stop.is_set():
            self.poll(self.tick_interval)
        self._stop.clear()

    def start(self) -> threading.Thread:
        """Run in a thread of its own (the only thread a Tunnel ever starts).
        Once started, use the XFRM model only from callbacks or after :meth:`stop`."""
        if self._thread is not None and self._thread.is_alive():
            raise ConfigError("the tunnel is already running")
        self._thread = threading.Thread(target=self.run, name="espdp-tunnel", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Stop serving (the workers too; the next poll starts them again)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None
        for w in self.workers:
            w.stop()

    def close(self) -> None:
        """Stop, and close the sockets (and a TUN) this tunnel opened."""
        self.stop()
        for w in self.workers:
            w.close()
        self.workers.clear()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for device in reversed(self._owned):
            device.close()
        self._owned.clear()

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

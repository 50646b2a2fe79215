"""The tunnel process: ``espdp run``.

:class:`Daemon` turns a :class:`~espdp.config.Config` into a running tunnel,
in an order that never leaves it half-configured:

1. every SA and policy is applied to a fresh XFRM model (a bad one stops
   the start before anything touches the system), and each SA's outbound
   sequence number continues past what an earlier run may have used
   (:mod:`espdp.seqguard`);
2. what a crashed earlier run left behind is removed (its state file);
3. the TUN device is created (or the given fd adopted), its MTU set to what
   fits the path after encapsulation unless configured, and brought up;
4. the sockets (UDP encapsulation for IPv4 and IPv6, raw ESP if asked, the
   raw socket that hands marked packets to the kernel) are opened;
5. addresses and routes are installed (recorded as they go, see
   :mod:`espdp.netsetup`);
6. the control socket and the metrics endpoint start listening.

A failure at any step undoes the steps before it.  SIGTERM and SIGINT stop
the loop; :meth:`Daemon.close` then removes routes, addresses, the TUN and
the control socket.  So does a :class:`~espdp.errors.FatalError` from the
loop (the TUN device removed under the daemon), after which ``espdp run``
exits 1 with the reason.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from typing import Any, Optional

from . import pmtu
from .config import Config
from .control import ControlServer
from .errors import ConfigError, FatalError, XfrmError
from .io.tun import Tun
from .seqguard import SequenceGuard
from .tunnel import Tunnel
from .xfrm import Xfrm

logger = logging.getLogger("espdp")
GUARD_INTERVAL = 0.1   # seconds between sequence reservation checks (see seqguard)


def runtime_dir() -> str:
    """Where sockets and state files go: /run/espdp for root, else a private dir."""
    if os.geteuid() == 0:
        return "/run/espdp"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/espdp-{os.getuid()}"
    return os.path.join(base, "espdp")


def default_control_path(name: str) -> str:
    return os.path.join(runtime_dir(), f"{name}.sock")


def _peers(xfrm: Xfrm) -> set:
    """The outer addresses of the tunnel endpoints the SAs and policies name.

    Transport-mode SAs are left out: their addresses are those of the traffic
    itself, which the routes send into the TUN; pinning them past the tunnel
    would take that traffic out of it.  Their ESP leaves by the SA's
    output-mark and an ``ip rule fwmark`` of the operator's (see the README)."""
    peers = set()
    for st in xfrm.sad.dump():
        if st.info.mode != "transport":
            peers.update((st.info.src, st.info.dst))
    for policy in xfrm.spd.dump():
        for t in policy.templates:
            if t.mode != "transport":
                peers.update(a for a in (t.src, t.dst)
                             if a is not None and not a.is_unspecified)
    return peers


class Daemon:
    """One tunnel: TUN, sockets, XFRM model, control socket and metrics."""

    def __init__(self, cfg: Config, clock=time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.started = clock()
        self.xfrm = Xfrm()
        self.tunnel: Optional[Tunnel] = None
        self.tun: Any = None
        self.net: Any = None
        self.control: Optional[ControlServer] = None
        self.metrics: Any = None
        self._cleanup: list = []
        self.guard: Optional[SequenceGuard] = None
        self._next_guard = 0.0
        self.cluster: Any = None   # espdp.cluster.node.Cluster on a cluster node

    @property
    def name(self) -> str:
        return self.cfg.tunnel.tun or (self.tun.name if self.tun is not None else "tun")

    # ------------------------------------------------------------ start and stop

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        t = self.cfg.tunnel
        now = self.clock()
        for i, command in enumerate(self.cfg.commands):
            try:
                self.xfrm.apply(command, now)
            except XfrmError as e:
                raise ConfigError(f"SA/policy {i + 1}: {e.args[0]} ({e.errno})") from None
        from .netsetup import NetSetup, cleanup_stale

        state_dir = t.state_dir or runtime_dir()
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            why = "not a directory" if isinstance(e, FileExistsError) else e.strerror
            raise ConfigError(f"state_dir {state_dir}: {why}") from None
        self.guard = SequenceGuard(os.path.join(state_dir, f"{self.name}.seq.json"))
        self._cleanup.append(self.guard.close)
        self.guard.attach(self.xfrm)   # before any packet: no sequence number used twice
        if self.cfg.cluster is not None:   # espdp.cluster: read its secret before anything
            if t.workers > 1:
                # the segment filter and its sequence budget are per dataplane today
                raise ConfigError("[cluster] with workers > 1 is not supported yet: "
                                  "set workers = 1 on cluster nodes")
            from .cluster.node import Cluster

            self.cluster = Cluster(self.cfg.cluster, self.xfrm, self.clock)
            self._cleanup.append(self.cluster.close)
        if t.tun is not None:
            removed = cleanup_stale(t.tun, state_dir)
            if any(removed.values()):
                logger.info("removed what a previous run left on %s: %s", t.tun, removed)
        mtu = t.mtu or self._fitting_mtu()
        if t.fd is not None:
            self.tun = Tun.from_fd(t.fd, t.tun)
        else:
            self.tun = Tun.create(t.tun, mtu, multi_queue=t.workers > 1, offload=t.offload)
        self._cleanup.append(self.tun.close)
        injector = None
        if t.inject_marks:
            from .io.raw import KernelInjector

            injector = KernelInjector()
            self._cleanup.append(injector.close)
        relay = None
        if t.ike_forward:
            from .ike import IkeRelay

            relay = IkeRelay(t.ike_forward)
            self._cleanup.append(relay.close)
        extra: dict = {}
        if t.workers > 1:
            if t.fd is not None:
                raise ConfigError("workers > 1 needs a TUN espdp creates ('tun'), not an fd")
            from .io.raw import KernelInjector

            extra = dict(workers=t.workers,
                         tun_queue=lambda: Tun.create(t.tun, mtu, multi_queue=True,
                                                      offload=t.offload),
                         injector_factory=KernelInjector if t.inject_marks else None)
        self.tunnel = Tunnel(self.tun, xfrm=self.xfrm, udp_port=t.udp_port, raw_esp=t.raw_esp,
                             injector=injector, path_mtu=t.path_mtu,
                             keepalive_interval=t.nat_keepalive, clock=self.clock,
                             on_ike=relay, **extra)
        self._cleanup.append(self.tunnel.close)
        if relay is not None:
            relay.sockets = self.tunnel.dataplane.sockets
            self.tunnel.watch(relay, relay.handle)
        if self.tun.name is not None and (t.address or t.route):
            self.net = NetSetup(self.tun.name, state_dir=state_dir, address_mode=t.address_mode)
            self._cleanup += [self.net.close, self.net.teardown]
            for address in t.address:
                self.net.add_address(str(address))
            for peer in sorted(_peers(self.xfrm), key=str):
                self.net.exclude_peer(str(peer))  # before the routes that may cover it
            for route in t.route:
                self.net.add_route(str(route.network))
        control_xfrm, handlers = self.xfrm, {"status": self.status}
        if self.cluster is not None:  # espdp.cluster: segment filter, etcd agent, `cluster` op
            self.cluster.attach(self.tunnel)
            control_xfrm = self.cluster.replicating(self.xfrm)
            handlers["cluster"] = self.cluster.status
        self.control = ControlServer(t.control or default_control_path(self.name), control_xfrm,
                                     handlers)
        self._cleanup.append(self.control.close)
        self.tunnel.watch(self.control, self.control.poll)
        self.tunnel.after_poll(self._check_guard)
        self.tunnel.after_poll(self.control.flush)  # events for `espdp xfrm monitor`
        if t.metrics:
            from .metrics import MetricsServer

            self.metrics = MetricsServer(t.metrics, self)
            self._cleanup.append(self.metrics.close)
        # The SAs and policies loaded so far live as long as the daemon: keep them out
        # of the cyclic GC's sweeps (100,000 SAs are millions of objects to traverse).
        gc.freeze()
        logger.info("running: tun %s mtu %s, UDP port %d, control %s", self.name,
                    self.tun.mtu, self.tunnel.dataplane.sockets[4].port
                    if 4 in self.tunnel.dataplane.sockets else t.udp_port, self.control.path)

    def _check_guard(self) -> None:
        now = self.clock()
        if now >= self._next_guard:
            self._next_guard = now + GUARD_INTERVAL
            self.guard.check()

    def _fitting_mtu(self) -> int:
        """The TUN MTU that fits every outbound SA configured (a GCM one over IPv6
        with UDP encapsulation when there is none yet)."""
        outbound = [st.info for st in self.xfrm.sad.dump() if st.engine is not None]
        mtu = pmtu.default_tun_mtu(self.cfg.tunnel.path_mtu, outbound or [pmtu.TYPICAL_SA])
        if mtu < 1280 and any(a.version == 6 for a in self.cfg.tunnel.address):
            logger.warning("the path MTU leaves %d bytes inside the tunnel, "
                           "below the 1280 IPv6 needs", mtu)
        return max(mtu, 576)

    def serve(self) -> None:
        """Run until SIGTERM or SIGINT."""
        assert self.tunnel is not None
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: self.tunnel.stop())
        try:
            self.tunnel.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def close(self) -> None:
        """Undo everything, newest first; never raises for what is already gone."""
        while self._cleanup:
            undo = self._cleanup.pop()
            try:
                undo()
            except Exception as e:  # noqa: BLE001 - the rest must still be undone
                logger.warning("cleanup: %s", e)

    # ------------------------------------------------------------ status

    def status(self, request: Any = None, now: Optional[float] = None) -> dict:
        """What ``espdp status`` shows: the tunnel, its counters and every SA."""
        now = self.clock() if now is None else now
        dp = self.tunnel.dataplane if self.tunnel else None
        sas = []
        for st in self.xfrm.sad.dump():
            info = st.info
            entry = {"src": str(info.src), "dst": str(info.dst), "spi": f"0x{info.spi:08x}",
                     "reqid": info.reqid, "mode": info.mode, "state": st.status,
                     "encap": None if info.encap is None else
                     f"udp {info.encap.sport}->{info.encap.dport}",
                     "algorithms": [a.name for a in (info.aead, info.enc, info.auth)
                                    if a is not None],
                     "age": round(now - st.add_time, 1), "packets": 0, "bytes": 0, "drops": {}}
            if st.engine is not None:
                stats = st.engine.stats()
                entry.update(packets=stats["packets"], bytes=stats["bytes"],
                             drops=stats["drops"], oseq=st.engine.oseq,
                             replay_top=st.engine.replay_top)
            sas.append(entry)
        out = {"tun": self.name, "uptime": round(now - self.started, 1), "sas": sas,
               "policies": len(self.xfrm.spd), "no_sa_drops": self.xfrm.sad.table.stats()}
        if dp is not None:
            out["counters"] = self.tunnel.counter_totals()
            out["devices"] = {}
            for k, wdp in enumerate(self.tunnel.dataplanes()):
                tag = f"worker {k} " if k else ""
                for d in wdp.devices():
                    out["devices"][tag + repr(d)] = dict(d.stats)
                if wdp.injector is not None:
                    out["devices"][tag + "injector"] = dict(wdp.injector.stats)
            if len(self.tunnel.dataplanes()) > 1:
                out["workers"] = [{k: getattr(wdp.counters, k)
                                   for k in ("tun_in", "tun_out", "sent", "received")}
                                  for wdp in self.tunnel.dataplanes()]
        if self.control is not None:
            out["control_refused"] = self.control.refused
        if self.cluster is not None:
            out["cluster"] = self.cluster.summary(now)
        return out


def run(cfg: Config) -> int:
    """``espdp run``: start, serve until a signal, clean up.  0 after a signal; 1
    when the tunnel could not go on (:class:`FatalError`, e.g. its TUN device
    was removed: without it nothing can be carried, so the daemon says why,
    removes what it made and leaves restarting to its supervisor)."""
    daemon = Daemon(cfg)
    daemon.start()
    code = 0
    try:
        daemon.serve()
    except FatalError as e:
        logger.error("%s: stopping", e)
        code = 1
    finally:
        daemon.close()
        logger.info("stopped; routes, addresses and devices removed")
    return code

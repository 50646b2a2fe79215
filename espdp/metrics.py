"""Prometheus metrics for a running tunnel (``--metrics HOST:PORT``).

The engine is not thread-safe and its counters must not be read while a
batch runs, so the HTTP server's thread never touches it: the daemon's own
loop takes a snapshot of every counter in bulk (one ``stats()`` call per
SA, at most once per ``interval`` seconds, see :meth:`MetricsServer.refresh`)
and :class:`TunnelCollector` turns the latest snapshot into metric families
when Prometheus scrapes.  Nothing is counted per packet on the metrics side.

Exposed (all prefixed ``espdp_``): per SA ``sa_packets_total``,
``sa_bytes_total`` and ``sa_drops_total{reason}`` (replay, replay_window,
integrity, ...), labelled by spi, src, dst and reqid; in total ``packets_total{path}`` (tun_in,
tun_out, sent, received, injected), ``policy_drops_total{reason}`` (block,
no_policy, acquire, inbound_policy...), ``no_sa_drops_total{reason}``,
``events_total{type}``; and the daemon's health: ``up``,
``uptime_seconds``, ``sas``, ``policies``, ``snapshot_age_seconds`` and
``control_refused_total``.  On a cluster node also ``cluster_forwarding{reason}``,
``cluster_segments_owned``, ``cluster_members``, ``cluster_armed_sas``,
``cluster_checkpoint_age_seconds``, ``cluster_checkpoint_writes_total``,
``cluster_checkpoint_records_total``, ``cluster_takeovers_total`` and
``cluster_drops_total{reason}``.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Optional

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily

from .config import host_port
from .errors import ConfigError


class TunnelCollector:
    """A custom collector over the latest snapshot (a dict of plain numbers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: Optional[dict] = None
        self._taken = 0.0
        self.clock: Any = None

    def publish(self, snapshot: dict, now: float) -> None:
        with self._lock:
            self._snapshot, self._taken = snapshot, now

    def collect(self):
        with self._lock:
            snap, taken = self._snapshot, self._taken
        up = GaugeMetricFamily("espdp_up", "1 while the tunnel runs")
        up.add_metric([], 1 if snap is not None else 0)
        yield up
        if snap is None:
            return
        labels = ["spi", "src", "dst", "reqid"]
        packets = CounterMetricFamily("espdp_sa_packets", "packets processed by the SA",
                                      labels=labels)
        nbytes = CounterMetricFamily("espdp_sa_bytes", "bytes processed by the SA", labels=labels)
        drops = CounterMetricFamily("espdp_sa_drops", "packets the SA dropped, by reason",
                                    labels=labels + ["reason"])
        for sa in snap["sas"]:
            key = [sa["spi"], sa["src"], sa["dst"], str(sa["reqid"])]
            packets.add_metric(key, sa["packets"])
            nbytes.add_metric(key, sa["bytes"])
            for reason, n in sa["drops"].items():
                drops.add_metric(key + [reason], n)
        yield from (packets, nbytes, drops)
        counters = snap.get("counters", {})
        paths = CounterMetricFamily("espdp_packets", "packets through the tunnel by path",
                                    labels=["path"])
        for path in ("tun_in", "tun_out", "sent", "received", "injected", "too_big",
                     "keepalives"):
            paths.add_metric([path], counters.get(path, 0))
        yield paths
        for name, table, help_text in (
                ("policy_drops", counters.get("policy_drops", {}), "drops by policy decision"),
                ("engine_drops", counters.get("engine_drops", {}), "drops by engine verdict"),
                ("no_sa_drops", snap.get("no_sa_drops", {}), "drops before an SA was found")):
            family = CounterMetricFamily(f"espdp_{name}", help_text, labels=["reason"])
            for reason, n in table.items():
                family.add_metric([reason], n)
            yield family
        events = CounterMetricFamily("espdp_events", "XFRM events by type", labels=["type"])
        for kind, n in snap.get("events", {}).items():
            events.add_metric([kind], n)
        yield events
        for name, value, help_text in (
                ("uptime_seconds", snap["uptime"], "seconds since the start"),
                ("sas", len(snap["sas"]), "SAs in the SAD (all states)"),
                ("policies", snap["policies"], "policies in the SPD"),
                ("snapshot_age_seconds", max(0.0, self.clock() - taken) if self.clock else 0.0,
                 "age of these figures"),
        ):
            gauge = GaugeMetricFamily(f"espdp_{name}", help_text)
            gauge.add_metric([], value)
            yield gauge
        refused = CounterMetricFamily("espdp_control_refused",
                                      "control connections refused (wrong uid)")
        refused.add_metric([], snap.get("control_refused", 0))
        yield refused
        if snap.get("cluster"):
            yield from _cluster_metrics(snap["cluster"])


def _cluster_metrics(c: dict):
    """espdp.cluster: whether this node forwards (and why not), its segments,
    checkpoints and the takeovers seen in the cluster."""
    forwarding = GaugeMetricFamily("espdp_cluster_forwarding",
                                   "1 while this node forwards its segments; 0 when "
                                   "stopped (reason label: why)", labels=["reason"])
    forwarding.add_metric([c["reason"] or ""], 1 if c["forwarding"] else 0)
    yield forwarding
    for name, value, help_text in (
            ("segments_owned", len(c["owned"]), "segments this node forwards"),
            ("members", c["members"], "nodes with a live lease"),
            ("armed_sas", c["armed"], "SAs whose sequence numbers this node may use"),
            ("checkpoint_age_seconds", c["checkpoint_age"] if c["checkpoint_age"] is not None
             else float("nan"), "since the last checkpoint etcd acknowledged")):
        gauge = GaugeMetricFamily(f"espdp_cluster_{name}", help_text)
        gauge.add_metric([], value)
        yield gauge
    for name, value, help_text in (
            ("checkpoint_writes", c["checkpoint_writes"], "checkpoint transactions written"),
            ("checkpoint_records", c["checkpoint_records"], "SA checkpoints written"),
            ("takeovers", c["takeovers"], "segments taken over after a lease ended")):
        counter = CounterMetricFamily(f"espdp_cluster_{name}", help_text)
        counter.add_metric([], value)
        yield counter
    drops = CounterMetricFamily("espdp_cluster_drops", "packets not processed here, by "
                                "reason", labels=["reason"])
    for reason, n in c["drops"].items():
        drops.add_metric([reason], n)
    yield drops


class MetricsServer:
    """Serves ``/metrics`` on ``HOST:PORT``; the daemon calls :meth:`refresh`."""

    def __init__(self, where: str, daemon: Any, interval: float = 1.0) -> None:
        address = host_port(where)
        if address is None:
            raise ConfigError(f"--metrics {where!r}: expected HOST:PORT")
        self.daemon = daemon
        self.interval = interval
        self.events: Counter = Counter()
        self.collector = TunnelCollector()
        self.collector.clock = daemon.clock
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        try:
            self._server, self._thread = start_http_server(address[1], address[0], registry)
        except OSError as e:
            raise ConfigError(f"metrics: cannot listen on {where}: {e.strerror}") from None
        self.port = self._server.server_address[1]
        self._next = 0.0
        daemon.xfrm.subscribe(lambda event: self.events.update([event.type]))
        daemon.tunnel.after_poll(self.refresh)

    def refresh(self, now: Optional[float] = None) -> None:
        """Take a snapshot if the last one is older than ``interval`` (daemon thread)."""
        now = self.daemon.clock() if now is None else now
        if now < self._next:
            return
        self._next = now + self.interval
        snap = self.daemon.status(now=now)
        snap["events"] = dict(self.events)
        self.collector.publish(snap, now)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

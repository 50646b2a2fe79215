"""A cluster lab in network namespaces for tests/test_cluster.py.

::

    peers p1..pK (espdp)             etcd (in core)            host behind the cluster
         | eth0                          | 10.255.0.1                  | eth0 10.9.2.100
    ==== br-out (core, learning off) == br-mgmt ======== br-in (core, learning off) ====
      |          |          |          |  |  |          |          |          |
     n1 eth0    n2 eth0    n3 eth0     mgmt0 of n1..n3  n1 eth1    n2 eth1    n3 eth1
     192.0.2.1 and 2001:db8:e5::1,                      10.9.2.1 and fd09:2::1,
     one MAC for all (02:e5:00:00:00:01)                one MAC for all (02:e5:00:00:00:02)

Every node sees every frame for the cluster addresses (the bridges learn
nothing, so they flood), as ClusterIP's shared MAC did; each runs
``espdp run`` with a ``[cluster]`` table and forwards only its segments.
Peers run ``espdp run`` with ordinary SAs toward 192.0.2.1 / 2001:db8:e5::1.
Everything (namespaces, processes, etcd, captures, files) goes in
:meth:`ClusterLab.close`, also when a test fails.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from espdp.client import ControlClient
from espdp.cluster.hash import segment_of
from espdp.errors import ConfigError
from espdp.lab import Daemon, LabError, python_env, sh
from espdp.pcap import read_packets

CLUSTER4, CLUSTER6 = "192.0.2.1", "2001:db8:e5::1"
INSIDE4, INSIDE6 = "10.9.2.1", "fd09:2::1"
HOST4, HOST6 = "10.9.2.100", "fd09:2::100"
MGMT = "10.255.0.1"
PEERS6 = "fd5e::/16"   # IPv6 peers: fd5e:N::2/64, on the cluster's link
OUT_MAC, IN_MAC = "02:e5:00:00:00:01", "02:e5:00:00:00:02"
AEAD = "rfc4106(gcm(aes))"
_counter = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_inner(k: int) -> tuple[str, str]:
    return f"10.8.{k}.1", f"fd08:{k}::1"


class ClusterLab:
    """Namespaces, bridges, etcd, cluster nodes, peers and a host; see the module
    docstring.  ``cluster``: extra ``[cluster]`` keys for every node."""

    def __init__(self, nodes: int = 3, tag: str = "cl", segments: int = 6,
                 **cluster: Any) -> None:
        global _counter
        _counter += 1
        self.id = f"{tag}{os.getpid() % 100000}x{_counter}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"espdp-{self.id}-"))
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.ns: dict[str, str] = {"core": f"espdp-{self.id}-core",
                                   "host": f"espdp-{self.id}-host"}
        for name in self.names:
            self.ns[name] = f"espdp-{self.id}-{name}"
        self.segments = segments
        self.seed = 0x5EED
        self.cluster = {"segments": segments, "seed": self.seed, "lease_ttl": 3,
                        "checkpoint_interval": 0.5, "max_rate": 20000, **cluster}
        self.etcd_port = free_port()
        self.etcd: Optional[subprocess.Popen] = None
        self.daemons: dict[str, Daemon] = {}
        self.peers: dict[str, dict] = {}
        self.processes: list[subprocess.Popen] = []
        self._links = 0
        (self.dir / "secret").write_text(os.urandom(32).hex())
        (self.dir / "secret").chmod(0o600)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ClusterLab:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ topology

    def _ns(self, name: str) -> str:
        if name not in self.ns:
            self.ns[name] = f"espdp-{self.id}-{name}"
            sh("ip", "netns", "add", self.ns[name])
            sh("ip", "link", "set", "lo", "up", ns=self.ns[name])
        return self.ns[name]

    def _build(self) -> None:
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        core = self.ns["core"]
        for bridge in ("br-out", "br-in", "br-mgmt"):
            sh("ip", "link", "add", bridge, "type", "bridge", "mcast_snooping", "0", ns=core)
            sh("ip", "link", "set", bridge, "up", ns=core)
        sh("ip", "addr", "add", f"{MGMT}/24", "dev", "br-mgmt", ns=core)
        for i, name in enumerate(self.names, 1):
            ns = self.ns[name]
            for key in ("all", "default"):
                sh("sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0", ns=ns)
                sh("sysctl", "-qw", f"net.ipv6.conf.{key}.forwarding=1", ns=ns)
            sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=ns)
            self._port(ns, "eth0", "br-out", f"o{i}", mac=OUT_MAC)
            self._port(ns, "eth1", "br-in", f"i{i}", mac=IN_MAC)
            self._port(ns, "mgmt0", "br-mgmt", f"m{i}")
            for dev, cidr in (("eth0", f"{CLUSTER4}/24"), ("eth0", f"{CLUSTER6}/64"),
                              ("eth1", f"{INSIDE4}/24"), ("eth1", f"{INSIDE6}/64"),
                              ("mgmt0", f"10.255.0.{10 + i}/24")):
                sh("ip", "addr", "add", cidr, "dev", dev,
                   *(["nodad"] if ":" in cidr else []), ns=ns)
            # IPv6 peers sit in /64s of their own on the same link (see peer_address)
            sh("ip", "-6", "route", "add", PEERS6, "dev", "eth0", ns=ns)
        host = self.ns["host"]
        self._port(host, "eth0", "br-in", "ih")
        sh("ip", "link", "set", "eth0", "mtu", "1400", ns=host)
        sh("ip", "addr", "add", f"{HOST4}/24", "dev", "eth0", ns=host)
        sh("ip", "addr", "add", f"{HOST6}/64", "dev", "eth0", "nodad", ns=host)
        sh("ip", "route", "add", "default", "via", INSIDE4, ns=host)
        sh("ip", "-6", "route", "add", "default", "via", INSIDE6, ns=host)

    def _port(self, ns: str, dev: str, bridge: str, port: str, mac: Optional[str] = None) -> None:
        """A veth from ``ns`` (named ``dev``) to ``bridge`` in core (named ``port``)."""
        self._links += 1
        tmp = f"v{os.getpid() % 10000}{_counter}x{self._links}"
        core = self.ns["core"]
        sh("ip", "link", "add", tmp + "a", "type", "veth", "peer", "name", tmp + "b")
        sh("ip", "link", "set", tmp + "a", "netns", ns, "name", dev)
        sh("ip", "link", "set", tmp + "b", "netns", core, "name", port)
        if mac:
            sh("ip", "link", "set", dev, "address", mac, ns=ns)
            sh("sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0", ns=ns)
        sh("ip", "link", "set", port, "master", bridge, ns=core)
        if bridge != "br-mgmt":   # learn nothing, flood everything: every node sees every frame
            sh("ip", "link", "set", port, "type", "bridge_slave", "learning", "off", ns=core)
        sh("ip", "link", "set", port, "up", ns=core)
        sh("ip", "link", "set", dev, "up", ns=ns)

    # ------------------------------------------------------------ etcd

    def start_etcd(self, wait: float = 15) -> None:
        core = self.ns["core"]
        url = f"http://{MGMT}:{self.etcd_port}"
        peer = free_port()
        log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115 - closed with the process
        self.etcd = subprocess.Popen(
            ["ip", "netns", "exec", core, "etcd", "--name", "lab",
             "--data-dir", str(self.dir / "etcd"), "--listen-client-urls", url,
             "--advertise-client-urls", url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"lab=http://127.0.0.1:{peer}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + wait
        probe = f"import urllib.request; urllib.request.urlopen('{url}/health', timeout=1)"
        while time.monotonic() < deadline:
            if self.etcd.poll() is not None:
                raise LabError(f"etcd exited: {(self.dir / 'etcd.log').read_text()[-2000:]}")
            if sh(sys.executable, "-c", probe, ns=core, check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise LabError("etcd did not start")

    def stop_etcd(self, sig: int = signal.SIGTERM) -> None:
        if self.etcd is not None and self.etcd.poll() is None:
            self.etcd.send_signal(sig)
            self.etcd.wait(10)
        self.etcd = None

    # ------------------------------------------------------------ cluster nodes

    def node_config(self, name: str) -> str:
        c = {"node": name, "endpoints": [f"http://{MGMT}:{self.etcd_port}"],
             "addresses": [CLUSTER4, CLUSTER6], "secret_file": str(self.dir / "secret"),
             "name": self.id, **self.cluster}
        lines = ["[tunnel]", 'tun = "esp0"', 'route = ["10.8.0.0/16", "fd08::/16"]',
                 "nat_keepalive = 0", f'metrics = "127.0.0.1:{9600 + int(name[1:])}"', "",
                 "[cluster]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in c.items()]
        return "\n".join(lines) + "\n"

    def start_nodes(self, names: Optional[list] = None, wait: float = 30) -> None:
        """Start ``espdp run`` on the nodes (all by default), in parallel."""
        names = names or self.names
        for name in names:
            self.daemons[name] = self._spawn(name, self.node_config(name))
        for name in names:
            self._wait_daemon(name, self.daemons[name], wait)

    def kill(self, name: str) -> None:
        daemon = self.daemons[name]
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()

    def _spawn(self, name: str, config: str, *extra: str) -> Daemon:
        ns = self.ns[name]
        path = self.dir / f"{name}.toml"
        path.write_text(config)
        path.chmod(0o600)
        control = str(self.dir / f"{name}.sock")
        log = self.dir / f"{name}.log"
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "espdp", "run", "--config",
                str(path), "--control", control, "--state-dir",
                str(self.dir / f"{name}-state"), *extra]
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    env=python_env(), start_new_session=True)
        return Daemon(ns, "esp0", proc, control, log, argv)

    def _wait_daemon(self, name: str, daemon: Daemon, wait: float) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if daemon.proc.poll() is not None:
                raise LabError(f"espdp run on {name} exited {daemon.proc.returncode}:\n"
                               f"{daemon.output()}")
            if os.path.exists(daemon.control):
                try:
                    self.request(name, "status")
                    return
                except ConfigError:
                    pass
            time.sleep(0.1)
        raise LabError(f"espdp run on {name} did not answer in {wait}s:\n{daemon.output()}")

    def request(self, name: str, op: str, **fields: Any) -> Any:
        """A control request to a daemon (the socket is a file: no namespace needed)."""
        with ControlClient(self.daemons[name].control, timeout=5) as client:
            return client.request(op, **fields)

    def cluster_status(self, name: str) -> dict:
        return self.request(name, "cluster")

    def alive(self) -> list[str]:
        return [n for n in self.names if n in self.daemons
                and self.daemons[n].proc.poll() is None]

    def wait_settled(self, names: Optional[list] = None, timeout: float = 30) -> dict:
        """Until each of ``names`` (the live nodes) forwards, all segments are owned
        by them, balanced; the owner of each segment."""
        names = names or self.alive()
        lo, hi = self.segments // len(names), -(-self.segments // len(names))
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            last = {n: self.cluster_status(n) for n in names}
            owners = {s: n for n in names for s in last[n]["owned"]}
            counts = [len(last[n]["owned"]) for n in names]
            if (len(owners) == self.segments and all(lo <= c <= hi for c in counts)
                    and sum(counts) == self.segments and all(s["forwarding"]
                                                             for s in last.values())):
                return owners
            time.sleep(0.2)
        raise LabError(f"the cluster did not settle: {json.dumps(last, indent=1)[:4000]}")

    # ------------------------------------------------------------ peers

    def peer_address(self, family: int, segment: int, taken: set) -> str:
        """An outer address on the cluster's link whose segment is ``segment``.  IPv6
        peers get a /64 each, fd5e:N::/64: xt_cluster hashes only the first 32 bits
        of an IPv6 address (see espdp.cluster.hash), so peers of one /64 would all
        share a segment."""
        for i in range(10, 250):
            addr = f"192.0.2.{i}" if family == 4 else f"fd5e:{i:x}::2"
            if addr not in taken and segment_of(
                    ipaddress.ip_address(addr), self.segments, self.seed,
                    ipv6_words=self.cluster.get("ipv6_words", 1)) == segment:
                taken.add(addr)
                return addr
        raise LabError(f"no address for segment {segment}")

    def add_peer(self, k: int, addr4: str, addr6: str, via: str = "n1") -> dict:
        """Peer ``pK`` at ``addr4``/``addr6``: its namespace and ``espdp run``, and its
        SAs and policies installed in the cluster through ``via``'s control socket."""
        name = f"p{k}"
        ns = self._ns(name)
        self._port(ns, "eth0", "br-out", f"p{k}")
        sh("ip", "addr", "add", f"{addr4}/24", "dev", "eth0", ns=ns)
        sh("ip", "addr", "add", f"{addr6}/64", "dev", "eth0", "nodad", ns=ns)
        sh("ip", "-6", "route", "add", f"{CLUSTER6}/128", "dev", "eth0", ns=ns)
        inner4, inner6 = peer_inner(k)
        keys = ["0x" + os.urandom(20).hex() for _ in range(4)]
        spis = [0x1000 * k + j for j in (1, 2, 3, 4)]
        # (outer family, our end, cluster end, spi peer->cluster, spi cluster->peer, keys)
        flows = [(4, addr4, CLUSTER4, inner4, "10.9.2.0/24", spis[0], spis[1], keys[:2], 1),
                 (6, addr6, CLUSTER6, inner6, "fd09:2::/64", spis[2], spis[3], keys[2:], 3)]
        peer_lines, cluster_lines = [], []
        for _fam, me, cl, inner, inside, spi_up, spi_down, (k_up, k_down), reqid in flows:
            plen = "32" if "." in inner else "128"
            mine = f"{inner}/{plen}"
            for lines, local, remote, s_out, k_out, s_in, k_in, src, dst in (
                    (peer_lines, me, cl, spi_up, k_up, spi_down, k_down, mine, inside),
                    (cluster_lines, cl, me, spi_down, k_down, spi_up, k_up, inside, mine)):
                common = ("proto esp mode tunnel replay-window 1024 "
                          "encap espinudp 4500 4500 0.0.0.0")
                lines.append(f"state add src {local} dst {remote} spi {s_out:#x} reqid {reqid} "
                             f"aead '{AEAD}' {k_out} 128 {common}")
                lines.append(f"state add src {remote} dst {local} spi {s_in:#x} "
                             f"reqid {reqid + 1} aead '{AEAD}' {k_in} 128 {common}")
                lines.append(f"policy add src {src} dst {dst} dir out tmpl src {local} "
                             f"dst {remote} proto esp reqid {reqid} mode tunnel")
                lines.append(f"policy add src {dst} dst {src} dir in tmpl src {remote} "
                             f"dst {local} proto esp reqid {reqid + 1} mode tunnel")
        xfrm = self.dir / f"{name}.xfrm"
        xfrm.write_text("\n".join("ip xfrm " + line for line in peer_lines) + "\n")
        xfrm.chmod(0o600)
        config = "\n".join(["[tunnel]", 'tun = "esp0"', f'address = ["{inner4}/32", '
                            f'"{inner6}/128"]', 'route = ["10.9.2.0/24", "fd09:2::/64"]',
                            "nat_keepalive = 0", f'xfrm = "{xfrm}"', ""])
        for line in cluster_lines:
            self.request(via, "xfrm", line=line)
        self.daemons[name] = self._spawn(name, config)
        self._wait_daemon(name, self.daemons[name], 30)
        peer = {"name": name, "k": k, "addr4": addr4, "addr6": addr6, "inner4": inner4,
                "inner6": inner6, "spis": spis}
        self.peers[name] = peer
        return peer

    def spread_peers(self, count: int, owners: dict, via: str = "n1") -> list[dict]:
        """``count`` peers whose IPv4 segments are owned by different nodes, and whose
        IPv6 segments too (shifted by one node), so traffic spreads over all nodes."""
        by_node: dict[str, list] = {}
        for segment, node in sorted(owners.items()):
            by_node.setdefault(node, []).append(segment)
        nodes = sorted(by_node)
        taken: set = set()
        peers = []
        for k in range(1, count + 1):
            seg4 = by_node[nodes[(k - 1) % len(nodes)]][0]
            seg6 = by_node[nodes[k % len(nodes)]][-1]
            peers.append(self.add_peer(k, self.peer_address(4, seg4, taken),
                                       self.peer_address(6, seg6, taken), via))
        return peers

    # ------------------------------------------------------------ traffic and captures

    def background(self, ns: str, argv: list, name: str) -> subprocess.Popen:
        out = open(self.dir / f"{name}.out", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns.get(ns, ns), *argv],
                                stdout=out, stderr=subprocess.STDOUT, env=python_env(),
                                start_new_session=True)
        out.close()
        self.processes.append(proc)
        return proc

    def output(self, name: str) -> str:
        path = self.dir / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def echo_server(self) -> subprocess.Popen:
        proc = self.background("host", [sys.executable, "-c", ECHO_SERVER, HOST4, HOST6], "echo")
        time.sleep(0.3)
        return proc

    def probe(self, peer: dict, family: int, seconds: float, name: str,
              interval: float = 0.005) -> subprocess.Popen:
        """UDP probes from a peer to the host's echo server, every ``interval``."""
        target = HOST4 if family == 4 else HOST6
        return self.background(peer["name"], [sys.executable, "-c", PROBER, target,
                                               str(seconds), str(interval)], name)

    def probe_result(self, proc: subprocess.Popen, name: str, timeout: float = 60) -> dict:
        proc.wait(timeout)
        text = self.output(name).strip().splitlines()
        if not text:
            raise LabError(f"probe {name} printed nothing")
        return json.loads(text[-1])

    def capture(self, ns: str, dev: str, name: str, bpf: str = "udp port 4500"
                ) -> subprocess.Popen:
        path = self.dir / f"{name}.pcap"
        proc = self.background(ns, ["dumpcap", "-q", "-P", "-i", dev, "-s", "128", "-f", bpf,
                                    "-w", str(path)], f"capture-{name}")
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        return proc

    def stop_capture(self, proc: subprocess.Popen, name: str) -> list[tuple]:
        """Stop a capture; its ESP packets as (time, src, dst, spi, seq)."""
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        return esp_packets(self.dir / f"{name}.pcap")

    def transfer(self, client: str, target: str, nbytes: int, rate: float,
                 port: int = 5201) -> subprocess.Popen:
        """A TCP transfer of ``nbytes`` from ``client`` to the host at ``rate`` bytes/s."""
        self.background("host", [sys.executable, "-c", TCP_SERVER, target, str(port)],
                        f"tcp-server-{port}")
        time.sleep(0.3)
        return self.background(client, [sys.executable, "-c", TCP_CLIENT, target, str(port),
                                         str(nbytes), str(rate)], f"tcp-client-{port}")

    def transfer_result(self, proc: subprocess.Popen, port: int = 5201,
                        timeout: float = 90) -> dict:
        proc.wait(timeout)
        sent = self.output(f"tcp-client-{port}").split()
        deadline = time.monotonic() + 10
        got: list = []
        while time.monotonic() < deadline:
            got = self.output(f"tcp-server-{port}").split()
            if len(got) >= 2:
                break
            time.sleep(0.1)
        return {"sent": sent, "received": got,
                "ok": len(sent) >= 2 and len(got) >= 2 and sent[0] == got[0]}

    # ------------------------------------------------------------ cleanup

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for daemon in self.daemons.values():
            try:
                daemon.stop()
            except Exception:  # noqa: BLE001 - the namespaces must go anyway
                pass
        try:
            self.stop_etcd(signal.SIGKILL)
        except Exception:  # noqa: BLE001
            pass
        for ns in self.ns.values():
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


def esp_packets(path: Path) -> list[tuple]:
    """(time, src, dst, spi, seq) of each ESP-in-UDP packet in a capture."""
    out = []
    for p in read_packets(path):
        ip = p.ip
        if ip is None:
            continue
        if ip[0] >> 4 == 4:
            start, proto = (ip[0] & 0x0F) * 4, ip[9]
            src, dst = ipaddress.IPv4Address(ip[12:16]), ipaddress.IPv4Address(ip[16:20])
        else:
            start, proto = 40, ip[6]
            src, dst = ipaddress.IPv6Address(ip[8:24]), ipaddress.IPv6Address(ip[24:40])
        if proto != 17 or len(ip) < start + 16:
            continue
        spi = int.from_bytes(ip[start + 8:start + 12], "big")
        if spi == 0:   # the non-ESP marker: IKE
            continue
        out.append((p.timestamp, str(src), str(dst), spi,
                    int.from_bytes(ip[start + 12:start + 16], "big")))
    return out


def repeated_pairs(packets: list[tuple]) -> list[tuple]:
    seen: set = set()
    twice = []
    for _, _, _, spi, seq in packets:
        if (spi, seq) in seen:
            twice.append((hex(spi), seq))
        seen.add((spi, seq))
    return twice


ECHO_SERVER = r"""
import select, socket, sys
socks = []
for fam, addr in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((addr, 7007)); socks.append(s)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(2048); s.sendto(data, peer)
"""

# Sends a numbered datagram every INTERVAL for SECONDS; prints JSON: sent, answered,
# and the longest time without an answer (the gap) with when it began.
PROBER = r"""
import json, select, socket, struct, sys, time
target, seconds, interval = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in target else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM); s.setblocking(False)
start = time.monotonic(); nxt = start; seq = 0; answers = []; wall0 = time.time()
while True:
    now = time.monotonic()
    if now - start >= seconds + 1.0: break
    if now >= nxt and now - start < seconds:
        try: s.sendto(struct.pack("!Id", seq, now) + b"x" * 64, (target, 7007))
        except OSError: pass
        seq += 1; nxt += interval
    r, _, _ = select.select([s], [], [], max(0.0, min(nxt - time.monotonic(), 0.05)))
    while r:
        try: data = s.recv(2048)
        except BlockingIOError: break
        answers.append(time.monotonic())
times = [start] + sorted(answers)
gaps = [(b - a, a) for a, b in zip(times, times[1:])]
gap, at = max(gaps) if gaps else (seconds, start)
print(json.dumps({"sent": seq, "answered": len(answers), "gap": round(gap, 3),
                  "gap_start": round(at - start, 3), "gap_start_wall": wall0 + at - start,
                  "last": round(times[-1] - start, 3)}))
"""

TCP_SERVER = r"""
import hashlib, socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(120)
c, _ = s.accept(); c.settimeout(120); h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 16)
    if not d: break
    h.update(d); n += len(d)
print(h.hexdigest(), n, flush=True)
"""

TCP_CLIENT = r"""
import hashlib, os, socket, sys, time
addr, port, n, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
block = os.urandom(1 << 14); h = hashlib.sha256()
s = socket.create_connection((addr, port), timeout=120)
t = time.monotonic(); left = n; sent = 0
while left:
    d = block[:min(left, len(block))]; s.sendall(d); h.update(d); left -= len(d); sent += len(d)
    ahead = sent / rate - (time.monotonic() - t)
    if ahead > 0: time.sleep(ahead)
s.shutdown(socket.SHUT_WR); s.recv(1)
print(h.hexdigest(), n, round(time.monotonic() - t, 3), flush=True)
"""


def etcd_dump(lab: ClusterLab) -> list[tuple[str, bytes]]:
    """Every key and value in the lab's etcd (through its JSON gateway)."""
    code = (
        "import base64, json, sys, urllib.request\n"
        f"url = 'http://{MGMT}:{lab.etcd_port}/v3/kv/range'\n"
        "body = json.dumps({'key': base64.b64encode(b'\\0').decode(),"
        " 'range_end': base64.b64encode(b'\\0').decode()}).encode()\n"
        "answer = json.load(urllib.request.urlopen(url, body, timeout=5))\n"
        "print(json.dumps([(kv['key'], kv.get('value', '')) for kv in answer.get('kvs', [])]))\n")
    out = sh(sys.executable, "-c", code, ns=lab.ns["core"]).stdout
    return [(base64.b64decode(k).decode(), base64.b64decode(v)) for k, v in json.loads(out)]

"""The active-active cluster end to end: network namespaces, a real etcd started
by the test, three ``espdp run`` nodes sharing one address behind bridges that
flood, peers running ``espdp run``, a host behind the cluster
(tests/cluster_lab.py draws it).

What is checked is what issue 7 asks: traffic over outer IPv4 and IPv6 with
UDP encapsulation spread over the nodes by segment; ``kill -9`` of the busy
segment's owner during a transfer (the gap is measured and printed) with no
(SPI, sequence number) pair twice in a capture on the peer's side and no
replay drop at the peer; the node's return and rebalancing, again without a
repeated pair; etcd stopped (every node stops forwarding within the lease
time and says why; forwarding resumes when etcd is back); a node cut off
from etcd that still sees traffic stops before another takes its segments.
Plus the split compared with the running kernel's ``iptables -m cluster``.
Root only; CI is root.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import struct
import sys
import time

import pytest
from cluster_lab import (
    HOST4,
    HOST6,
    MGMT,
    ClusterLab,
    etcd_dump,
    repeated_pairs,
)

from espdp.cluster.hash import segment_of
from espdp.lab import sh

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                       reason="needs root, network namespaces and /dev/net/tun"),
]

MIB = 1 << 20


def _report(what: str, **values) -> None:
    """Measured figures, printed (pytest -s shows them) and kept for the summary."""
    line = f"cluster: {what}: " + ", ".join(f"{k} {v}" for k, v in values.items())
    print(line)
    with open(os.environ.get("ESPDP_CLUSTER_REPORT", os.devnull), "a") as f:
        f.write(line + "\n")


def _segment(lab: ClusterLab, addr: str) -> int:
    return segment_of(ipaddress.ip_address(addr), lab.segments, lab.seed)


def _wait(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s")


def _sa_packets(lab: ClusterLab, name: str) -> dict:
    return {int(sa["spi"], 16): sa for sa in lab.request(name, "status")["sas"]}


def _checkpoint_rate(lab: ClusterLab) -> dict:
    """Checkpoint transactions and SA records per second, summed over the live nodes."""
    writes = records = 0.0
    for name in lab.alive():
        if name.startswith("n"):
            c = lab.cluster_status(name)["checkpoints"]
            writes += c["writes_per_second"]
            records += c["records_per_second"]
    return {"writes_per_s": round(writes, 2), "records_per_s": round(records, 2)}


def _cluster(lab: ClusterLab, peers: int = 1) -> tuple[dict, list]:
    lab.start_etcd()
    lab.start_nodes()
    owners = lab.wait_settled()
    return owners, lab.spread_peers(peers, owners)


# ---------------------------------------------------------------- traffic


def test_traffic_over_ipv4_and_ipv6_spreads_over_the_nodes_by_segment():
    with ClusterLab(tag="spread") as lab:
        owners, peers = _cluster(lab, 3)
        # The SAs and policies went in through n1's control socket: every node has them.
        for name in lab.names:
            _wait(lambda n=name: len(lab.request(n, "xfrm", line="state list")["states"]) == 12
                  and len(lab.request(n, "xfrm", line="policy list")["policies"]) == 12,
                  10, f"SAs replicated to {name}")
        # ... and etcd never saw a key: the records are sealed.
        dump = etcd_dump(lab)
        assert any("/state/sa/" in key for key, _ in dump)
        keys = re.findall(r"0x([0-9a-f]{40})", (lab.dir / "p1.xfrm").read_text())
        assert keys
        for _, value in dump:
            for key in keys:
                assert bytes.fromhex(key) not in value and key.encode() not in value.lower()
        lab.echo_server()
        probes = {(p["name"], fam): lab.probe(p, fam, 2.0, f"probe-{p['name']}-{fam}", 0.01)
                  for p in peers for fam in (4, 6)}
        results = {key: lab.probe_result(proc, f"probe-{key[0]}-{key[1]}")
                   for key, proc in probes.items()}
        for key, r in results.items():
            assert r["answered"] >= 0.95 * r["sent"], (key, r)
        for fam, target in ((4, HOST4), (6, HOST6)):
            proc = lab.transfer("p1", target, MIB, 20 * MIB, port=5200 + fam)
            assert lab.transfer_result(proc, port=5200 + fam)["ok"], lab.output(f"tcp-{fam}")
        # Each peer's SAs were used by exactly the node that owns its segment.
        counts = {name: _sa_packets(lab, name) for name in lab.names}
        busy_nodes = set()
        for p in peers:
            for fam, (up, down) in ((4, p["spis"][:2]), (6, p["spis"][2:])):
                owner = owners[_segment(lab, p[f"addr{fam}"])]
                for name in lab.names:
                    used = counts[name][up]["packets"] + counts[name][down]["packets"]
                    assert (used > 0) == (name == owner), (p["name"], fam, name, owner)
                busy_nodes.add(owner)
        assert busy_nodes == set(lab.names)
        for name in lab.names:
            drops = lab.cluster_status(name)["drops"]
            assert drops["not_owned_in"] > 0 and drops["fenced_in"] == 0, (name, drops)
        _report("spread", nodes=sorted(busy_nodes), **_checkpoint_rate(lab))


# ---------------------------------------------------------------- failover


def test_kill_9_of_the_busy_owner_fails_over_and_back_without_a_repeated_sequence_number():
    with ClusterLab(tag="kill") as lab:
        owners, peers = _cluster(lab, 3)   # every segment carries a peer's traffic
        busy = peers[0]
        owner = owners[_segment(lab, busy["addr4"])]
        spi_up, spi_down = busy["spis"][:2]
        captures = {p["name"]: lab.capture(p["name"], "eth0", p["name"]) for p in peers}
        lab.echo_server()
        probes = {(p["name"], fam): lab.probe(p, fam, 12.0, f"probe-{p['name']}-{fam}")
                  for p in peers for fam in (4, 6)}
        transfer = lab.transfer(busy["name"], HOST4, 6 * MIB, 1 * MIB)
        time.sleep(2.5)
        before = _sa_packets(lab, owner)[spi_down]["packets"]
        assert before > 0
        lab.kill(owner)
        killed_at = time.monotonic()
        others = [n for n in lab.names if n != owner]
        taker = _wait(lambda: next((n for n in others if _segment(lab, busy["addr4"])
                                    in lab.cluster_status(n)["owned"]), None), 15,
                      "another node takes the busy segment")
        took = time.monotonic() - killed_at
        results = {key: lab.probe_result(proc, f"probe-{key[0]}-{key[1]}")
                   for key, proc in probes.items()}
        gap = results[(busy["name"], 4)]["gap"]
        assert 0 < gap < 8, results
        assert all(r["answered"] > 0.5 * r["sent"] for r in results.values()), results
        assert lab.transfer_result(transfer)["ok"], lab.output("tcp-client-5201")
        assert _sa_packets(lab, taker)[spi_down]["packets"] > 0   # resumed through the taker
        status = lab.cluster_status(taker)
        assert status["takeovers"] >= 1 and status["counters"]["conflicts"] == 0
        rate = _checkpoint_rate(lab)

        # The node comes back: rebalancing gives it its share again, under traffic.
        probes = {(p["name"], fam): lab.probe(p, fam, 8.0, f"back-{p['name']}-{fam}")
                  for p in peers for fam in (4, 6)}
        time.sleep(1.0)
        lab.start_nodes([owner])
        settled = lab.wait_settled(timeout=20)
        assert owner in settled.values()
        back = {key: lab.probe_result(proc, f"back-{key[0]}-{key[1]}")
                for key, proc in probes.items()}
        assert all(r["answered"] > 0.5 * r["sent"] for r in back.values()), back
        # Segments moved back to the returned node, and traffic with them.
        assert sum(sa["packets"] for sa in _sa_packets(lab, owner).values()) > 0

        # (the outside bridge floods: each peer's capture holds every ESP packet on it)
        captured = {name: lab.stop_capture(proc, name) for name, proc in captures.items()}
        for name, packets in captured.items():
            assert packets, f"nothing captured at {name}"
            assert repeated_pairs(packets) == [], f"an (SPI, seq) pair went out twice: {name}"
        packets = captured[busy["name"]]
        down = [seq for _, _, _, spi, seq in packets if spi == spi_down]
        jumps = [b - a for a, b in zip(down, down[1:], strict=False) if b - a > 1000]
        assert jumps and min(jumps) >= lab.cluster["max_rate"] * lab.cluster[
            "checkpoint_interval"], jumps   # the new owner started past the checkpoint
        peer_sa = _sa_packets(lab, busy["name"])
        for spi in (spi_down, busy["spis"][3]):
            drops = peer_sa[spi]["drops"]
            assert not drops.get("replay") and not drops.get("replay_window"), (spi, drops)
        _report("failover", killed=owner, taken_by=taker, gap_s=gap,
                segment_taken_after_s=round(took, 2), back_gap_s=max(
                    r["gap"] for r in back.values()),
                packets_at_busy_peer=len(packets),
                seq_jumps=jumps, **rate)


# ---------------------------------------------------------------- etcd and partitions


def _metrics(lab: ClusterLab, name: str) -> str:
    port = 9600 + int(name[1:])
    return sh(sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
              f"'http://127.0.0.1:{port}/metrics', timeout=5).read().decode())",
              ns=lab.ns[name]).stdout


def test_etcd_stopped_stops_every_node_within_the_lease_and_its_return_resumes():
    with ClusterLab(tag="etcd") as lab:
        owners, peers = _cluster(lab, 1)
        lab.echo_server()
        probe = lab.probe(peers[0], 4, 14.0, "probe")
        time.sleep(2.0)
        lab.stop_etcd()
        stopped = time.monotonic()
        _wait(lambda: not any(lab.cluster_status(n)["forwarding"] for n in lab.names),
              lab.cluster["lease_ttl"] + 1, "every node stops forwarding")
        took = time.monotonic() - stopped
        assert took <= lab.cluster["lease_ttl"]
        for name in lab.names:
            status = lab.cluster_status(name)
            assert "etcd unreachable" in status["reason"], status["reason"]
        stopped_metric = re.compile(
            r'^espdp_cluster_forwarding\{reason="[^"]*etcd unreachable[^"]*"\} 0\.0$', re.M)
        _wait(lambda: stopped_metric.search(_metrics(lab, "n1")), 3,
              "the metric says why (snapshots are a second apart)", 0.3)
        text = sh(sys.executable, "-m", "espdp", "cluster", "status", "--control",
                  lab.daemons["n1"].control, ns=lab.ns["n1"]).stdout
        assert "NOT forwarding" in text and "etcd" in text, text
        time.sleep(2.0)
        restarted = time.monotonic()
        lab.start_etcd()
        _wait(lambda: all(lab.cluster_status(n)["forwarding"] for n in lab.names), 15,
              "forwarding resumes")
        resumed = time.monotonic() - restarted
        result = lab.probe_result(probe, "probe")
        assert result["gap"] >= took and result["last"] > 10, result
        _report("etcd stopped", all_stopped_after_s=round(took, 2),
                resumed_after_restart_s=round(resumed, 2), probe_gap_s=result["gap"])


def test_a_node_cut_off_from_etcd_stops_before_another_takes_its_segments():
    with ClusterLab(tag="part") as lab:
        owners, peers = _cluster(lab, 1)
        busy = peers[0]
        segment = _segment(lab, busy["addr4"])
        victim = owners[segment]
        spi_down = busy["spis"][1]
        captures = {n: lab.capture(n, "eth0", f"out-{n}", "outbound and udp port 4500")
                    for n in lab.names}
        peer_capture = lab.capture(busy["name"], "eth0", "peer")
        lab.echo_server()
        probe = lab.probe(busy, 4, 14.0, "probe")
        time.sleep(2.0)
        sh("nft", "-f", "-", ns=lab.ns[victim], input=(
            "table inet partition {\n"
            " chain out { type filter hook output priority 0;"
            f" ip daddr {MGMT} tcp dport {lab.etcd_port} drop; }}\n"
            " chain in { type filter hook input priority 0;"
            f" ip saddr {MGMT} tcp sport {lab.etcd_port} drop; }}\n}}\n"))
        others = [n for n in lab.names if n != victim]
        taker = _wait(lambda: next((n for n in others
                                    if segment in lab.cluster_status(n)["owned"]), None),
                      15, "another node takes the segment")
        victim_status = lab.cluster_status(victim)
        assert not victim_status["forwarding"], victim_status
        assert victim_status["stopped_at"] is not None
        taken = _wait(lambda: [t for t in lab.cluster_status(taker)["takeover_log"]
                               if t["segment"] == segment and t["to"] == taker], 3,
                      "the takeover is on record (its count is read every second)")
        assert victim_status["stopped_at"] < taken[-1]["at"], (victim_status, taken)
        result = lab.probe_result(probe, "probe")
        sent = {n: [p for p in lab.stop_capture(proc, f"out-{n}") if p[3] == spi_down]
                for n, proc in captures.items()}
        assert sent[victim] and sent[taker], {n: len(v) for n, v in sent.items()}
        last_victim, first_taker = sent[victim][-1][0], sent[taker][0][0]
        assert last_victim < first_taker, (last_victim, first_taker)
        assert last_victim <= taken[-1]["at"]

        # Healed: the node finds its lease gone, joins again and gets its share back.
        sh("nft", "delete", "table", "inet", "partition", ns=lab.ns[victim])
        lab.wait_settled(timeout=20)
        packets = lab.stop_capture(peer_capture, "peer")
        assert repeated_pairs(packets) == []
        _report("partition", victim=victim, taker=taker,
                stopped_before_takeover_s=round(taken[-1]["at"] - victim_status["stopped_at"], 2),
                last_victim_packet_before_first_taker_s=round(first_taker - last_victim, 2),
                probe_gap_s=result["gap"])


# ---------------------------------------------------------------- the kernel's split


def _raw_udp(src: str, dst: str) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    udp = struct.pack("!HHHH", 1234, 9, 8, 0)
    if s.version == 4:
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, s.packed,
                           d.packed) + udp
    pseudo = s.packed + d.packed + struct.pack("!I3xB", 8, 17) + udp
    total = sum(struct.unpack(f"!{len(pseudo) // 2}H", pseudo))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    csum = (~total & 0xFFFF) or 0xFFFF
    return struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 64, s.packed, d.packed) + \
        udp[:6] + struct.pack("!H", csum)


@pytest.mark.skipif(shutil.which("iptables") is None or shutil.which("conntrack") is None,
                    reason="iptables and conntrack (scripts/bootstrap.sh installs them)")
def test_the_running_kernels_xt_cluster_puts_every_peer_in_the_same_segment(netns):
    """Packets from many source addresses hit one rule per segment (``-m cluster
    --cluster-local-node s+1 ... -j CONNMARK --set-mark s+1``); conntrack then
    tells the segment the kernel chose for each address."""
    total, seed = 7, 0xC0FFEE
    sender = netns + "s"
    sh("ip", "netns", "add", sender)
    try:
        sh("ip", "link", "add", "xcs", "type", "veth", "peer", "name", "xcr")
        sh("ip", "link", "set", "xcs", "netns", sender)
        sh("ip", "link", "set", "xcr", "netns", netns)
        sh("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", ns=netns)
        sh("sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0", ns=netns)
        for ns, dev, v4, v6 in ((sender, "xcs", "198.18.0.1/15", "2001:db8:c1::1/48"),
                                (netns, "xcr", "198.19.255.254/15", "2001:db8:c1::fe/48")):
            sh("ip", "link", "set", dev, "up", ns=ns)
            sh("ip", "addr", "add", v4, "dev", dev, ns=ns)
            sh("ip", "addr", "add", v6, "dev", dev, "nodad", ns=ns)
        for tool in ("iptables", "ip6tables"):
            for s in range(total):
                sh(tool, "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "--dport", "9",
                   "-m", "cluster", "--cluster-total-nodes", str(total), "--cluster-local-node",
                   str(s + 1), "--cluster-hash-seed", hex(seed), "-j", "CONNMARK",
                   "--set-mark", str(s + 1), ns=netns)
        sources = [str(ipaddress.IPv4Address("198.18.0.0") + 1543 * i + 3) for i in range(80)]
        rng = random.Random(5)   # IPv6 sources from many /32s: the kernel hashes only those bits
        sources += [str(ipaddress.IPv6Address((0x2000 + rng.getrandbits(13)) << 112
                                              | rng.getrandbits(112))) for _ in range(80)]
        packets = [(_raw_udp(src, "198.19.255.254" if ":" not in src else "2001:db8:c1::fe"),
                    ":" in src) for src in sources]
        code = ("import socket, sys, json\n"
                "s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)\n"
                "s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)\n"
                "for hexdata, v6 in json.load(sys.stdin):\n"
                "    data = bytes.fromhex(hexdata)\n"
                "    if v6: s6.sendto(data, ('2001:db8:c1::fe', 0))\n"
                "    else: s4.sendto(data, ('198.19.255.254', 0))\n")
        for target in ("198.19.255.254", "2001:db8:c1::fe"):   # neighbours resolved first
            sh("ping", "-c", "1", "-W", "2", target, ns=sender)
        sh(sys.executable, "-c", code, ns=sender,
           input=json.dumps([(p.hex(), v6) for p, v6 in packets]))
        time.sleep(0.5)
        kernel = {}
        for family in ("ipv4", "ipv6"):
            text = sh("conntrack", "-L", "-f", family, "-p", "udp", ns=netns,
                      check=False).stdout
            for line in text.splitlines():
                src = re.search(r"src=(\S+)", line)
                mark = re.search(r"mark=(\d+)", line)
                if src and mark and "dport=9 " in line:
                    kernel[str(ipaddress.ip_address(src.group(1)))] = int(mark.group(1)) - 1
        assert len(kernel) == len(sources), (len(kernel), len(sources))
        ours = {src: segment_of(ipaddress.ip_address(src), total, seed) for src in sources}
        assert kernel == ours
        assert len({ours[s] for s in sources if ":" in s}) == total
        assert len({ours[s] for s in sources if ":" not in s}) == total
        # Hashing the whole IPv6 address (ipv6_words = 4) is not what the kernel does.
        whole = {s: segment_of(ipaddress.ip_address(s), total, seed, ipv6_words=4)
                 for s in sources if ":" in s}
        assert any(kernel[s] != segment for s, segment in whole.items())
    finally:
        sh("ip", "netns", "del", sender, check=False)

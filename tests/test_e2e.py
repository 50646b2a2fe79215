"""End to end: two (or three) network namespaces, one ``espdp run`` process
per host, real kernel sockets and TUN devices, traffic checked byte for byte.

Each test makes its own uniquely named namespaces through :class:`espdp.lab.Lab`
and removes them (processes first) also when it fails.  Root only; CI is root.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from espdp.lab import INNER, OUTER, Lab, keys, sh, tunnel_config

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root, network namespaces and /dev/net/tun")

MIB = 1 << 20


def _pair(lab: Lab, outer: int = 4, encap: bool = True, extra_a: str = "",
          extra_b: str = "", **kw):
    k = keys()
    a = lab.start("a", tunnel_config("a", outer, encap, *k, extra=extra_a, **kw))
    b = lab.start("b", tunnel_config("b", outer, encap, *k, extra=extra_b, **kw))
    return a, b


@pytest.mark.parametrize("encap", [True, False], ids=["udp", "raw-esp"])
@pytest.mark.parametrize("outer", [4, 6], ids=["outer4", "outer6"])
def test_ping_and_tcp_through_the_tunnel(outer, encap):
    raw = "" if encap else "raw_esp = true"
    with Lab("e2e") as lab:
        a, b = _pair(lab, outer, encap, raw, raw)
        for idx in (0, 1):  # inner IPv4, inner IPv6
            target = INNER["b"][idx]
            assert lab.ping("a", target), f"ping {target} failed:\n{a.output()}\n{b.output()}"
            result = lab.transfer("a", "b", target, 2 * MIB)
            assert result["bytes"] == 2 * MIB
        sa_a = {sa["spi"]: sa for sa in a.status()["sas"]}
        sa_b = {sa["spi"]: sa for sa in b.status()["sas"]}
        # Every packet a encrypted with 0xa0b0 was decrypted by b, none dropped.
        assert sa_a["0x0000a0b0"]["packets"] > 1000
        assert sa_b["0x0000a0b0"]["packets"] == sa_a["0x0000a0b0"]["packets"]
        assert not sa_b["0x0000a0b0"]["drops"]
        # The outer packets really were of the kind asked for.
        device = "UdpEncapSocket" if encap else "RawEspSocket"
        devices = a.status()["devices"]
        sent = sum(d["sent"] for name, d in devices.items() if device in name
                   and f"v{outer}" in name)
        assert sent >= sa_a["0x0000a0b0"]["packets"], devices
        for d in (a, b):
            assert d.stop() == 0, d.output()


def test_virtual_ipv6_source_and_cleanup_after_stop_and_kill():
    with Lab("vip") as lab:
        a, b = _pair(lab, 6)
        ns = lab.ns["a"]
        route = sh("ip", "-6", "route", "get", "fd09:2::7", ns=ns).stdout
        assert "dev esp0" in route and "src fd09:1::1" in route, route
        other = sh("ip", "-6", "route", "get", OUTER[6][1], ns=ns).stdout
        assert "fd09:1::1" not in other and "dev eth0" in other, other
        addrs = sh("ip", "-6", "addr", "show", "dev", "esp0", ns=ns).stdout
        assert "fd09:1::1/128" in addrs and "tentative" not in addrs, addrs
        assert "deprecated" in addrs and "nodad" in addrs, addrs
        assert lab.ping("a", "fd09:2::1")

        before = _snapshot(ns)
        a.proc.send_signal(signal.SIGKILL)  # a crash: nothing cleaned up by a
        a.proc.wait()
        state = lab.dir / "a-state"
        assert any(state.iterdir()), "no state file was left to clean up with"
        a2 = lab.start("a", (lab.dir / "a.toml").read_text())
        assert lab.ping("a", "fd09:2::1"), a2.output()
        assert a2.stop() == 0, a2.output()
        assert b.stop() == 0
        after = _snapshot(ns)
        assert "esp0" not in after["links"], after
        assert after["routes"] == before["routes_without_tunnel"], (before, after)
        # What was installed is gone; the sequence reservations stay (see seqguard).
        assert [p.name for p in state.iterdir()] == ["esp0.seq.json"]
        assert not os.path.exists(a2.control)


def _snapshot(ns: str) -> dict:
    links = {link["ifname"] for link in json.loads(sh("ip", "-j", "link", ns=ns).stdout)}
    routes = set()
    for fam in ("-4", "-6"):
        for r in json.loads(sh("ip", "-j", fam, "route", "show", "table", "all",
                               ns=ns).stdout):
            routes.add((r.get("dst"), r.get("dev"), r.get("gateway"), r.get("table", "")))
    # eth0's own link-local address gets its local route when its DAD ends, about
    # a second after the lab starts: before or after the first snapshot.
    without = {r for r in routes if r[1] != "esp0" and not (r[0] or "").startswith("fe80:")}
    return {"links": links, "routes": without, "routes_without_tunnel": without}


def test_nat_traversal_and_mapping_on_rebinding():
    with Lab("nat", nat=True) as lab:
        k = keys()
        nat_pub = "198.51.100.1"
        a = lab.start("a", tunnel_config("a", 4, True, *k, local="10.0.1.2",
                                         remote="198.51.100.2", extra="nat_keepalive = 0"))
        b = lab.start("b", tunnel_config("b", 4, True, *k, local="198.51.100.2",
                                         remote=nat_pub))
        # b sends to the NAT's public address; its SAs say port 4500 at first.
        assert lab.ping("a", INNER["b"][0]), a.output() + b.output()
        monitor = subprocess.Popen(
            ["ip", "netns", "exec", b.ns, sys.executable, "-m", "espdp", "xfrm", "--control",
             b.control, "--json", "monitor", "mapping"],
            stdout=subprocess.PIPE, text=True, env=_env())
        try:
            time.sleep(0.5)
            # Rebinding: the NAT forgets the mapping; the next packet gets another port.
            lab.rebind("20000-20099")
            sh("ping", "-c", "1", "-W", "1", INNER["b"][0], ns=lab.ns["a"], check=False)
            event = json.loads(_readline(monitor, 10))
        finally:
            monitor.kill()
            monitor.wait()
        assert event["type"] == "mapping"
        new_port = event["new"]["port"]
        assert event["new"]["addr"] == nat_pub and 20000 <= new_port <= 20099, event
        assert event["old"]["port"] == 4500
        # The IKE daemon's answer: b sends to where a really is now.
        key_ba = k[1]
        b.espdp("xfrm", "state", "update", "src", "198.51.100.2", "dst", nat_pub, "proto",
                "esp", "spi", "0xb0a0", "reqid", "1", "mode", "tunnel", "aead",
                "rfc4106(gcm(aes))", key_ba, "128", "encap", "espinudp", "4500",
                str(new_port), "0.0.0.0")
        assert lab.ping("a", INNER["b"][0]), b.output()
        assert lab.transfer("a", "b", INNER["b"][0], MIB)["bytes"] == MIB


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise AssertionError(f"no event within {timeout}s")
    return proc.stdout.readline()


def _env() -> dict:
    from espdp.lab import python_env

    return python_env()


def test_set_mark_reaches_the_kernel_only_for_its_sa():
    """b's inbound SA for inner IPv4 has set-mark 0x42, the one for inner IPv6
    none: an `ip rule fwmark 0x42` steers the first (into a table that still
    delivers locally) and an nftables counter on `meta mark` sees only it."""
    with Lab("mark") as lab:
        k, k6 = keys(), keys()
        a = lab.start("a", tunnel_config("a", 4, True, *k, set_mark=0x42, v6_keys=tuple(k6)))
        b = lab.start("b", tunnel_config("b", 4, True, *k, set_mark=0x42, v6_keys=tuple(k6)))
        ns_b = lab.ns["b"]
        sh("ip", "-4", "rule", "add", "fwmark", "0x42", "lookup", "142", ns=ns_b)
        sh("ip", "-6", "rule", "add", "fwmark", "0x42", "lookup", "142", ns=ns_b)
        sh("nft", "-f", "-", ns=ns_b, input=(
            "table inet m {\n chain in { type filter hook input priority 0;\n"
            "  meta mark 0x42 ip saddr 10.9.1.1 counter\n"
            "  meta mark 0x42 ip6 saddr fd09:1::1 counter\n"
            "  meta mark 0 ip6 saddr fd09:1::1 counter\n }\n}\n"))
        assert lab.ping("a", INNER["b"][0], count=5), a.output() + b.output()
        assert lab.ping("a", INNER["b"][1], count=4), a.output() + b.output()
        marked4, marked6, unmarked6 = _counters(ns_b)
        assert marked4 >= 5 and marked6 == 0 and unmarked6 >= 4, _counters(ns_b)
        counters = b.status()["counters"]
        assert counters["injected"] == marked4, counters
        # Steering: the fwmark rule goes before the local table (moved from
        # preference 0 to 100) and its table sends 10.9.2.1 and fd09:2::1 nowhere:
        # the marked SA's packets are lost, the unmarked ones still arrive.
        for fam, dst in (("-4", "10.9.2.1/32"), ("-6", "fd09:2::1/128")):
            sh("ip", fam, "rule", "add", "pref", "100", "lookup", "local", ns=ns_b)
            sh("ip", fam, "rule", "del", "pref", "0", "lookup", "local", ns=ns_b)
            sh("ip", fam, "rule", "del", "fwmark", "0x42", "lookup", "142", ns=ns_b)
            sh("ip", fam, "rule", "add", "pref", "10", "fwmark", "0x42", "lookup", "142",
               ns=ns_b)
            sh("ip", fam, "route", "add", "prohibit", dst, "table", "142", ns=ns_b)
        assert not lab.ping("a", INNER["b"][0], count=2)
        assert lab.ping("a", INNER["b"][1], count=2)


def _counters(ns: str) -> list[int]:
    text = sh("nft", "list", "table", "inet", "m", ns=ns).stdout
    return [int(n) for n in re.findall(r"counter packets (\d+)", text)]


def test_acquire_answered_through_the_cli():
    with Lab("acq") as lab:
        k = keys()
        configs = {side: tunnel_config(side, 4, True, *k) for side in ("a", "b")}
        # a starts with its policies only: no SA.
        no_sa = re.sub(r"\[\[sa\]\]\n(?:[^\[\n][^\n]*\n)*\n", "", configs["a"])
        assert "[[sa]]" not in no_sa
        a = lab.start("a", no_sa)
        lab.start("b", configs["b"])
        monitor = subprocess.Popen(
            ["ip", "netns", "exec", a.ns, sys.executable, "-m", "espdp", "xfrm", "--control",
             a.control, "--json", "monitor", "acquire"], stdout=subprocess.PIPE, text=True,
            env=_env())
        try:
            time.sleep(0.5)
            sh("ping", "-c", "1", "-W", "1", INNER["b"][0], ns=lab.ns["a"], check=False)
            acquire = json.loads(_readline(monitor, 10))
        finally:
            monitor.kill()
            monitor.wait()
        assert acquire["type"] == "acquire" and acquire["sel"]["dst"].startswith("10.9.2.1")
        # The "IKE daemon": allocspi for the inbound SA, then the SAs.
        got = json.loads(a.espdp("xfrm", "--json", "state", "allocspi", "src", "192.0.2.2",
                                 "dst", "192.0.2.1", "proto", "esp", "mode", "tunnel",
                                 "reqid", "2", "min", "0xb0a0", "max", "0xb0a0").stdout)
        assert got["spi"] == "0x0000b0a0" and got["state"] == "larval"
        common = ["proto", "esp", "mode", "tunnel", "aead", "rfc4106(gcm(aes))"]
        a.espdp("xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "spi",
                "0xa0b0", "reqid", "1", *common, k[0], "128", "encap", "espinudp", "4500",
                "4500", "0.0.0.0", "seq", str(acquire["seq"]))
        a.espdp("xfrm", "state", "update", "src", "192.0.2.2", "dst", "192.0.2.1", "spi",
                "0xb0a0", "reqid", "2", *common, k[1], "128", "encap", "espinudp", "4500",
                "4500", "0.0.0.0")
        text = a.espdp("xfrm", "state", "list").stdout
        assert "spi 0x0000a0b0" in text and "0x" + k[0][2:] not in text  # no keys shown
        assert lab.ping("a", INNER["b"][0]), a.output()
        status = a.espdp("status").stdout
        assert "spi 0x0000a0b0" in status and "packets" in status


def test_path_mtu_icmp_back_through_the_tun():
    with Lab("pmtu") as lab:
        _pair(lab, 4, extra_a="mtu = 1500", extra_b="mtu = 1500")
        v4 = sh("ping", "-c", "2", "-M", "do", "-s", "1472", "-W", "1", INNER["b"][0],
                ns=lab.ns["a"], check=False)
        found = re.search(r"mtu ?= ?(\d+)", v4.stdout + v4.stderr)
        assert found, v4.stdout + v4.stderr
        mtu4 = int(found.group(1))
        assert 1400 <= mtu4 < 1500
        # What fits gets through: the largest ping for that MTU.
        assert sh("ping", "-c", "1", "-M", "do", "-s", str(mtu4 - 28), "-W", "2",
                  INNER["b"][0], ns=lab.ns["a"], check=False).returncode == 0
        v6 = sh("ping", "-6", "-c", "2", "-M", "do", "-s", "1452", "-W", "1", INNER["b"][1],
                ns=lab.ns["a"], check=False)
        found = re.search(r"mtu ?[=:] ?(\d+)", v6.stdout + v6.stderr)
        assert found, v6.stdout + v6.stderr
        assert 1280 <= int(found.group(1)) < 1500


def test_metrics_endpoint_reports_engine_counters():
    with Lab("metrics") as lab:
        _pair(lab, 4, extra_a='metrics = "127.0.0.1:9450"')
        assert lab.ping("a", INNER["b"][0], count=3)
        time.sleep(1.2)  # one snapshot interval
        text = sh(sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                  "'http://127.0.0.1:9450/metrics', timeout=5).read().decode())",
                  ns=lab.ns["a"]).stdout
        packets = re.search(r'espdp_sa_packets_total\{[^}]*spi="0x0000a0b0"[^}]*\} (\S+)', text)
        assert packets and float(packets.group(1)) >= 3, text
        assert re.search(r"^espdp_up 1\.0$", text, re.M)
        assert "espdp_packets_total{path=\"tun_in\"}" in text


def test_keys_appear_nowhere_a_running_daemon_writes():
    """Keys in a config never show in the log, status, monitor events, list output,
    metrics or the state files; only `--show-keys` reveals them."""
    with Lab("keys") as lab:
        k = keys()
        a = lab.start("a", tunnel_config("a", 4, True, *k, extra='metrics = "127.0.0.1:9451"'),
                      "-v")
        lab.start("b", tunnel_config("b", 4, True, *k))
        monitor = subprocess.Popen(
            ["ip", "netns", "exec", a.ns, sys.executable, "-m", "espdp", "xfrm", "--control",
             a.control, "--json", "monitor"], stdout=subprocess.PIPE, text=True, env=_env())
        try:
            time.sleep(0.5)
            assert lab.ping("a", INNER["b"][0])
            a.espdp("xfrm", "state", "update", "src", "192.0.2.1", "dst", "192.0.2.2", "proto",
                    "esp", "spi", "0xa0b0", "reqid", "1", "mode", "tunnel", "aead",
                    "rfc4106(gcm(aes))", k[0], "128", "encap", "espinudp", "4500", "4500",
                    "0.0.0.0", "limit", "time-soft", "1000")
            bad = a.espdp("xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2",
                          "proto", "esp", "spi", "0xa0b0", "mode", "tunnel", "aead",
                          "rfc4106(gcm(aes))", k[0], "128", check=False)
            assert bad.returncode == 2 and "EEXIST" in bad.stderr
            event = _readline(monitor, 10)
        finally:
            monitor.kill()
            monitor.wait()
        outputs = {
            "event": event,
            "list": a.espdp("xfrm", "state", "list").stdout,
            "list --json": a.espdp("xfrm", "--json", "state", "list").stdout,
            "status": a.espdp("status", "--json").stdout,
            "error": bad.stdout + bad.stderr,
            "metrics": sh(sys.executable, "-c", "import urllib.request; print(urllib.request."
                          "urlopen('http://127.0.0.1:9451/metrics', timeout=5).read().decode())",
                          ns=a.ns).stdout,
        }
        # The check can see a key: asked for explicitly, it is there.
        shown = a.espdp("xfrm", "--show-keys", "state", "list").stdout
        assert k[0][2:].lower() in shown.lower()
        assert a.stop() == 0
        outputs["log"] = a.output()
        outputs.update({p.name: p.read_text() for p in (lab.dir / "a-state").iterdir()})
        for key in k:
            secret = key[2:].lower()
            for name, text in outputs.items():
                assert secret not in text.lower(), f"a key shows in {name}"


_SPREAD = r"""
import socket, sys
addr, n = sys.argv[1], int(sys.argv[2])
for i in range(n):                      # a flow (source port) each: spread over TUN queues
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"flow %d" % i, (addr, 9))
    s.close()
"""


@pytest.mark.parametrize("encap", [True, False], ids=["udp", "raw-esp"])
def test_two_workers_share_the_sas(encap):
    """``workers = 2``: a multi-queue TUN, a second UDP socket (SO_REUSEPORT) or a
    send-only raw socket; traffic both ways is checked, the flows spread over
    both workers' TUN queues, and one SA's numbers stay one sequence."""
    extra = "workers = 2" + ("" if encap else "\nraw_esp = true")
    with Lab("e2e") as lab:
        a, b = _pair(lab, 4, encap, extra, extra)
        for idx in (0, 1):
            target = INNER["b"][idx]
            assert lab.ping("a", target), f"ping {target} failed:\n{a.output()}"
            assert lab.transfer("a", "b", target, 2 * MIB)["bytes"] == 2 * MIB
            assert lab.transfer("b", "a", INNER["a"][idx], MIB)["bytes"] == MIB
        sh(sys.executable, "-c", _SPREAD, INNER["b"][0], "32", ns=lab.ns["a"])
        time.sleep(0.5)
        status = a.status()
        workers = status["workers"]
        assert len(workers) == 2 and any(name.startswith("worker 1 ")
                                         for name in status["devices"]), status["devices"]
        # 32 flows more: all on one queue would be one chance in 2^32
        assert all(w["tun_in"] > 0 for w in workers), workers
        assert status["counters"]["tun_in"] == sum(w["tun_in"] for w in workers)
        sa_a = {sa["spi"]: sa for sa in status["sas"]}
        sa_b = {sa["spi"]: sa for sa in b.status()["sas"]}
        # every number a's workers handed out arrived once at b: no drop, no replay
        assert sa_a["0x0000a0b0"]["oseq"] == sa_a["0x0000a0b0"]["packets"]
        assert sa_b["0x0000a0b0"]["packets"] == sa_a["0x0000a0b0"]["packets"]
        assert not sa_b["0x0000a0b0"]["drops"], sa_b["0x0000a0b0"]
        for d in (a, b):
            assert d.stop() == 0, d.output()

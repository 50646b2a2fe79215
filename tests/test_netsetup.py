"""NetSetup in a network namespace: addresses, src routes, peer host routes, crash cleanup.

Each test gets its own namespace with a veth "uplink" (global IPv4/IPv6
addresses, default routes via a gateway on the link) and a persistent TUN
``esp0`` (no holder process: NO-CARRIER, which is also where a non-NODAD IPv6
address would stay tentative forever).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from espdp.errors import ConfigError

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root and /dev/net/tun")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_counter = itertools.count()
VIP6, VIP4 = "fd09:1::1", "10.9.0.1"
PEER6, PEER4 = "2001:db8:99::1", "198.51.100.7"


def ip(ns, *args, check=True):
    res = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, timeout=10)
    if check:
        assert res.returncode == 0, (args, res.stderr)
    return res.stdout


def ipj(ns, *args):
    return json.loads(ip(ns, "-j", *args) or "[]")


def route_get(ns, dst):
    return ip(ns, "-6" if ":" in dst else "-4", "route", "get", dst)


def snapshot(ns):
    """Addresses on esp0 and every route (both families, all tables), lifetimes left out.

    Left out too: ff00::/8 on esp0, which the kernel adds when the device gets its
    first IPv6 address and keeps after the last one goes (not ours to remove).
    """
    addrs = sorted((a["local"], a["prefixlen"])
                   for dev in json.loads(ip(ns, "-j", "addr", "show", "dev", "esp0", check=False)
                                         or "[]")
                   for a in dev.get("addr_info", []))
    routes = sorted(json.dumps({k: v for k, v in r.items() if k not in ("expires",)},
                               sort_keys=True)
                    for fam in ("-4", "-6") for r in ipj(ns, fam, "route", "show", "table", "all")
                    if r.get("type") != "multicast")
    return addrs, routes


@pytest.fixture
def ns():
    name = f"espdp-ns-{os.getpid()}-{next(_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "up0", "type", "veth", "peer", "name", "up0p"],
                    ["link", "set", "up0", "up"], ["link", "set", "up0p", "up"],
                    ["-6", "addr", "add", "2001:db8::2/64", "dev", "up0", "nodad"],
                    ["-6", "route", "add", "default", "via", "2001:db8::1", "dev", "up0"],
                    ["addr", "add", "192.0.2.2/24", "dev", "up0"],
                    ["route", "add", "default", "via", "192.0.2.1"],
                    ["tuntap", "add", "dev", "esp0", "mode", "tun"],
                    ["link", "set", "esp0", "up"]):
            ip(name, *cmd)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def setup(ns, tmp_path):
    from espdp.netsetup import NetSetup

    made = []

    def make(**kwargs):
        n = NetSetup("esp0", state_dir=str(tmp_path / "state"), netns=ns, **kwargs)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


def test_ipv6_virtual_ip_deprecated_and_src_route(ns, setup, tmp_path):
    n = setup()
    n.add_address(f"{VIP6}/128")
    info = ip(ns, "-6", "addr", "show", "dev", "esp0")
    assert VIP6 in info and "nodad" in info and "deprecated" in info
    assert "tentative" not in info
    n.add_route("fd00:5::/64")
    via_tun = route_get(ns, "fd00:5::9")
    assert f"src {VIP6}" in via_tun and "dev esp0" in via_tun
    # a ULA destination through the uplink: RFC 6724 alone might pick the ULA VIP
    ip(ns, "-6", "route", "add", "fd77::/16", "via", "2001:db8::1")
    for other in ("fd77::1", "2001:db8:5::1"):
        out = route_get(ns, other)
        assert "dev up0" in out and "src 2001:db8::2" in out and VIP6 not in out, out
    state = json.loads((tmp_path / "state" / "esp0.json").read_text())
    assert state["pid"] == os.getpid()
    assert [a["cidr"] for a in state["addresses"]] == [f"{VIP6}/128"]
    assert state["routes"][0]["dst"] == "fd00:5::/64" and state["routes"][0]["src"] == VIP6
    assert os.stat(tmp_path / "state").st_mode & 0o777 == 0o700
    assert os.stat(tmp_path / "state" / "esp0.json").st_mode & 0o777 == 0o600
    n.teardown()


def test_label_and_plain_modes(ns, setup):
    n = setup(address_mode="label")
    n.add_address(f"{VIP6}/128")
    info = ip(ns, "-6", "addr", "show", "dev", "esp0")
    assert "nodad" in info and "deprecated" not in info and "tentative" not in info
    assert f"prefix {VIP6}/128 label {0xE5D0}" in ip(ns, "addrlabel", "list")
    n.add_route("fd00:5::/64")
    assert f"src {VIP6}" in route_get(ns, "fd00:5::9")
    ip(ns, "-6", "route", "add", "fd77::/16", "via", "2001:db8::1")
    assert "src 2001:db8::2" in route_get(ns, "fd77::1")
    n.teardown()
    assert "label 58832" not in ip(ns, "addrlabel", "list")
    p = setup(address_mode="plain")
    p.add_address(f"{VIP6}/128")
    info = ip(ns, "-6", "addr", "show", "dev", "esp0")
    assert "nodad" in info and "deprecated" not in info and "tentative" not in info
    p.teardown()
    with pytest.raises(ConfigError, match="address mode"):
        setup(address_mode="bogus")


def test_ipv4_address_and_src_route(ns, setup):
    n = setup()
    n.add_address(f"{VIP4}/32")
    assert f"inet {VIP4}/32" in ip(ns, "-4", "addr", "show", "dev", "esp0")
    n.add_route("10.20.0.0/16")
    out = route_get(ns, "10.20.3.4")
    assert f"src {VIP4}" in out and "dev esp0" in out
    out = route_get(ns, "203.0.113.9")
    assert "dev up0" in out and "src 192.0.2.2" in out
    n.teardown()


def test_peer_exclusion(ns, setup):
    n = setup()
    n.add_address(f"{VIP6}/128")
    n.add_address(f"{VIP4}/32")
    assert n.exclude_peer(PEER6) is False  # nothing covers it yet
    assert n.exclude_peer(PEER4) is False
    n.add_route("::/0", metric=10)  # everything, ahead of the uplink default route
    n.add_route("0.0.0.0/1")
    n.add_route("128.0.0.0/1")
    for peer in (PEER6, PEER4):
        out = route_get(ns, peer)
        assert "dev up0" in out and "esp0" not in out, out
    assert "dev esp0" in route_get(ns, "2001:db8:77::1")
    assert "dev esp0" in route_get(ns, "203.0.113.1")
    assert f"src {VIP4}" in route_get(ns, "8.8.8.8")
    peer_routes = {r["dst"]: r for r in n.state["peer_routes"]}
    assert set(peer_routes) == {f"{PEER6}/128", f"{PEER4}/32"}
    assert peer_routes[f"{PEER6}/128"]["gateway"] == "2001:db8::1"
    # a late call on a peer the tunnel already covers is refused
    with pytest.raises(ConfigError, match="exclude_peer before add_route"):
        n.exclude_peer("2001:db8:42::1")
    assert "dev esp0" in route_get(ns, "2001:db8:42::1")
    n.teardown()
    assert "dev up0" in route_get(ns, PEER6) and PEER6 not in ip(ns, "-6", "route")


def test_teardown_removes_everything(ns, setup, tmp_path):
    before = snapshot(ns)
    n = setup()
    n.add_address(f"{VIP6}/128")
    n.add_address(f"{VIP4}/32")
    n.exclude_peer(PEER6)
    n.exclude_peer(PEER4)
    n.add_route("2001:db8:90::/44")  # covers PEER6
    n.add_route("10.20.0.0/16")  # does not cover PEER4: no host route for it
    assert PEER4 not in ip(ns, "-4", "route")
    assert snapshot(ns) != before
    removed = n.teardown()
    assert removed["peer_routes"] == [f"{PEER6}/128"]
    assert sorted(removed["routes"]) == ["10.20.0.0/16", "2001:db8:90::/44"]
    after = snapshot(ns)
    assert after[0] == before[0]
    assert set(after[1]) ^ set(before[1]) == set()
    assert not (tmp_path / "state" / "esp0.json").exists()
    assert n.teardown() == {"routes": [], "peer_routes": [], "labels": [], "addresses": [],
                            "device": []}
    # the device vanishing first (a non-persistent TUN) is not an error
    n.add_address(f"{VIP6}/128")
    n.exclude_peer(PEER6)
    n.add_route("2001:db8:90::/44")
    ip(ns, "link", "del", "esp0")
    removed = n.teardown()
    assert removed["peer_routes"] == [f"{PEER6}/128"] and removed["addresses"] == []
    assert PEER6 not in ip(ns, "-6", "route")


def test_errors_are_config_errors(ns, setup):
    n = setup()
    n.add_address(f"{VIP6}/128")
    with pytest.raises(ConfigError, match=r"cannot add address fd09:1::1/128 on esp0: "
                                          r"File exists"):
        n.add_address(f"{VIP6}/128")
    with pytest.raises(ConfigError, match="bad address"):
        n.add_address("not-an-address")
    with pytest.raises(ConfigError, match="different families"):
        n.add_route("10.0.0.0/8", src=VIP6)
    n.teardown()
    from espdp.netsetup import NetSetup
    with pytest.raises(ConfigError, match="device nope0 does not exist"):
        NetSetup("nope0", state_dir="/nonexistent-espdp", netns=ns).add_address("10.1.1.1/32")


CHILD = textwrap.dedent("""
    import sys, time
    from espdp.netsetup import NetSetup
    n = NetSetup("esp0", state_dir=sys.argv[1], address_mode=sys.argv[2])
    n.add_address("fd09:1::1/128")
    n.add_address("10.9.0.1/32")
    n.exclude_peer("2001:db8:99::1")
    n.add_route("::/0", metric=10)
    n.add_route("10.20.0.0/16")
    n.record_device()
    print("READY", flush=True)
    time.sleep(60)
""")

CLEANUP = textwrap.dedent("""
    import json, sys
    from espdp.errors import ConfigError
    from espdp.netsetup import cleanup_stale
    try:
        print(json.dumps(cleanup_stale("esp0", sys.argv[1])))
    except ConfigError as exc:
        print("CONFIGERROR", exc)
""")


def _in_ns(ns, code, *args, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **kwargs)


def _cleanup_in_new_process(ns, state_dir):
    proc = _in_ns(ns, CLEANUP, state_dir)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return out.strip()


@pytest.mark.parametrize("mode", ["deprecated", "label"])
def test_crash_then_cleanup_stale(ns, tmp_path, mode):
    before = snapshot(ns)
    labels_before = ip(ns, "addrlabel", "list")
    state_dir = str(tmp_path / "state")
    child = _in_ns(ns, CHILD, state_dir, mode)
    try:
        line = child.stdout.readline()
        assert line.strip() == "READY", child.stderr.read()
        # a live owner: refused, and nothing is touched
        out = _cleanup_in_new_process(ns, state_dir)
        assert out == f"CONFIGERROR another espdp owns esp0 (pid {child.pid})"
        with pytest.raises(ConfigError, match=f"another espdp owns esp0 \\(pid {child.pid}\\)"):
            from espdp.netsetup import cleanup_stale
            cleanup_stale("esp0", state_dir, netns=ns)
        assert PEER6 in ip(ns, "-6", "route")
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    # teardown never ran: everything is still there, including the peer host route
    assert PEER6 in ip(ns, "-6", "route") and VIP6 in ip(ns, "-6", "addr")
    removed = json.loads(_cleanup_in_new_process(ns, state_dir))
    assert removed["peer_routes"] == [f"{PEER6}/128"]
    assert sorted(removed["routes"]) == ["10.20.0.0/16", "::/0"]
    assert sorted(removed["addresses"]) == ["10.9.0.1/32", f"{VIP6}/128"]
    assert removed["device"] == ["esp0"]  # recorded as created by the daemon
    assert removed["labels"] == ([f"{VIP6}/128"] if mode == "label" else [])
    assert not os.path.exists(os.path.join(state_dir, "esp0.json"))
    assert "esp0" not in ip(ns, "link")
    assert PEER6 not in ip(ns, "-6", "route")
    assert ip(ns, "addrlabel", "list") == labels_before
    addrs, routes = before
    assert snapshot(ns)[1] == [r for r in routes if '"esp0"' not in r]
    # a second run finds nothing to do
    assert json.loads(_cleanup_in_new_process(ns, state_dir))["routes"] == []


def test_stale_state_of_unrelated_pid(ns, setup, tmp_path):
    """A recorded pid now used by a process that is not the owner counts as dead."""
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    idx = ipj(ns, "link", "show", "esp0")[0]["ifindex"]
    ip(ns, "addr", "add", "10.9.0.1/32", "dev", "esp0")
    (state_dir / "esp0.json").write_text(json.dumps({
        "version": 1, "pid": 1, "start_time": -1, "ifname": "esp0", "ifindex": idx,
        "addresses": [{"cidr": "10.9.0.1/32"}], "routes": [], "peer_routes": [],
        "labels": []}))
    n = setup()  # construction cleans up first
    assert n.stale_removed["addresses"] == ["10.9.0.1/32"]
    assert "10.9.0.1" not in ip(ns, "addr", "show", "dev", "esp0")
    assert not (state_dir / "esp0.json").exists()

"""A two-host lab in network namespaces: the README's main command and the
end-to-end tests run real ``espdp run`` processes in it.

:class:`Lab` makes uniquely named namespaces joined by veth pairs (and, for
the NAT case, a router namespace with nftables masquerade between them),
starts one daemon per host, and removes everything again, processes first,
also when something failed.  Traffic never leaves those namespaces.

``espdp lab`` (``make demo``) runs :func:`main`: a tunnel over outer IPv4
and one over outer IPv6, each carrying inner IPv4 and IPv6 (ping and a TCP
transfer checked byte for byte), then the same transfer over the plain veth
for comparison, and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
OUTER = {4: ("192.0.2.1", "192.0.2.2", 24), 6: ("2001:db8:e5::1", "2001:db8:e5::2", 64)}
INNER = {"a": ("10.9.1.1", "fd09:1::1", "10.9.1.0/24", "fd09:1::/64"),
         "b": ("10.9.2.1", "fd09:2::1", "10.9.2.0/24", "fd09:2::/64")}
AEAD = "rfc4106(gcm(aes))"
_counter = 0


class LabError(RuntimeError):
    """A lab step failed; the message says which and shows the command's output."""


def sh(*argv: str, ns: Optional[str] = None, check: bool = True, timeout: float = 30,
       input: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run a command (in namespace ``ns``); LabError with its output when it fails."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(cmd)} failed ({proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class Daemon:
    """One ``espdp run`` process in a namespace."""

    ns: str
    name: str
    proc: subprocess.Popen
    control: str
    log: Path
    argv: list = field(default_factory=list)

    def espdp(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """An ``espdp`` CLI command against this daemon (``--control`` added)."""
        return sh(sys.executable, "-m", "espdp", *argv[:1], "--control", self.control,
                  *argv[1:], ns=self.ns, check=check)

    def status(self) -> dict:
        return json.loads(self.espdp("status", "--json").stdout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Lab:
    """Namespaces, links and daemons, all removed by :meth:`close`."""

    def __init__(self, tag: str = "lab", nat: bool = False) -> None:
        global _counter
        _counter += 1
        self.id = f"{tag}{os.getpid() % 100000}x{_counter}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"espdp-{self.id}-"))
        self.ns = {"a": f"espdp-{self.id}-a", "b": f"espdp-{self.id}-b"}
        if nat:
            self.ns["nat"] = f"espdp-{self.id}-n"
        self.daemons: list[Daemon] = []
        self.nat = nat
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _build(self) -> None:
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        a, b = self.ns["a"], self.ns["b"]
        if not self.nat:
            self._veth(a, "eth0", b, "eth0")
            for fam, (addr_a, addr_b, plen) in OUTER.items():
                self._addr(a, "eth0", f"{addr_a}/{plen}", fam)
                self._addr(b, "eth0", f"{addr_b}/{plen}", fam)
            return
        # a (10.0.1.2) -- nat (10.0.1.1 | 198.51.100.1, masquerade) -- b (198.51.100.2)
        n = self.ns["nat"]
        self._veth(a, "eth0", n, "in0")
        self._veth(n, "out0", b, "eth0")
        self._addr(a, "eth0", "10.0.1.2/24", 4)
        self._addr(n, "in0", "10.0.1.1/24", 4)
        self._addr(n, "out0", "198.51.100.1/24", 4)
        self._addr(b, "eth0", "198.51.100.2/24", 4)
        sh("ip", "route", "add", "default", "via", "10.0.1.1", ns=a)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=n)
        self.masquerade()

    def masquerade(self, ports: Optional[str] = None) -> None:
        """(Re)write the NAT's ruleset: masquerade out of out0, to ``ports`` if given."""
        to = f" meta l4proto {{ tcp, udp }} masquerade to :{ports}" if ports else " masquerade"
        sh("nft", "-f", "-", ns=self.ns["nat"], input=(
            "flush ruleset\n"
            "table ip nat {\n chain post { type nat hook postrouting priority 100;\n"
            f"  oifname \"out0\"{to}\n }}\n}}\n"))

    def rebind(self, ports: str) -> None:
        """Make the NAT forget its mappings and map to ``ports`` from now on."""
        self.masquerade(ports)
        sh("conntrack", "-D", "-p", "udp", ns=self.ns["nat"], check=False)

    @staticmethod
    def _veth(ns1: str, if1: str, ns2: str, if2: str) -> None:
        tmp1, tmp2 = f"v{os.getpid() % 10000}{_counter}a", f"v{os.getpid() % 10000}{_counter}b"
        sh("ip", "link", "add", tmp1, "type", "veth", "peer", "name", tmp2)
        sh("ip", "link", "set", tmp1, "netns", ns1, "name", if1)
        sh("ip", "link", "set", tmp2, "netns", ns2, "name", if2)
        sh("ip", "link", "set", if1, "up", ns=ns1)
        sh("ip", "link", "set", if2, "up", ns=ns2)

    @staticmethod
    def _addr(ns: str, dev: str, cidr: str, family: int) -> None:
        sh("ip", "addr", "add", cidr, "dev", dev, *(["nodad"] if family == 6 else []), ns=ns)

    # ------------------------------------------------------------ daemons

    def start(self, side: str, config: str, *extra: str, name: str = "esp0",
              wait: float = 20) -> Daemon:
        """``espdp run`` in namespace ``side`` with the TOML ``config``; returns once
        its control socket answers."""
        ns = self.ns[side]
        path = self.dir / f"{side}.toml"
        path.write_text(config)
        path.chmod(0o600)
        control = str(self.dir / f"{side}.sock")
        log = self.dir / f"{side}.log"
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "espdp", "run", "--config",
                str(path), "--control", control, "--state-dir", str(self.dir / f"{side}-state"),
                *extra]
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    env=python_env(), start_new_session=True)
        daemon = Daemon(ns, name, proc, control, log, argv)
        self.daemons.append(daemon)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"espdp run in {side} exited {proc.returncode}:\n"
                               f"{daemon.output()}")
            if os.path.exists(control) and daemon.espdp("status", check=False).returncode == 0:
                return daemon
            time.sleep(0.1)
        raise LabError(f"espdp run in {side} did not answer in {wait}s:\n{daemon.output()}")

    def close(self) -> None:
        for daemon in self.daemons:
            try:
                daemon.stop()
            except Exception:  # noqa: BLE001 - the namespaces must go anyway
                pass
        for ns in self.ns.values():
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        for path in sorted(self.dir.rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() else path.rmdir()
        if self.dir.exists():
            self.dir.rmdir()

    # ------------------------------------------------------------ traffic

    def ping(self, side: str, addr: str, count: int = 3) -> bool:
        proc = sh("ping", "-c", str(count), "-i", "0.2", "-W", "2", addr, ns=self.ns[side],
                  check=False, timeout=30)
        return proc.returncode == 0

    def transfer(self, client: str, server: str, addr: str, nbytes: int,
                 port: int = 5201, seconds: float = 0, timeout: float = 120) -> dict:
        """Send ``nbytes`` of random data over TCP from ``client`` to ``addr`` (in
        ``server``); the receiver's SHA-256 must match.  ``seconds``: spread the
        sending over at least that long (a stream that outlasts a fault).  Returns
        seconds and Mbit/s."""
        srv = subprocess.Popen(["ip", "netns", "exec", self.ns[server], sys.executable, "-c",
                                _SERVER, addr, str(port), str(timeout)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if srv.stdout.readline().strip() != "ready":
                raise LabError(f"TCP server on {addr}: {srv.stderr.read()}")
            out = sh(sys.executable, "-c", _CLIENT, addr, str(port), str(nbytes), str(seconds),
                     str(timeout), ns=self.ns[client], timeout=timeout + 30).stdout.split()
            got = srv.stdout.readline().split()
            srv.wait(10)
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
        sent_hash, seconds = out[0], float(out[1])
        if not got or got[0] != sent_hash or int(got[1]) != nbytes:
            raise LabError(f"TCP transfer to {addr}: content differs ({got} vs {out})")
        return {"bytes": nbytes, "seconds": seconds, "mbit_s": nbytes * 8 / seconds / 1e6}


_SERVER = r"""
import hashlib, socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(float(sys.argv[3])); h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 16)
    if not d: break
    h.update(d); n += len(d)
print(h.hexdigest(), n, flush=True)
"""

_CLIENT = r"""
import hashlib, os, socket, sys, time
addr, port, n, spread = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
block = os.urandom(1 << 16); h = hashlib.sha256()
s = socket.create_connection((addr, port), timeout=float(sys.argv[5]))
t = time.perf_counter(); left = n
while left:
    d = block[:min(left, len(block))]; s.sendall(d); h.update(d); left -= len(d)
    if spread:  # at least ``spread`` seconds in all
        time.sleep(max(0.0, t + spread * (n - left) / n - time.perf_counter()))
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(h.hexdigest(), time.perf_counter() - t)
"""


# ---------------------------------------------------------------- configurations

def keys(n: int = 2) -> list[str]:
    """Fresh random AES-128-GCM keys with salt (never reused across runs)."""
    return ["0x" + os.urandom(20).hex() for _ in range(n)]


def tunnel_config(side: str, outer: int = 4, encap: bool = True, key_ab: str = "",
                  key_ba: str = "", local: Optional[str] = None, remote: Optional[str] = None,
                  set_mark: Optional[int] = None, remote_port: int = 4500,
                  extra: str = "", v6_keys: Optional[tuple] = None) -> str:
    """The TOML of one host of the lab: TUN esp0 with the host's inner addresses,
    routes to the other host's, one SA each way (tunnel mode, AES-GCM, over
    outer ``outer``, UDP-encapsulated if ``encap``) and policies for inner
    IPv4 and IPv6.  ``set_mark`` goes on the inbound SA.  With ``v6_keys``
    (two more keys) inner IPv6 has SAs of its own (SPIs ending in 6, reqids 3
    and 4, never a set-mark), so two SAs can be told apart."""
    other = "b" if side == "a" else "a"
    a_out, b_out, _ = OUTER[outer]
    local = local or (a_out if side == "a" else b_out)
    remote = remote or (b_out if side == "a" else a_out)
    mine, theirs = INNER[side], INNER[other]
    lines = ["[tunnel]", 'tun = "esp0"',
             f'address = ["{mine[0]}/32", "{mine[1]}/128"]',
             f'route = ["{theirs[2]}", "{theirs[3]}"]', extra, ""]
    groups = [((0, 1) if v6_keys is None else (0,), 0xA0B0, 0xB0A0, 1, key_ab, key_ba,
               set_mark)]
    if v6_keys is not None:
        groups.append(((1,), 0xA0B6, 0xB0A6, 3, *v6_keys, None))
    for families, spi_ab, spi_ba, reqid, k_ab, k_ba, mark in groups:
        spi_out, spi_in = (spi_ab, spi_ba) if side == "a" else (spi_ba, spi_ab)
        key_out, key_in = (k_ab, k_ba) if side == "a" else (k_ba, k_ab)
        lines += _sa(local, remote, spi_out, key_out, reqid, encap, (4500, remote_port))
        lines += _sa(remote, local, spi_in, key_in, reqid + 1, encap, (remote_port, 4500),
                     mark)
        for fam in families:
            src, dst = mine[2 + fam], theirs[2 + fam]
            for direction, s, d, t_src, t_dst, r in (
                    ("out", src, dst, local, remote, reqid),
                    ("in", dst, src, remote, local, reqid + 1)):
                lines += ["[[policy]]", f'src = "{s}"', f'dst = "{d}"',
                          f'dir = "{direction}"',
                          f'tmpl = [{{ src = "{t_src}", dst = "{t_dst}", reqid = {r}, '
                          'mode = "tunnel" }]', ""]
    return "\n".join(lines)


def _sa(src: str, dst: str, spi: int, key: str, reqid: int, encap: bool, ports: tuple,
        set_mark: Optional[int] = None) -> list[str]:
    out = ["[[sa]]", f'src = "{src}"', f'dst = "{dst}"', f"spi = {spi:#x}",
           'mode = "tunnel"', f"reqid = {reqid}", "replay_window = 1024",
           f'aead = {{ name = "{AEAD}", key = "{key}", icv_bits = 128 }}']
    if encap:
        out.append(f'encap = {{ type = "espinudp", sport = {ports[0]}, dport = {ports[1]} }}')
    if set_mark is not None:
        out.append(f"set_mark = {{ value = {set_mark:#x}, mask = 0xffffffff }}")
    return out + [""]


# ---------------------------------------------------------------- the main command

def run_default(nbytes: int = 32 << 20, as_json: bool = False) -> int:
    """The README's main command; see the module docstring."""
    results: dict = {"tunnels": [], "veth": {}}
    with Lab("demo") as lab:
        for outer in (4, 6):
            k = keys()
            a = lab.start("a", tunnel_config("a", outer, True, *k))
            b = lab.start("b", tunnel_config("b", outer, True, *k))
            row: dict = {"outer": f"IPv{outer}", "encap": "UDP 4500"}
            for inner, idx in (("IPv4", 0), ("IPv6", 1)):
                target = INNER["b"][idx]
                row[f"ping_{inner}"] = lab.ping("a", target)
                row[f"tcp_{inner}"] = lab.transfer("a", "b", target, nbytes)
            row["status_a"], row["status_b"] = a.status(), b.status()
            results["tunnels"].append(row)
            for d in (a, b):
                d.stop()
                if d.proc.returncode != 0:
                    raise LabError(f"espdp run exited {d.proc.returncode}:\n{d.output()}")
            lab.daemons.clear()
        for outer in (4, 6):
            results["veth"][f"IPv{outer}"] = lab.transfer("a", "b", OUTER[outer][1], nbytes)
        leftovers = [ns for ns in lab.ns.values()
                     if sh("ip", "-j", "link", "show", "esp0", ns=ns, check=False).returncode == 0]
    results["left_behind"] = leftovers
    if as_json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(format_summary(results))
    ok = all(r["ping_IPv4"] and r["ping_IPv6"] for r in results["tunnels"]) and not leftovers
    return 0 if ok else 1


def format_summary(results: dict) -> str:
    out = ["espdp: two namespaces, one espdp each, AES-128-GCM tunnel mode, UDP-encapsulated",
           ""]
    veth = results["veth"]
    for row in results["tunnels"]:
        out.append(f"outer {row['outer']} ({row['encap']}):")
        for inner in ("IPv4", "IPv6"):
            tcp = row[f"tcp_{inner}"]
            base = veth[row["outer"]]["mbit_s"]
            out.append(f"  inner {inner}: ping {'ok' if row[f'ping_{inner}'] else 'FAILED'}, "
                       f"TCP {tcp['bytes'] >> 20} MiB checked in {tcp['seconds']:.2f}s = "
                       f"{tcp['mbit_s']:.0f} Mbit/s ({tcp['mbit_s'] / base:.1%} of plain veth "
                       f"{base:.0f} Mbit/s)")
        for side in ("a", "b"):
            st = row[f"status_{side}"]
            for sa in st["sas"]:
                drops = sum(sa["drops"].values())
                out.append(f"  {side}: SA spi {sa['spi']} {sa['src']} -> {sa['dst']}: "
                           f"{sa['packets']} packets, {sa['bytes']} bytes, {drops} drops")
    out.append("")
    out.append("left behind: " + (", ".join(results["left_behind"]) or "nothing"))
    return "\n".join(out)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="espdp lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mbytes", type=int, default=32, help="TCP transfer size (MiB)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("espdp lab: needs root (network namespaces and TUN devices)", file=sys.stderr)
        return 2
    try:
        return run_default(args.mbytes << 20, args.json)
    except LabError as e:
        print(f"espdp lab: {e}", file=sys.stderr)
        return 1

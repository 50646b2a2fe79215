"""espdp against the Linux kernel's ESP (issue 6, the kernel half).

The kernel runs in a qemu VM (see conftest.py); espdp runs ``espdp run`` in
the namespace holding the VM's tap.  Each case writes one set of
``ip xfrm state add`` lines and gives the very same lines to both: the
kernel through iproute2's ``ip xfrm`` in the VM, espdp through its
``--xfrm`` file.  The policies are the same words, mirrored.  Then traffic
both ways: ping from each side and a TCP transfer each way checked by
SHA-256.  A failure names the peer, the case and the direction and keeps a
capture of the tap (pcap) whose path it prints.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from espdp.lab import Daemon, python_env, sh

from .capture import Capture
from .conftest import ESPDP_INNER, ESPDP_NET, NS_ADDR, VM_ADDR, VM_INNER, VM_NET, KernelPeer

pytestmark = pytest.mark.interop

PEER = "Linux kernel (VM)"
SPI_OUT, SPI_IN = 0xE5D0_0001, 0xE5D0_0002    # espdp -> kernel, kernel -> espdp
TCP_BYTES = 128 * 1024

ALGS = {
    "gcm128": lambda: f"aead 'rfc4106(gcm(aes))' 0x{os.urandom(20).hex()} 128",
    "gcm256": lambda: f"aead 'rfc4106(gcm(aes))' 0x{os.urandom(36).hex()} 128",
    "chacha20poly1305": lambda: (f"aead 'rfc7539esp(chacha20,poly1305)' "
                                 f"0x{os.urandom(36).hex()} 128"),
    "aes128-sha256": lambda: (f"enc 'cbc(aes)' 0x{os.urandom(16).hex()} "
                              f"auth-trunc 'hmac(sha256)' 0x{os.urandom(32).hex()} 128"),
}


@dataclass(frozen=True)
class Case:
    outer: int = 4
    encap: bool = False
    alg: str = "gcm128"
    esn: bool = False
    mode: str = "tunnel"

    @property
    def name(self) -> str:
        return (f"{self.mode}-outer-ipv{self.outer}-{'udp' if self.encap else 'esp'}-"
                f"{self.alg}{'-esn1024' if self.esn else ''}")


CASES = [Case(outer, encap, alg) for outer in (4, 6) for encap in (False, True)
         for alg in ALGS]
CASES += [Case(outer, encap, "gcm128", esn=True) for outer in (4, 6) for encap in (False, True)]
CASES += [Case(outer, encap, alg, mode="transport") for outer in (4, 6)
          for encap in (False, True) for alg in ("gcm128", "chacha20poly1305")]

# Transport mode protects the traffic between ESPDP_INNER and VM_INNER
# themselves.  The routes send it into espdp's TUN; the ESP espdp makes of
# it carries this output-mark, and an `ip rule fwmark` in the namespace sends
# marked packets by table TRANSPORT_TABLE straight to the VM (see
# route_transport).  The kernel gets the same SA lines: on its inbound SA the
# mark only marks the decrypted packets, which nothing there looks at.
TRANSPORT_MARK, TRANSPORT_TABLE = 0x77, 77


def families(case: Case) -> tuple[int, ...]:
    """The inner families a case carries: both in tunnel mode, the SA's own in
    transport mode."""
    return (4, 6) if case.mode == "tunnel" else (case.outer,)


def endpoints(case: Case) -> tuple[str, str]:
    """The SA addresses (espdp's, the kernel's): the outer ones in tunnel mode,
    the hosts' own in transport mode."""
    if case.mode == "tunnel":
        return NS_ADDR[case.outer], VM_ADDR[case.outer]
    return ESPDP_INNER[case.outer], VM_INNER[case.outer]


def state_lines(case: Case) -> list[str]:
    """The SAs of a case, as ``ip xfrm state add`` lines, identical for both peers."""
    out = []
    mine, theirs = endpoints(case)
    for src, dst, spi in ((mine, theirs, SPI_OUT), (theirs, mine, SPI_IN)):
        words = [f"ip xfrm state add src {src} dst {dst} proto esp spi {spi:#010x}",
                 f"reqid {1 if spi == SPI_OUT else 2} mode {case.mode}"]
        # af-unspec: the kernel takes inner IPv6 through an SA over outer IPv4 (and
        # the reverse) only with this flag; espdp needs none but accepts it
        words.append("replay-window 1024 flag af-unspec esn" if case.esn
                     else "replay-window 32 flag af-unspec")
        words.append(ALGS[case.alg]())
        if case.encap:
            words.append("encap espinudp 4500 4500 0.0.0.0")
        if case.mode == "transport" and spi == SPI_OUT:
            words.append(f"output-mark {TRANSPORT_MARK:#x}")
        out.append(" ".join(words))
    return out


def policy_lines(case: Case, me: str) -> list[str]:
    """``ip xfrm policy add`` lines for ``me`` ("espdp" or "kernel"): inner IPv4 and
    IPv6 between the two inner networks, mirrored between the peers."""
    out = []
    mine, theirs = endpoints(case)
    for fam in families(case):
        if case.mode == "transport":
            bits = 32 if fam == 4 else 128
            mine_net, theirs_net = f"{mine}/{bits}", f"{theirs}/{bits}"
        else:
            mine_net, theirs_net = ESPDP_NET[fam], VM_NET[fam]
        local_net, remote_net, local, remote, req_out, req_in = (
            (mine_net, theirs_net, mine, theirs, 1, 2) if me == "espdp"
            else (theirs_net, mine_net, theirs, mine, 2, 1))
        for d, s, t, ts, td, r in (("out", local_net, remote_net, local, remote, req_out),
                                   ("in", remote_net, local_net, remote, local, req_in)):
            tmpl = f"src {ts} dst {td} " if case.mode == "tunnel" else ""
            out.append(f"ip xfrm policy add src {s} dst {t} dir {d} "
                       f"tmpl {tmpl}proto esp reqid {r} mode {case.mode}")
    return out


def route_transport(peer: KernelPeer, case: Case) -> None:
    """Send espdp's marked ESP of a transport-mode case around its TUN, from its
    inner address (the UDP socket's source comes from this route)."""
    fam = case.outer
    sh("ip", f"-{fam}", "rule", "add", "pref", "50", "fwmark", hex(TRANSPORT_MARK),
       "lookup", str(TRANSPORT_TABLE), ns=peer.ns)
    sh("ip", f"-{fam}", "route", "replace", VM_INNER[fam], "via", VM_ADDR[fam], "dev", "tap0",
       "src", ESPDP_INNER[fam], "table", str(TRANSPORT_TABLE), ns=peer.ns)


def unroute_transport(peer: KernelPeer, case: Case) -> None:
    fam = case.outer
    sh("ip", f"-{fam}", "rule", "del", "pref", "50", ns=peer.ns, check=False)
    sh("ip", f"-{fam}", "route", "flush", "table", str(TRANSPORT_TABLE), ns=peer.ns,
       check=False)


# ---------------------------------------------------------------- espdp side

class EspdpSide:
    def __init__(self, peer: KernelPeer, case: Case, states: list[str]) -> None:
        self.peer = peer
        self.dir = peer.dir / case.name
        self.dir.mkdir(exist_ok=True)
        xfrm = self.dir / "sas.xfrm"
        xfrm.write_text("\n".join(states + policy_lines(case, "espdp")) + "\n")
        xfrm.chmod(0o600)
        toml = self.dir / "espdp.toml"
        toml.write_text(
            "[tunnel]\n"
            'tun = "esp0"\n'
            f'address = ["{ESPDP_INNER[4]}/32", "{ESPDP_INNER[6]}/128"]\n'
            f'route = ["{VM_NET[4]}", "{VM_NET[6]}"]\n'
            f"raw_esp = {'false' if case.encap else 'true'}\n")
        control = str(self.dir / "control.sock")
        self.log = self.dir / "espdp.log"
        argv = ["ip", "netns", "exec", peer.ns, sys.executable, "-m", "espdp", "run",
                "--config", str(toml), "--xfrm", str(xfrm), "--control", control,
                "--state-dir", str(self.dir / "state")]
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    env=python_env(), start_new_session=True)
        self.daemon = Daemon(peer.ns, "esp0", proc, control, self.log, argv)
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"espdp run exited {proc.returncode} ({case.name}):\n"
                                     f"{self.daemon.output()}")
            if (os.path.exists(control)
                    and self.daemon.espdp("status", check=False).returncode == 0):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"espdp run did not answer ({case.name}):\n"
                                     f"{self.daemon.output()}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.daemon.stop(signal.SIGTERM)
        # the next case creates esp0 again: wait until this one's is gone
        for _ in range(50):
            if sh("ip", "link", "show", "esp0", ns=self.peer.ns, check=False).returncode:
                break
            time.sleep(0.1)


# ---------------------------------------------------------------- traffic

_SERVER = r"""
import hashlib, socket, sys
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); s.settimeout(20)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(40); h = hashlib.sha256(); got = 0
while got < n:
    d = c.recv(65536)
    if not d: break
    h.update(d); got += len(d)
c.close()
print(h.hexdigest(), got, flush=True)
"""

_CLIENT = r"""
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
data = sys.stdin.buffer.read()
c = socket.create_connection((addr, port), timeout=15)
c.sendall(data); c.shutdown(socket.SHUT_WR)
c.settimeout(40)
while c.recv(65536): pass
"""


def ping_from_espdp(peer: KernelPeer, fam: int) -> tuple[bool, str]:
    proc = sh("ping", f"-{fam}", "-c", "2", "-i", "0.2", "-W", "3", VM_INNER[fam],
              ns=peer.ns, check=False, timeout=40)
    return proc.returncode == 0, proc.stdout + proc.stderr


def ping_from_kernel(peer: KernelPeer, fam: int) -> tuple[bool, str]:
    cmd = "ping" if fam == 4 else "ping6"
    out = peer.vm.run(f"{cmd} -c 2 -i 0.2 -W 3 -I {VM_INNER[fam]} {ESPDP_INNER[fam]}",
                      check=False, timeout=60)
    return peer.vm.last_rc == 0, out


def tcp_espdp_to_kernel(peer: KernelPeer, fam: int, port: int) -> tuple[bool, str]:
    data = os.urandom(TCP_BYTES)
    peer.vm.run(f"rm -f /tmp/rx; nc -l -p {port} > /tmp/rx 2>/tmp/nc.err & echo $! > /tmp/nc.pid")
    time.sleep(0.3)
    proc = subprocess.run(["ip", "netns", "exec", peer.ns, sys.executable, "-c", _CLIENT,
                           VM_INNER[fam], str(port)], input=data, capture_output=True,
                          timeout=90)
    # Until the file is whole (nc closed the connection, so it has written all it
    # will): waiting for nc itself to be gone cost 3 s a case.
    out = peer.vm.run(f"for i in $(seq 50); do [ $(wc -c < /tmp/rx) -ge {TCP_BYTES} ] && break;"
                      " sleep 0.1; done; kill $(cat /tmp/nc.pid) 2>/dev/null;"
                      " wc -c < /tmp/rx; sha256sum /tmp/rx; cat /tmp/nc.err", check=False)
    want = hashlib.sha256(data).hexdigest()
    ok = proc.returncode == 0 and want in out
    return ok, f"client rc {proc.returncode} {proc.stderr.decode(errors='replace')}; VM: {out}"


def tcp_kernel_to_espdp(peer: KernelPeer, fam: int, port: int) -> tuple[bool, str]:
    srv = subprocess.Popen(["ip", "netns", "exec", peer.ns, sys.executable, "-c", _SERVER,
                            ESPDP_INNER[fam], str(port), str(TCP_BYTES)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if srv.stdout.readline().strip() != "ready":
            return False, f"server: {srv.stderr.read()}"
        vm_out = peer.vm.run(f"head -c {TCP_BYTES} /dev/urandom > /tmp/tx; "
                             f"sha256sum /tmp/tx; "
                             f"timeout 20 nc {ESPDP_INNER[fam]} {port} < /tmp/tx; echo nc=$?",
                             check=False, timeout=90)
        try:
            got = srv.communicate(timeout=25)[0].split()
        except subprocess.TimeoutExpired:
            return False, f"VM: {vm_out}; the receiver got nothing complete"
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    ok = len(got) == 2 and got[1] == str(TCP_BYTES) and got[0] in vm_out
    return ok, f"VM: {vm_out}; received {got}"


def _kernel_sas(peer: KernelPeer, case: Case, states: list[str]) -> None:
    peer.ip("xfrm state flush")
    peer.ip("xfrm policy flush")
    for line in states + policy_lines(case, "kernel"):
        peer.vm.run(vmmod_ip(line))


def vmmod_ip(line: str) -> str:
    """An ``ip xfrm ...`` line as the VM runs it (iproute2's binary by path)."""
    from .vm import IP
    assert line.startswith("ip ")
    return IP + line[2:]


_port = iter(range(5100, 6000))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_peer(kernel_peer: KernelPeer, case: Case) -> None:
    peer = kernel_peer
    states = state_lines(case)
    _kernel_sas(peer, case, states)
    cap = Capture(peer.ns, "tap0", peer.dir / f"{case.name}.pcap")
    espdp = None
    failures: list[str] = []
    try:
        espdp = EspdpSide(peer, case, states)
        if case.mode == "transport":
            route_transport(peer, case)
        checks = []
        for fam in families(case):
            checks += [
                (f"ping inner IPv{fam} espdp -> kernel", lambda f=fam: ping_from_espdp(peer, f)),
                (f"ping inner IPv{fam} kernel -> espdp", lambda f=fam: ping_from_kernel(peer, f)),
                (f"TCP inner IPv{fam} espdp -> kernel",
                 lambda f=fam: tcp_espdp_to_kernel(peer, f, next(_port))),
                (f"TCP inner IPv{fam} kernel -> espdp",
                 lambda f=fam: tcp_kernel_to_espdp(peer, f, next(_port))),
            ]
        for what, check in checks:
            ok, detail = check()
            if not ok:
                failures.append(f"{what}: {detail.strip()[-1500:]}")
    finally:
        status = ""
        if espdp is not None:
            try:
                status = espdp.daemon.espdp("xfrm", "state", "list", check=False).stdout
            except Exception:  # noqa: BLE001 - diagnostics only
                pass
            espdp.stop()
        if case.mode == "transport":
            unroute_transport(peer, case)
        kept = cap.stop(keep=bool(failures))
    if failures:
        kstate = peer.ip("-s xfrm state", check=False)
        kstats = peer.vm.run("cat /proc/net/xfrm_stat; grep -A1 '^Udp6*:' /proc/net/snmp "
                             "/proc/net/snmp6 | tail -n +1; netstat -uan", check=False)
        pytest.fail(
            f"peer {PEER}, case {case.name}: {len(failures)} direction(s) failed:\n  "
            + "\n  ".join(failures)
            + f"\ncapture of the tap: {kept}\n"
            f"espdp log ({espdp.log if espdp else '-'}):\n"
            f"{espdp.daemon.output()[-3000:] if espdp else ''}\n"
            f"espdp SAs:\n{status}\nkernel SAs:\n{kstate[-3000:]}\n"
            f"kernel /proc/net/xfrm_stat (non-zero):\n"
            + "\n".join(s for s in kstats.splitlines() if s.split()[-1:] != ["0"]),
            pytrace=False)


def _mark_rules(host: str) -> tuple[list[str], list[str]]:
    """``ip`` words that make ``host``'s own inner IPv4 address refuse packets
    marked 0x42 (an fwmark rule ahead of the local table, to a prohibit route),
    and the words that undo them."""
    addr = VM_INNER[4] if host == "kernel" else ESPDP_INNER[4]
    rules = ["rule add pref 100 lookup local", "rule del pref 0",
             f"route add prohibit {addr}/32 table 100", "rule add pref 10 fwmark 0x42 lookup 100"]
    undo = ["rule add pref 0 lookup local", "rule del pref 100", "rule del pref 10",
            "route flush table 100"]
    return rules, undo


@pytest.mark.parametrize("marked", ["kernel", "espdp"])
def test_inbound_set_mark(kernel_peer: KernelPeer, marked: str) -> None:
    """An inbound SA with ``output-mark 0x42`` on the ``marked`` side (both get the
    same lines: on the other side it is an outbound SA's mark): the decrypted
    packets carry the mark, seen through ``ip rule fwmark 0x42`` sending them to
    a table that refuses them, so the ping from espdp fails; without the rule
    it passes.  On espdp's side the marked packets go to the kernel through the
    injector, so it must have injected some."""
    peer = kernel_peer
    case = Case(4, False, "gcm128")
    states = state_lines(case)
    # states[0] is espdp -> kernel (inbound at the kernel), states[1] the reverse
    states[0 if marked == "kernel" else 1] += " output-mark 0x42"
    name = f"set-mark-{marked}-inbound"
    rules, undo = _mark_rules(marked)

    def ip(words: str, check: bool = True) -> None:
        if marked == "kernel":
            peer.ip(words, check=check)
        else:
            sh("ip", *words.split(), ns=peer.ns, check=check)

    _kernel_sas(peer, case, states)
    cap = Capture(peer.ns, "tap0", peer.dir / f"{name}.pcap")
    espdp = None
    failures: list[str] = []
    try:
        espdp = EspdpSide(peer, case, states)
        ok, detail = ping_from_espdp(peer, 4)
        if not ok:
            failures.append(f"ping espdp -> kernel without the fwmark rule: {detail}")
        try:
            for words in rules:
                ip(words)
            ok, detail = ping_from_espdp(peer, 4)
            if ok:
                failures.append("ping espdp -> kernel passed although `ip rule fwmark 0x42` "
                                f"sends marked packets to a prohibit route on the {marked} "
                                "side: no mark")
        finally:
            for words in undo:
                ip(words, check=False)
        ok, detail = ping_from_espdp(peer, 4)
        if not ok:
            failures.append(f"ping espdp -> kernel after removing the rule: {detail}")
        if marked == "espdp" and not espdp.daemon.status()["counters"]["injected"]:
            failures.append("espdp handed no marked packet to the kernel (injected 0)")
    finally:
        if espdp is not None:
            espdp.stop()
        kept = cap.stop(keep=bool(failures))
    if failures:
        pytest.fail(f"peer {PEER}, case {name}:\n  " + "\n  ".join(failures)
                    + f"\ncapture of the tap: {kept}\nespdp log:\n"
                    f"{espdp.daemon.output()[-3000:] if espdp else ''}\nkernel rules:\n"
                    + peer.ip("rule", check=False), pytrace=False)

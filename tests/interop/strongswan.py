"""strongSwan as the ESP peer of espdp (issue 6, the strongSwan half): helpers.

The lab is :class:`espdp.lab.Lab`: namespaces ``a`` and ``b`` joined by a
veth (``eth0``, outer IPv4 192.0.2.1/.2 and IPv6 2001:db8:e5::1/::2), inner
networks 10.9.1.0/24 + fd09:1::/64 behind a and 10.9.2.0/24 + fd09:2::/64
behind b.  Per case, one charon in each namespace (Debian's build with the
kernel-libipsec plugin: userland ESP through a TUN ``ipsec0``, always in UDP
4500), each in a mount namespace of its own with a private tmpfs on /run (its
pid file is fixed), its own strongswan.conf, log and vici socket.  IKEv2, PSK,
one CHILD_SA carrying inner IPv4 and IPv6.

Debian's charon has no save-keys plugin, so the negotiated CHILD_SA (SPIs,
algorithms, keys) is read from charon's log at ``chd = 4``
(:func:`parse_child_sa`), turned into ``ip xfrm state add`` lines
(:func:`xfrm_states`) and given to ``espdp run`` in b once b's charon is
killed with SIGKILL (no DELETE leaves it).  From then on strongSwan's
userland ESP in a talks to espdp in b.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from espdp.lab import INNER, OUTER, Lab, sh

from .capture import Capture  # noqa: F401 - tests use sw.Capture

PEER = "strongswan"
# The plugins charon loads: kernel-libipsec for ESP, kernel-netlink for routes and
# addresses only, openssl for the AEADs (ChaCha20-Poly1305 too) and X25519.
PLUGINS = ("random nonce openssl aesni gcm aes sha1 sha2 hmac kdf pem pkcs1 pubkey x509 "
           "kernel-libipsec kernel-netlink socket-default vici")
IKE_PROPOSAL = "aes128gcm16-prfsha256-x25519"
CHILD = "t"

STRONGSWAN_CONF = """charon {{
  load = {plugins}
  install_routes = yes
  install_virtual_ip = no
  filelog {{
    log {{
      path = {dir}/charon.log
      default = 1
      ike = 2
      cfg = 2
      knl = 2
      net = 1
      chd = 4
      flush_line = yes
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
  plugins {{
    kernel-libipsec {{
      allow_peer_ts = yes
    }}
    vici {{
      socket = unix://{dir}/charon.vici
    }}
  }}
}}
swanctl {{
  load = pem pkcs1 x509 pubkey
}}
"""

SWANCTL_CONF = """connections {{
  {child} {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    encap = yes
    mobike = no
    proposals = {ike}
    local {{
      auth = psk
      id = {local}
    }}
    remote {{
      auth = psk
      id = {remote}
    }}
    children {{
      {child} {{
        local_ts = {local_ts}
        remote_ts = {remote_ts}
        esp_proposals = {esp}
        mode = tunnel
        start_action = none
      }}
    }}
  }}
}}
secrets {{
  ike-{child} {{
    id-1 = {local}
    id-2 = {remote}
    secret = "{psk}"
  }}
}}
"""


def charon_path() -> Optional[str]:
    for path in ("/usr/lib/ipsec/charon", "/usr/libexec/ipsec/charon",
                 shutil.which("charon") or ""):
        if path and os.access(path, os.X_OK):
            return path
    return None


def missing_binaries() -> list[str]:
    """What the strongSwan cases need and this machine lacks (scripts/bootstrap.sh
    installs strongswan-charon, strongswan-swanctl, libcharon-extra-plugins, tshark,
    ethtool)."""
    missing = []
    if charon_path() is None:
        missing.append("charon (strongswan-charon)")
    if shutil.which("swanctl") is None:
        missing.append("swanctl (strongswan-swanctl)")
    if not any(Path(d, "libstrongswan-kernel-libipsec.so").exists()
               for d in ("/usr/lib/ipsec/plugins", "/usr/lib/x86_64-linux-gnu/ipsec/plugins",
                         "/usr/libexec/ipsec/plugins")):
        missing.append("the kernel-libipsec plugin (libcharon-extra-plugins)")
    if shutil.which("dumpcap") is None:
        missing.append("dumpcap (wireshark-common, with tshark)")
    if shutil.which("ethtool") is None:
        missing.append("ethtool")
    return missing


def inner_ts(side: str) -> str:
    """A side's traffic selectors: its inner IPv4 and IPv6 networks."""
    return f"{INNER[side][2]},{INNER[side][3]}"


# ---------------------------------------------------------------- charon

class Charon:
    """One charon (kernel-libipsec) in namespace ``side`` of ``lab``, in a mount
    namespace with a private /run; config, log and vici socket in ``workdir``."""

    def __init__(self, lab: Lab, side: str, workdir: Path, outer: int, esp: str,
                 psk: str) -> None:
        self.lab, self.side, self.dir = lab, side, workdir
        self.ns = lab.ns[side]
        other = "b" if side == "a" else "a"
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "strongswan.conf"
        self.conf.write_text(STRONGSWAN_CONF.format(plugins=PLUGINS, dir=workdir))
        self.swanctl_conf = workdir / "swanctl.conf"
        self.swanctl_conf.write_text(SWANCTL_CONF.format(
            child=CHILD, local=OUTER[outer][0 if side == "a" else 1],
            remote=OUTER[outer][1 if side == "a" else 0], ike=IKE_PROPOSAL,
            local_ts=inner_ts(side), remote_ts=inner_ts(other), esp=esp, psk=psk))
        self.swanctl_conf.chmod(0o600)
        self.log = workdir / "charon.log"
        self.log.unlink(missing_ok=True)
        self.uri = f"unix://{workdir}/charon.vici"
        self.env = dict(os.environ, STRONGSWAN_CONF=str(self.conf))
        # ip netns exec and unshare exec; sh execs charon: self.proc.pid is charon's pid
        with open(workdir / "charon.out", "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, "unshare", "-m", "--propagation", "private",
                 "sh", "-c", f"mount -t tmpfs none /run && exec {charon_path()}"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def swanctl(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, "swanctl", *argv, "--uri",
                               self.uri], capture_output=True, text=True, env=self.env,
                              timeout=timeout)

    def load(self, wait: float = 20) -> None:
        """Load the connection and the PSK once charon's vici socket answers."""
        deadline = time.monotonic() + wait
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"charon in {self.side} exited {self.proc.returncode}: "
                                   f"{self.output()[-1500:]}")
            proc = self.swanctl("--load-conns", "--file", str(self.swanctl_conf))
            if proc.returncode == 0:
                proc = self.swanctl("--load-creds", "--clear", "--noprompt", "--file",
                                    str(self.swanctl_conf))
                if proc.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"swanctl --load-conns/--load-creds in {self.side}: "
                                   f"{proc.stdout[-800:]}{proc.stderr[-800:]}")
            time.sleep(0.1)

    def initiate(self) -> subprocess.CompletedProcess:
        return self.swanctl("--initiate", "--child", CHILD, "--timeout", "20", timeout=40)

    def list_sas(self) -> str:
        proc = self.swanctl("--list-sas", timeout=15)
        return proc.stdout + proc.stderr

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def output(self) -> str:
        path = self.dir / "charon.out"
        return self.log_text() + (path.read_text(errors="replace") if path.exists() else "")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no DELETE, no cleanup; its TUN goes with its file descriptor."""
        comm = Path(f"/proc/{self.proc.pid}/comm")
        try:
            name = comm.read_text().strip()
        except OSError:
            name = "?"
        if self.alive() and name != "charon":
            raise RuntimeError(f"pid {self.proc.pid} is {name!r}, not charon")
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (charon deletes its SAs and routes), SIGKILL after 10 s; then
        what it may leave in the namespace (ipsec0, the rule and table 220)."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        cleanup_charon_leftovers(self.ns)


def cleanup_charon_leftovers(ns: str) -> None:
    sh("ip", "link", "del", "ipsec0", ns=ns, check=False)
    for fam in ("-4", "-6"):
        for _ in range(10):
            if sh("ip", fam, "rule", "del", "table", "220", ns=ns, check=False).returncode:
                break
        sh("ip", fam, "route", "flush", "table", "220", ns=ns, check=False)


def wait_quiet(paths: list[Path], quiet: float = 0.6, timeout: float = 8) -> bool:
    """Wait until none of ``paths`` has grown for ``quiet`` seconds (charon has
    finished its exchanges and jobs); False after ``timeout``."""
    deadline = time.monotonic() + timeout
    sizes, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = [p.stat().st_size if p.exists() else -1 for p in paths]
        if now != sizes:
            sizes, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------- the negotiated CHILD_SA

@dataclass
class ChildSA:
    """What charon's log at ``chd = 4`` says about one CHILD_SA."""

    proposal: str = ""                       # "ESP:AES_GCM_16_128/NO_EXT_SEQ"
    encryption: str = ""                     # "AES_GCM_16", "AES_CBC", "CHACHA20_POLY1305"
    integrity: Optional[str] = None          # "HMAC_SHA2_256_128"
    keys: dict = field(default_factory=dict)  # ("encryption"|"integrity", "initiator"|...) -> bytes
    sas: dict = field(default_factory=dict)   # "inbound"|"outbound" -> (spi, src, dst)

    @property
    def esn(self) -> bool:
        return "/EXT_SEQ" in self.proposal

    def complete(self) -> bool:
        want = {("encryption", "initiator"), ("encryption", "responder")}
        if self.integrity:
            want |= {("integrity", "initiator"), ("integrity", "responder")}
        return (bool(self.encryption) and want <= set(self.keys)
                and set(self.sas) == {"inbound", "outbound"})


_LINE = re.compile(r"^(\d+)\[(\w+)\] (.*)$")
_KEY = re.compile(r"^(encryption|integrity) (initiator|responder) key => (\d+) bytes")
_HEX = re.compile(r"^\s*\d+: ((?:[0-9A-F]{2} )*[0-9A-F]{2})")
_USING = re.compile(r"^\s*using (\S+) for (encryption|integrity)$")
_ADDING = re.compile(r"^adding (inbound|outbound) ESP SA$")
_SPI = re.compile(r"^\s*SPI 0x([0-9a-f]+), src (\S+) dst (\S+)$")
_PROPOSAL = re.compile(r"^selected proposal: (ESP:\S+)$")


def parse_child_sa(log: str) -> ChildSA:
    """The last complete CHILD_SA installed according to ``log`` (charon's file log
    with ``chd = 4``: keys as hex dumps after "encryption initiator key => N bytes").
    Lines of one thread are followed; threads may interleave.  ValueError if none."""
    current: dict = {}            # thread -> ChildSA being installed
    pending: dict = {}            # thread -> (kind, role, n, bytearray) or ("sa", direction)
    done: Optional[ChildSA] = None
    for raw in log.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        thread, group, text = m.groups()
        if group == "CFG" and (p := _PROPOSAL.match(text)):
            current[thread] = ChildSA(proposal=p.group(1))
            pending.pop(thread, None)
            continue
        if group != "CHD" or thread not in current:
            continue
        child = current[thread]
        want = pending.get(thread)
        if want and want[0] in ("encryption", "integrity"):
            h = _HEX.match(text)
            if h:
                want[3].extend(bytes.fromhex(h.group(1)))
                if len(want[3]) >= want[2]:
                    child.keys[(want[0], want[1])] = bytes(want[3][:want[2]])
                    pending.pop(thread)
                continue
            pending.pop(thread)
        if want and want[0] == "sa":
            s = _SPI.match(text)
            pending.pop(thread)
            if s:
                child.sas[want[1]] = (int(s.group(1), 16), s.group(2), s.group(3))
                if child.complete():
                    done = child
                continue
        if k := _KEY.match(text):
            pending[thread] = (k.group(1), k.group(2), int(k.group(3)), bytearray())
        elif u := _USING.match(text):
            setattr(child, u.group(2), u.group(1))
        elif a := _ADDING.match(text):
            pending[thread] = ("sa", a.group(1))
    if done is None:
        raise ValueError("no complete CHILD_SA (proposal, keys, inbound and outbound SPI) "
                         "in charon's log; is chd = 4 set?")
    return done


# strongSwan's names -> XFRM's (the words iproute2 and espdp take)
_AEAD = {"AES_GCM_16": ("rfc4106(gcm(aes))", 128), "AES_GCM_12": ("rfc4106(gcm(aes))", 96),
         "AES_GCM_8": ("rfc4106(gcm(aes))", 64),
         "CHACHA20_POLY1305": ("rfc7539esp(chacha20,poly1305)", 128)}
_ENC = {"AES_CBC": "cbc(aes)", "AES_CTR": "rfc3686(ctr(aes))"}
_INTEG = {"HMAC_SHA1_96": ("hmac(sha1)", 96), "HMAC_SHA2_256_128": ("hmac(sha256)", 128),
          "HMAC_SHA2_384_192": ("hmac(sha384)", 192),
          "HMAC_SHA2_512_256": ("hmac(sha512)", 256)}


def _algo_words(child: ChildSA, role: str) -> str:
    enc = child.keys[("encryption", role)]
    if child.encryption in _AEAD:
        name, icv = _AEAD[child.encryption]
        return f"aead '{name}' 0x{enc.hex()} {icv}"
    if child.encryption not in _ENC or child.integrity not in _INTEG:
        raise ValueError(f"no XFRM name known for {child.encryption}/{child.integrity}")
    name, trunc = _INTEG[child.integrity]
    return (f"enc '{_ENC[child.encryption]}' 0x{enc.hex()} "
            f"auth-trunc '{name}' 0x{child.keys[('integrity', role)].hex()} {trunc}")


def xfrm_states(child: ChildSA, initiator: bool, oseq: int = 0,
                replay_window: int = 32) -> list[str]:
    """``ip xfrm state add`` lines for the side whose log ``child`` came from
    (``initiator``: whether it initiated the CHILD_SA): its inbound SA (reqid 2)
    and its outbound SA (reqid 1, sequence numbers continuing after ``oseq``),
    ESP in UDP 4500 both ways as kernel-libipsec does.  The sender's role names
    the key: the initiator's SA uses the "initiator" keys."""
    out = []
    for direction, reqid in (("outbound", 1), ("inbound", 2)):
        spi, src, dst = child.sas[direction]
        sender_is_initiator = initiator == (direction == "outbound")
        role = "initiator" if sender_is_initiator else "responder"
        words = [f"ip xfrm state add src {src} dst {dst} proto esp spi {spi:#010x}",
                 f"reqid {reqid} mode tunnel replay-window {replay_window} flag af-unspec"
                 + (" esn" if child.esn else ""),
                 _algo_words(child, role), "encap espinudp 4500 4500 0.0.0.0"]
        if direction == "outbound" and oseq:
            words.append(f"replay-oseq {oseq}")
        out.append(" ".join(words))
    return out


def xfrm_policies(side: str, local: str, remote: str) -> list[str]:
    """``ip xfrm policy add`` lines for ``side``: inner IPv4 and IPv6 between its
    networks and the other side's, out through reqid 1, in through reqid 2."""
    other = "b" if side == "a" else "a"
    out = []
    for idx in (2, 3):
        mine, theirs = INNER[side][idx], INNER[other][idx]
        out.append(f"ip xfrm policy add src {mine} dst {theirs} dir out "
                   f"tmpl src {local} dst {remote} proto esp reqid 1 mode tunnel")
        out.append(f"ip xfrm policy add src {theirs} dst {mine} dir in "
                   f"tmpl src {remote} dst {local} proto esp reqid 2 mode tunnel")
    return out


_OUT_PACKETS = re.compile(r"^\s*out\s+([0-9a-f]{8})[^,]*,\s*\d+ bytes,\s*(\d+) packets", re.M)


def out_packets(list_sas: str, spi: int) -> int:
    """The packets charon sent on outbound SA ``spi`` per ``swanctl --list-sas``
    (libipsec numbers them 1, 2, ...: the last sequence number used)."""
    for m in _OUT_PACKETS.finditer(list_sas):
        if int(m.group(1), 16) == spi:
            return int(m.group(2))
    raise ValueError(f"no outbound SA {spi:#010x} in swanctl --list-sas:\n{list_sas}")


# ---------------------------------------------------------------- capture, traffic

def udp_counters(ns: str) -> str:
    """The namespace's UDP and UDP6 counters that are not zero (/proc/net/snmp{,6}):
    receive buffer errors show where a burst overran a socket."""
    out = []
    for name, path in (("Udp", "/proc/net/snmp"), ("Udp6", "/proc/net/snmp6")):
        text = sh("cat", path, ns=ns, check=False).stdout
        if name == "Udp":
            rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
            pairs = list(zip(rows[0], rows[1], strict=True)) if len(rows) == 2 else []
        else:
            pairs = [(k[4:], v) for k, v in (line.split() for line in text.splitlines()
                                             if line.startswith("Udp6"))]
        out.append(f"{name} " + " ".join(f"{k}={v}" for k, v in pairs if v != "0"))
    return "; ".join(out)


def ping(lab: Lab, side: str, addr: str, count: int = 3) -> tuple[bool, str]:
    """ok when every echo request got its reply (the veth loses nothing)."""
    proc = sh("ping", "-c", str(count), "-i", "0.2", "-W", "2", addr, ns=lab.ns[side],
              check=False, timeout=30)
    summary = [x for x in (proc.stdout + proc.stderr).splitlines()
               if "transmitted" in x or "ping:" in x]
    return (proc.returncode == 0 and " 0% packet loss" in proc.stdout,
            f"ping -c {count} {addr}: {'; '.join(summary)}")


_SERVER = r"""
import hashlib, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); s.settimeout(15)
print("ready", flush=True)
h = hashlib.sha256(); n = 0
try:
    c, _ = s.accept(); c.settimeout(20)
    while True:
        d = c.recv(1 << 16)
        if not d: break
        h.update(d); n += len(d)
    c.close()
except OSError as e:
    sys.exit(f"receiver: {e!r} after {n} bytes")
print(h.hexdigest(), n, flush=True)
"""

_CLIENT = r"""
import hashlib, os, socket, sys
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(n)
try:
    c = socket.create_connection((addr, port), timeout=10)
    c.settimeout(20); c.sendall(data); c.shutdown(socket.SHUT_WR)
    while c.recv(1 << 16): pass
except OSError as e:
    sys.exit(f"sender: {e!r}")
print(hashlib.sha256(data).hexdigest(), n, flush=True)
"""


def tcp_transfer(lab: Lab, client: str, server: str, addr: str, nbytes: int,
                 port: int) -> tuple[bool, str]:
    """``nbytes`` of random data over TCP from ``client`` to ``addr`` (in ``server``);
    ok when the receiver's SHA-256 and length match the sender's."""
    srv = subprocess.Popen(["ip", "netns", "exec", lab.ns[server], sys.executable, "-c",
                            _SERVER, addr, str(port)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        if srv.stdout.readline().strip() != "ready":
            return False, f"server on {addr}: {srv.stderr.read().strip()[-500:]}"
        cli = sh(sys.executable, "-c", _CLIENT, addr, str(port), str(nbytes),
                 ns=lab.ns[client], check=False, timeout=60)
        if cli.returncode != 0:       # nothing more will arrive
            srv.kill()
        try:
            out, err = srv.communicate(timeout=25)
        except subprocess.TimeoutExpired:
            srv.kill()
            out, err = srv.communicate()
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    sent, got = cli.stdout.split(), out.split()
    ok = cli.returncode == 0 and len(sent) == 2 and got == sent
    return ok, (f"sent {sent or '-'} (client exit {cli.returncode}"
                f"{': ' + cli.stderr.strip()[-400:] if cli.stderr.strip() else ''}), "
                f"received {got or '-'}{' ' + err.strip()[-400:] if err.strip() else ''}")

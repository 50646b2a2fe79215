"""espdp against strongSwan's userland ESP (issue 6, the strongSwan half).

Namespaces a and b (espdp.lab.Lab, one pair for the session: a veth with
outer IPv4 and IPv6).  Per case (outer family x ESP proposal): a charon with
kernel-libipsec in each namespace negotiates one CHILD_SA (IKEv2, PSK, inner
IPv4 and IPv6 in one CHILD_SA, ESP in UDP 4500 as libipsec always does); a
ping from a to b, inner IPv4 and IPv6, through the strongSwan pair proves the
setup; once charon's exchanges are over, b's charon is killed with SIGKILL (no DELETE) and
``espdp run`` takes its place in b with the SAs read from b's charon log
(``chd = 4``; the outbound SA continues after the sequence numbers b's charon
used) and the mirrored policies.  Then traffic both ways between
strongSwan in a and espdp in b: ping and a TCP transfer checked by SHA-256,
inner IPv4 and IPv6, and both of espdp's SAs must have carried packets
without a drop.  A failure names the peer, the case and each failed
direction and keeps the capture of the veth (pcap; UDP GSO off on b's veth so
that it shows the datagrams of the wire) with the case's SAs in a directory
whose path it prints (ESPDP_INTEROP_KEEP=1 keeps them for every case).

A proposal libipsec (or charon's crypto plugins) cannot do fails its case
with charon's refusal in the message; none is skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from espdp.lab import INNER, OUTER, Lab, LabError, sh

from . import strongswan as sw

pytestmark = pytest.mark.interop

PROPOSALS = ("aes128gcm16", "aes256gcm16", "chacha20poly1305", "aes128-sha256")
# what charon must report for each ("selected proposal: ESP:..." in its log)
SELECTED = {"aes128gcm16": "ESP:AES_GCM_16_128/NO_EXT_SEQ",
            "aes256gcm16": "ESP:AES_GCM_16_256/NO_EXT_SEQ",
            "chacha20poly1305": "ESP:CHACHA20_POLY1305/NO_EXT_SEQ",
            "aes128-sha256": "ESP:AES_CBC_128/HMAC_SHA2_256_128/NO_EXT_SEQ"}
TCP_BYTES = 1 << 20


@dataclass(frozen=True)
class Case:
    outer: int
    esp: str

    @property
    def name(self) -> str:
        return f"outer-ipv{self.outer}-{self.esp}"


CASES = [Case(outer, esp) for outer in (4, 6) for esp in PROPOSALS]


class SwanLab:
    """The session's namespaces, and a directory for the captures of failed cases."""

    def __init__(self, lab: Lab, keep: Path) -> None:
        self.lab = lab
        self.keep = keep
        self.port = iter(range(5400, 6400))


@pytest.fixture(scope="session")
def swan_lab():
    if os.geteuid() != 0:
        pytest.skip("interop: needs root (network namespaces, TUN devices)")
    missing = sw.missing_binaries()
    if missing:
        pytest.skip(f"interop: strongSwan peer: {', '.join(missing)} not installed "
                    "(scripts/bootstrap.sh installs them)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("interop: no /dev/net/tun")
    keep = Path(tempfile.mkdtemp(prefix="espdp-interop-strongswan-"))
    with Lab("swan") as lab:
        # a's inner addresses: the source of charon's routes into ipsec0 (b gets its
        # own per case, for its charon and then on espdp's TUN)
        for idx in (0, 1):
            sh("ip", "addr", "add", INNER["a"][idx], "dev", "lo", ns=lab.ns["a"])
        # espdp sends runs of datagrams as one UDP GSO message; a veth would carry them
        # unsegmented and the capture would show 64 KiB frames no tool can take apart.
        # Segmented before the veth (as a NIC would), the capture shows the wire.
        sh("ethtool", "-K", "eth0", "tx-udp-segmentation", "off", ns=lab.ns["b"])
        # the veth works before any tunnel: a failure later is ESP's
        for outer in (4, 6):
            for _ in range(30):
                if sh("ping", "-c", "1", "-W", "1", OUTER[outer][1], ns=lab.ns["a"],
                      check=False).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                raise LabError(f"the veth does not carry outer IPv{outer}")
        swan = SwanLab(lab, keep)
        try:
            yield swan
        finally:
            for side in ("a", "b"):
                sw.cleanup_charon_leftovers(lab.ns[side])
    if os.environ.get("ESPDP_INTEROP_KEEP") or any(keep.iterdir()):
        print(f"\ninterop: strongSwan peer files kept in {keep}")
    else:
        shutil.rmtree(keep, ignore_errors=True)


def _b_inner(lab: Lab, op: str) -> None:
    for idx, plen in ((0, 32), (1, 128)):
        sh("ip", "addr", op, f"{INNER['b'][idx]}/{plen}", "dev", "lo", ns=lab.ns["b"],
           check=op == "add")


def _espdp_config() -> str:
    a, b = INNER["a"], INNER["b"]
    return ("[tunnel]\n"
            'tun = "esp0"\n'
            f'address = ["{b[0]}/32", "{b[1]}/128"]\n'
            f'route = ["{a[2]}", "{a[3]}"]\n'
            "udp_port = 4500\n")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_strongswan_peer(swan_lab: SwanLab, case: Case) -> None:
    lab = swan_lab.lab
    work = lab.dir / case.name
    work.mkdir()
    cap = sw.Capture(lab.ns["b"], "eth0", work / f"{case.name}.pcap")
    charons: dict = {}
    daemon = None
    failures: list[str] = []
    try:
        try:
            daemon, child_b = _takeover(lab, case, work, charons)
        except Exception as exc:  # noqa: BLE001 - any setup failure fails the case, reported
            failures.append(f"setup, before any traffic through espdp: {exc}")
        else:
            failures += _traffic(swan_lab, case)
            failures += _espdp_carried(daemon, child_b)
    finally:
        espdp_sas = ""
        if daemon is not None:
            espdp_sas = (daemon.espdp("status", check=False).stdout
                         + daemon.espdp("xfrm", "state", "list", check=False).stdout)
            daemon.stop()
            lab.daemons.remove(daemon)
        swan_a = charons["a"].list_sas() if "a" in charons and charons["a"].alive() else ""
        udp = {side: sw.udp_counters(lab.ns[side]) for side in ("a", "b")}
        for charon in charons.values():
            charon.stop()
        _b_inner(lab, "del")
        keep_all = bool(os.environ.get("ESPDP_INTEROP_KEEP"))
        pcap = cap.stop(keep=bool(failures) or keep_all)
    if failures or keep_all:
        kept = swan_lab.keep / case.name
        kept.mkdir(exist_ok=True)
        for path in [pcap, work / "sas.xfrm", *work.glob("charon-*/charon.log")]:
            if path is not None and path.exists():
                shutil.copy2(path, kept / (f"{path.parent.name}.log"
                                           if path.name == "charon.log" else path.name))
        if daemon is not None and daemon.log.exists():
            shutil.copy2(daemon.log, kept / "espdp.log")
    if failures:
        pytest.fail(
            f"peer {sw.PEER}, case {case.name}: {len(failures)} failure(s):\n  "
            + "\n  ".join(failures)
            + f"\ncapture of the veth in b ({case.name}.pcap), the SAs with their keys "
            f"(sas.xfrm: `espdp pcap decrypt --xfrm sas.xfrm`) and the logs kept in {kept}"
            f"\nespdp log:\n{daemon.output()[-2000:] if daemon else '-'}"
            f"\nespdp SAs:\n{espdp_sas or '-'}"
            f"\nstrongswan (a) SAs:\n{swan_a or '-'}"
            f"\nUDP counters (a): {udp['a']}\nUDP counters (b): {udp['b']}"
            f"\ncharon (a) log, last lines (hex dumps left out):\n"
            f"{_log_tail(charons['a'].log_text()) if 'a' in charons else '-'}",
            pytrace=False)


def _log_tail(text: str, lines: int = 40) -> str:
    keep = [x for x in text.splitlines() if not re.match(r"^\d+\[CHD\]\s+\d+: ", x)]
    return "\n".join(keep[-lines:])


def _takeover(lab: Lab, case: Case, work: Path, charons: dict):
    """The strongSwan pair negotiates and works; b's charon dies; espdp takes over
    in b with its SAs.  Returns the daemon and b's CHILD_SA; raises on any failure."""
    local, remote = OUTER[case.outer][1], OUTER[case.outer][0]     # b, a
    psk = os.urandom(24).hex()
    _b_inner(lab, "add")
    for side in ("a", "b"):
        charons[side] = sw.Charon(lab, side, work / f"charon-{side}", case.outer, case.esp,
                                  psk)
    for side in ("a", "b"):
        charons[side].load()
    init = charons["a"].initiate()
    if init.returncode != 0:
        raise AssertionError(
            f"charon refused or failed the CHILD_SA with esp_proposals = {case.esp} "
            f"(swanctl --initiate exit {init.returncode}):\n{init.stdout[-1500:]}"
            f"{init.stderr[-500:]}")
    # the strongSwan pair works before espdp comes in, over ESP in UDP
    for side in ("a", "b"):
        listing = charons[side].list_sas()
        if "INSTALLED, TUNNEL-in-UDP" not in listing:
            raise AssertionError(f"charon in {side}: no CHILD_SA installed in UDP:\n{listing}")
    for idx, fam in ((0, 4), (1, 6)):
        ok, out = sw.ping(lab, "a", INNER["b"][idx], count=1)
        if not ok:
            raise AssertionError(f"strongswan (a) <-> strongswan (b) before the takeover, "
                                 f"inner IPv{fam}: {out}")
    # the exchanges and jobs after IKE_AUTH are over, then b's charon dies quietly
    if not sw.wait_quiet([charons["a"].log, charons["b"].log]):
        raise AssertionError("charon's logs did not settle within 8 s")
    child_b = sw.parse_child_sa(charons["b"].log_text())
    child_a = sw.parse_child_sa(charons["a"].log_text())
    if child_b.proposal != SELECTED[case.esp]:
        raise AssertionError(f"charon selected {child_b.proposal}, not {SELECTED[case.esp]}")
    # both logs were read alike: a's outbound SA is b's inbound one, same keys
    if (child_a.sas["outbound"] != child_b.sas["inbound"]
            or child_a.sas["inbound"] != child_b.sas["outbound"]
            or child_a.keys != child_b.keys):
        raise AssertionError("charon's logs in a and b disagree on the CHILD_SA")
    # espdp continues b's outbound sequence numbers (a's replay window has seen them)
    oseq = sw.out_packets(charons["b"].list_sas(), child_b.sas["outbound"][0])
    charons["b"].kill()
    for _ in range(50):        # its TUN (ipsec0) goes with it
        if sh("ip", "link", "show", "ipsec0", ns=lab.ns["b"], check=False).returncode:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("ipsec0 in b outlived b's charon")
    sw.cleanup_charon_leftovers(lab.ns["b"])
    _b_inner(lab, "del")      # espdp puts them on its TUN
    xfrm = work / "sas.xfrm"
    xfrm.write_text("\n".join(sw.xfrm_states(child_b, initiator=False, oseq=oseq)
                              + sw.xfrm_policies("b", local, remote)) + "\n")
    xfrm.chmod(0o600)
    return lab.start("b", _espdp_config(), "--xfrm", str(xfrm)), child_b


def _espdp_carried(daemon, child: sw.ChildSA) -> list[str]:
    """The traffic went through espdp: both SAs taken from b's charon carried
    packets (a drop on them is shown, as any later failure would be)."""
    sas = {int(sa["spi"], 16): sa for sa in daemon.status()["sas"]}
    out = []
    for direction, label in (("inbound", "strongswan (a) -> espdp (b)"),
                             ("outbound", "espdp (b) -> strongswan (a)")):
        spi = child.sas[direction][0]
        sa = sas.get(spi)
        if sa is None:
            out.append(f"{label}: espdp has no SA {spi:#010x}")
        elif not sa["packets"] or sa["drops"]:
            out.append(f"{label}: espdp's SA {spi:#010x}: {sa['packets']} packets, "
                       f"drops {sa['drops']}")
    return out


def _traffic(swan_lab: SwanLab, case: Case) -> list[str]:
    """Ping and TCP each way, inner IPv4 and IPv6; one line per failed direction."""
    lab = swan_lab.lab
    s2e, e2s = "strongswan (a) -> espdp (b)", "espdp (b) -> strongswan (a)"
    checks = []
    for idx, fam in ((0, 4), (1, 6)):
        a_addr, b_addr = INNER["a"][idx], INNER["b"][idx]
        checks += [
            (f"ping inner IPv{fam} {s2e}", lambda t=b_addr: sw.ping(lab, "a", t)),
            (f"ping inner IPv{fam} {e2s}", lambda t=a_addr: sw.ping(lab, "b", t)),
            (f"TCP inner IPv{fam} {s2e}",
             lambda t=b_addr: sw.tcp_transfer(lab, "a", "b", t, TCP_BYTES,
                                              next(swan_lab.port))),
            (f"TCP inner IPv{fam} {e2s}",
             lambda t=a_addr: sw.tcp_transfer(lab, "b", "a", t, TCP_BYTES,
                                              next(swan_lab.port))),
        ]
    failures = []
    for what, check in checks:
        ok, detail = check()
        if not ok:
            failures.append(f"{what} (outer IPv{case.outer}, {case.esp}): "
                            f"{detail[-1200:]}")
    return failures


# charon's log at chd = 4 (responder, ESP AES-CBC + HMAC-SHA-256), with lines of
# another thread in between, hex dumps included
_LOG = """\
16[CFG] selected proposal: IKE:AES_GCM_16_128/PRF_HMAC_SHA2_256/CURVE_25519
16[CFG] selected proposal: ESP:AES_CBC_128/HMAC_SHA2_256_128/NO_EXT_SEQ
16[CHD] CHILD_SA t{1} state change: CREATED => INSTALLING
16[CHD]   using AES_CBC for encryption
16[CHD]   using HMAC_SHA2_256_128 for integrity
16[CHD] seed => 64 bytes @ 0x7f4aaabef940
16[CHD]    0: E5 12 72 DD 2C 48 82 B1 83 4C 9D 9D 03 1A 6B 12  ..r.,H...L....k.
16[CHD]   16: EE 34 CA 95 BA A8 40 F0 8D 69 39 E0 BF C0 55 D1  .4....@..i9...U.
16[CHD] encryption initiator key => 16 bytes @ 0x7f4a7000aa50
05[CHD] encryption initiator key => 16 bytes @ 0x7f4a7000bb50
05[CHD]    0: FF FF FF FF FF FF FF FF FF FF FF FF FF FF FF FF  ................
16[CHD]    0: 2B 91 AA 8E F1 8A 2F DD 65 75 3B CB 51 22 8E 18  +...../.eu;.Q"..
16[CHD] encryption responder key => 16 bytes @ 0x7f4a7000ab30
16[CHD]    0: 5D C7 6A 1D 22 FA 34 30 10 0A 9F 45 FF C3 6F 14  ].j.".40...E..o.
16[CHD] integrity initiator key => 32 bytes @ 0x7f4a70003c30
16[CHD]    0: 85 94 F5 03 A3 EF 9E 24 31 B5 6F 4F 80 60 AF 15  .......$1.oO.`..
04[KNL] flags changed for fe80::433:a2ff:feee:b351 on eth0
16[CHD]   16: 29 91 3A CE 3C 22 3E 1B CD D0 29 95 FF BE 3D BF  ).:.<">...)...=.
16[CHD] integrity responder key => 32 bytes @ 0x7f4a70003d90
16[CHD]    0: 83 5E 69 5C 19 01 C1 12 79 0A 28 A4 65 96 58 86  .^i\\....y.(.e.X.
16[CHD]   16: 8D 69 CA 06 33 0C 1B 72 FF B4 91 29 67 97 56 02  .i..3..r...)g.V.
16[CHD] adding inbound ESP SA
16[CHD]   SPI 0x36940107, src 192.0.2.1 dst 192.0.2.2
16[CHD] adding outbound ESP SA
16[CHD]   SPI 0x77efd7ea, src 192.0.2.2 dst 192.0.2.1
16[IKE] CHILD_SA t{1} established with SPIs 36940107_i 77efd7ea_o and TS 10.9.2.0/24
"""


def test_parse_child_sa_from_charon_log() -> None:
    """Offline (no root): SPIs, algorithms and keys read from a chd = 4 log, and the
    ``ip xfrm`` lines made of them, which espdp's XFRM model takes."""
    from espdp.xfrm import Xfrm

    child = sw.parse_child_sa(_LOG)
    assert child.proposal == "ESP:AES_CBC_128/HMAC_SHA2_256_128/NO_EXT_SEQ"
    assert (child.encryption, child.integrity, child.esn) == ("AES_CBC", "HMAC_SHA2_256_128",
                                                              False)
    assert child.keys[("encryption", "initiator")].hex() == "2b91aa8ef18a2fdd65753bcb51228e18"
    assert child.keys[("integrity", "initiator")].hex() == (
        "8594f503a3ef9e2431b56f4f8060af1529913ace3c223e1bcdd02995ffbe3dbf")
    assert child.sas == {"inbound": (0x36940107, "192.0.2.1", "192.0.2.2"),
                         "outbound": (0x77efd7ea, "192.0.2.2", "192.0.2.1")}
    out, inb = sw.xfrm_states(child, initiator=False, oseq=7)
    # the responder sends with the responder's keys, receives the initiator's
    assert "spi 0x77efd7ea" in out and "0x5dc76a1d22fa3430100a9f45ffc36f14" in out
    assert ("auth-trunc 'hmac(sha256)' 0x835e695c1901c112790a28a4659658868d69ca06330c1b72"
            "ffb4912967975602 128") in out
    assert "replay-oseq 7" in out and "replay-oseq" not in inb
    assert "spi 0x36940107" in inb and "enc 'cbc(aes)' 0x2b91aa8e" in inb
    assert all("encap espinudp 4500 4500 0.0.0.0" in line for line in (out, inb))
    # had the log been the initiator's, its outbound SA would use the initiator's keys
    a_out, a_in = sw.xfrm_states(child, initiator=True)
    assert "0x2b91aa8e" in a_out and "0x5dc76a1d" in a_in
    x = Xfrm()
    for line in [out, inb] + sw.xfrm_policies("b", "192.0.2.2", "192.0.2.1"):
        x.execute(line, now=0)
    assert len(x.execute("ip xfrm state list", now=0)["states"]) == 2
    with pytest.raises(ValueError, match="chd = 4"):
        sw.parse_child_sa(_LOG.replace("adding outbound", "adding nothing"))

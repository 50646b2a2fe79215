"""The espdp command: pcap decrypt/encrypt, exit codes, --json, error lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

scapy = pytest.importorskip("scapy.all")
from scapy.all import ICMP, IP, UDP, Ether, IPv6, Raw, rdpcap, wrpcap  # noqa: E402
from scapy.layers.ipsec import ESP, SecurityAssociation  # noqa: E402

from espdp.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(1, 21))
AUTH_KEY = bytes(range(100, 132))
SAS = f"""\
# two SAs: GCM tunnel over UDP/IPv4, CBC+SHA256 transport over IPv6
ip xfrm state add src 198.51.100.1 dst 203.0.113.7 proto esp spi 0xc0ffee01 reqid 1 \\
    mode tunnel replay-window 64 aead 'rfc4106(gcm(aes))' 0x{KEY.hex()} 128 \\
    encap espinudp 4500 4500 0.0.0.0

xfrm state add src 2001:db8::1 dst 2001:db8::2 proto esp spi 0xc0ffee02 mode transport \\
    replay-window 32 replay-oseq 41 enc 'cbc(aes)' 0x{KEY[:16].hex()} \\
    auth-trunc 'hmac(sha256)' 0x{AUTH_KEY.hex()} 128
"""


@pytest.fixture
def sa_file(tmp_path: Path) -> Path:
    path = tmp_path / "sas.xfrm"
    path.write_text(SAS)
    return path


def _inner(n: int):
    return [IP(src="10.9.1.1", dst="10.9.2.1", id=i) / ICMP(seq=i) / Raw(b"p" * (i * 7 % 300))
            for i in range(n)]


def _scapy_gcm() -> SecurityAssociation:
    return SecurityAssociation(ESP, spi=0xC0FFEE01, crypt_algo="AES-GCM", crypt_key=KEY,
                               tunnel_header=IP(src="198.51.100.1", dst="203.0.113.7"),
                               nat_t_header=UDP(sport=4500, dport=4500))


def test_decrypt_writes_inner_packets_and_reports_drops(sa_file, tmp_path, capsys):
    sa = _scapy_gcm()
    inner = _inner(21)
    encrypted = [Ether() / sa.encrypt(p, seq_num=i + 1) for i, p in enumerate(inner)]
    bad = bytearray(bytes(encrypted.pop()))                   # seq 21, never received
    bad[-3] ^= 0x40                                           # an ICV failure
    inner.pop()
    encrypted.append(encrypted[3])                            # a replay
    encrypted.append(Ether(bytes(bad)))
    wrpcap(str(tmp_path / "in.pcap"), encrypted)
    rc = main(["pcap", "decrypt", "--xfrm", str(sa_file), str(tmp_path / "in.pcap"),
               str(tmp_path / "out.pcap"), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["written"] == 20
    assert report["verdicts"] == {"ok": 20, "replay": 1, "integrity": 1}
    gcm = next(s for s in report["sas"] if s["spi"] == "0xc0ffee01")
    assert (gcm["packets"], gcm["replay"], gcm["integrity_failed"]) == (20, 1, 1)
    assert [bytes(p) for p in rdpcap(str(tmp_path / "out.pcap"))] == [bytes(p) for p in inner]


def test_encrypt_continues_after_replay_oseq_and_scapy_decrypts(sa_file, tmp_path, capsys):
    packets = [IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=5, dport=6) / Raw(b"x" * i)
               for i in range(10)]
    wrpcap(str(tmp_path / "plain.pcap"), packets)
    rc = main(["pcap", "encrypt", "--xfrm", str(sa_file), "--spi", "0xc0ffee02",
               str(tmp_path / "plain.pcap"), str(tmp_path / "esp.pcap"),
               "--keys-out", str(tmp_path / "esp_sa")])
    assert rc == 0
    assert "10 packets written" in capsys.readouterr().out
    assert os.stat(tmp_path / "esp_sa").st_mode & 0o777 == 0o600
    sa = SecurityAssociation(ESP, spi=0xC0FFEE02, crypt_algo="AES-CBC", crypt_key=KEY[:16],
                             auth_algo="SHA2-256-128", auth_key=AUTH_KEY)
    out = rdpcap(str(tmp_path / "esp.pcap"))
    assert [p[ESP].seq for p in out] == list(range(42, 52))
    assert [bytes(sa.decrypt(p)) for p in out] == [bytes(p) for p in packets]


def test_text_report_names_each_sa(sa_file, tmp_path, capsys):
    sa = _scapy_gcm()
    packets = [sa.encrypt(p, seq_num=i + 1) for i, p in enumerate(_inner(3))]
    wrpcap(str(tmp_path / "in.pcap"), packets)
    assert main(["pcap", "decrypt", "--xfrm", str(sa_file), str(tmp_path / "in.pcap"),
                 str(tmp_path / "out.pcap")]) == 0
    out = capsys.readouterr().out
    assert "SA 0xc0ffee01 198.51.100.1 -> 203.0.113.7 tunnel udp-encap" in out
    assert "3 packets" in out


@pytest.mark.parametrize("args, message", [
    (["pcap", "encrypt", "--xfrm", "{sas}", "--spi", "0x99", "{pcap}", "{out}"],
     "no SA with spi 0x99"),
    (["pcap", "encrypt", "--xfrm", "{sas}", "--spi", "zz", "{pcap}", "{out}"], "invalid SPI"),
    (["pcap", "decrypt", "--xfrm", "{missing}", "{pcap}", "{out}"], "No such file"),
    (["pcap", "decrypt", "--xfrm", "{sas}", "{missing}", "{out}"], "No such file"),
    (["pcap", "decrypt", "--xfrm", "{badsas}", "{pcap}", "{out}"], ":2:"),
    (["pcap", "decrypt", "--xfrm", "{sas}", "{notpcap}", "{out}"], "notpcap"),
    (["pcap", "frobnicate"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(args, message, sa_file, tmp_path):
    wrpcap(str(tmp_path / "in.pcap"), [IP() / ICMP()])
    (tmp_path / "bad.xfrm").write_text(
        "# comment\nip xfrm state add src 1.2.3.4 dst 5.6.7.8 proto esp spi 0x1 "
        "aead 'rfc4106(gcm(aes))' 0x0011 128\n")
    (tmp_path / "notpcap").write_bytes(b"this is not a capture at all")
    names = {"sas": sa_file, "pcap": tmp_path / "in.pcap", "out": tmp_path / "out.pcap",
             "missing": tmp_path / "missing", "badsas": tmp_path / "bad.xfrm",
             "notpcap": tmp_path / "notpcap"}
    argv = [a.format(**{k: str(v) for k, v in names.items()}) for a in args]
    proc = subprocess.run([sys.executable, "-m", "espdp", *argv], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "0011" not in proc.stderr                             # never a key


def test_demo_round_trip_succeeds():
    proc = subprocess.run([sys.executable, "-m", "espdp", "demo", "--packets", "300", "--json"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["identical"] and summary["packets"] == 300
    assert summary["replay_dropped"] == 1 and summary["integrity_dropped"] == 1


def test_algs_lists_transforms_that_passed_their_known_answer_tests():
    proc = subprocess.run([sys.executable, "-m", "espdp", "algs", "--json"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    reports = json.loads(proc.stdout)
    gcm = [r for r in reports if r["keyword"] == "aes128gcm16"]
    assert gcm and gcm[0]["kat_passed"] and gcm[0]["usable"]


POLICY_FILE = f"""\
ip xfrm state add src 198.51.100.1 dst 203.0.113.7 proto esp spi 0xc0ffee01 reqid 1 \\
    mode tunnel aead 'rfc4106(gcm(aes))' 0x{KEY.hex()} 128 encap espinudp 4500 4500 0.0.0.0
ip xfrm policy add src 10.9.1.0/24 dst 10.9.2.0/24 dir out \\
    tmpl src 198.51.100.1 dst 203.0.113.7 proto esp reqid 1 mode tunnel
ip xfrm policy add src 10.9.1.0/24 dst 10.9.3.0/24 dir out \\
    tmpl src 198.51.100.1 dst 203.0.113.9 proto esp reqid 2 mode tunnel
ip xfrm policy add src 10.9.1.0/24 dst 10.9.4.0/24 dir out action block
"""


def test_encrypt_without_spi_chooses_sas_by_policy(tmp_path, capsys):
    (tmp_path / "x.xfrm").write_text(POLICY_FILE)
    packets = []
    for i in range(12):
        net = (2, 3, 4, 5)[i % 4]      # SA; no SA (acquire); block; no policy (clear)
        packets.append(IP(src="10.9.1.1", dst=f"10.9.{net}.1", id=i) / ICMP(seq=i))
    wrpcap(str(tmp_path / "plain.pcap"), packets)
    rc = main(["pcap", "encrypt", "--xfrm", str(tmp_path / "x.xfrm"),
               str(tmp_path / "plain.pcap"), str(tmp_path / "out.pcap"), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdicts"] == {"ok": 3, "acquire": 3, "block": 3, "clear": 3}
    assert report["acquires"] == 1          # one ACQUIRE per SA identity, not per packet
    out = [bytes(p) for p in rdpcap(str(tmp_path / "out.pcap"))]
    assert len(out) == 6
    sa = _scapy_gcm()
    decrypted = [bytes(sa.decrypt(IP(p))) for p in out if p[9] == 17]   # ESP in UDP
    assert decrypted == [bytes(p) for p in packets[0::4]]
    assert [p for p in out if p[9] != 17] == [bytes(p) for p in packets[3::4]]


def test_bench_runs_a_script_of_the_suite_and_refuses_others(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "espdp", "bench", "nope"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and "engine|lookup|e2e|scale|micro|all" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "espdp", "bench", "lookup", "--sizes", "1,10",
                           "--lookups", "50", "--rounds", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [p["sas"] for p in json.loads((tmp_path / "lookup.json").read_text())["points"]] \
        == [1, 10]

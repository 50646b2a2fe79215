"""``espdp demo``: the engine end to end on a capture it makes itself.

Three SA pairs, written as ``ip xfrm state add`` lines with fresh random
keys, cover the main shapes: AES-GCM tunnel in UDP over IPv4,
ChaCha20-Poly1305 tunnel in UDP over IPv6 with ESN, AES-CBC + HMAC-SHA-256
in transport mode.  A generated capture is encrypted with each SA
(``pcap encrypt``), the results are merged with one replayed and one
corrupted packet added, and ``pcap decrypt`` takes it back; the demo checks
that every packet came back identical and that the two bad ones were
counted, and prints a summary with the engine's speed.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

from . import pcap, pcaptool


def _ipv4_udp(src: bytes, dst: bytes, size: int, seq: int) -> bytes:
    payload = seq.to_bytes(4, "big") + random.randbytes(size - 32)
    udp = (40000).to_bytes(2, "big") + (9).to_bytes(2, "big") + \
        (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    header = bytearray(b"\x45\0" + (20 + len(udp)).to_bytes(2, "big") + b"\0\0\x40\0\x40\x11\0\0"
                       + src + dst)
    check = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, 20, 2))
    while check >> 16:
        check = (check & 0xFFFF) + (check >> 16)
    header[10:12] = (~check & 0xFFFF).to_bytes(2, "big")
    return bytes(header) + udp


def _ipv6_udp(src: bytes, dst: bytes, size: int, seq: int) -> bytes:
    payload = seq.to_bytes(4, "big") + random.randbytes(size - 52)
    udp = (40000).to_bytes(2, "big") + (9).to_bytes(2, "big") + \
        (8 + len(payload)).to_bytes(2, "big") + b"\xff\xff" + payload  # checksum unchecked here
    return b"\x60\0\0\0" + len(udp).to_bytes(2, "big") + b"\x11\x40" + src + dst + udp


# (name, ip xfrm line template, which inner packets it carries)
_SAS = [
    ("gcm-udp4", "ip xfrm state add src 198.51.100.1 dst 203.0.113.7 proto esp spi 0xc0ffee01 "
                 "reqid 1 mode tunnel replay-window 128 aead 'rfc4106(gcm(aes))' 0x{k20} 128 "
                 "encap espinudp 4500 4500 0.0.0.0", 4),
    ("chacha-udp6", "ip xfrm state add src 2001:db8::1 dst 2001:db8::7 proto esp spi 0xc0ffee02 "
                    "reqid 2 mode tunnel replay-window 1024 flag esn "
                    "aead 'rfc7539esp(chacha20,poly1305)' 0x{k36} 128 "
                    "encap espinudp 4500 4500 ::", 6),
    ("cbc-sha256-transport", "ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp "
                             "spi 0xc0ffee03 reqid 3 mode transport replay-window 64 "
                             "enc 'cbc(aes)' 0x{k16} auth-trunc 'hmac(sha256)' 0x{k32} 128", 40),
]


def _plain_packets(count: int, family: int) -> list[bytes]:
    sizes = [64, 128, 512, 1024, 1400]
    if family == 40:  # transport mode: the packets go between the SA's own addresses
        return [_ipv4_udp(bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]), random.choice(sizes), i)
                for i in range(count)]
    if family == 4:
        return [_ipv4_udp(bytes([10, 9, 1, 1]), bytes([10, 9, 2, 1]), random.choice(sizes), i)
                for i in range(count)]
    a = bytes.fromhex("fd090001" + "00" * 11 + "01")
    b = bytes.fromhex("fd090002" + "00" * 11 + "01")
    return [_ipv6_udp(a, b, random.choice(sizes), i) for i in range(count)]


def _write(path: Path, packets: list[bytes]) -> None:
    with pcap.PcapWriter(path) as writer:
        for i, packet in enumerate(packets):
            writer.write(packet, 1_700_000_000 + i / 1000)


def _read(path: Path) -> list[bytes]:
    return [p.ip for p in pcap.read_packets(path)]


def run_demo(packets: int = 3000, as_json: bool = False) -> int:
    per_sa = max(1, packets // len(_SAS))
    with tempfile.TemporaryDirectory(prefix="espdp-demo-") as tmp:
        d = Path(tmp)
        keys = {n: os.urandom(n).hex() for n in (16, 20, 32, 36)}
        lines = [t.format(**{f"k{n}": k for n, k in keys.items()}) for _, t, _ in _SAS]
        sa_file = d / "sas.xfrm"
        sa_file.write_text("# espdp demo SAs (random keys, made for this run)\n"
                           + "\n".join(lines) + "\n")
        originals, encrypted, elapsed = [], [], 0.0
        for (name, _, family), line in zip(_SAS, lines, strict=True):
            plain = _plain_packets(per_sa + (0 if originals else 1), family)  # +1: see below
            originals.extend(plain)
            _write(d / f"{name}.pcap", plain)
            spi = int(line.split(" spi ")[1].split()[0], 16)
            start = time.perf_counter()
            pcaptool.encrypt_capture(sa_file, spi, d / f"{name}.pcap", d / f"{name}.esp.pcap",
                                     keys_out=d / "esp_sa")
            elapsed += time.perf_counter() - start
            encrypted.extend(_read(d / f"{name}.esp.pcap"))
        # One replayed and one corrupted packet: both must be counted and
        # dropped.  The corrupted one is new (its sequence number was never
        # received), so it fails the ICV rather than the replay check.
        held_back = encrypted.pop(per_sa)
        originals.pop(per_sa)
        corrupted = bytearray(held_back)
        corrupted[-1] ^= 1
        _write(d / "all.esp.pcap", encrypted + [encrypted[per_sa - 1], bytes(corrupted)])
        start = time.perf_counter()
        report = pcaptool.decrypt_capture(sa_file, d / "all.esp.pcap", d / "all.plain.pcap")
        elapsed += time.perf_counter() - start
        decrypted = _read(d / "all.plain.pcap")
    identical = decrypted == originals
    nbytes = sum(len(p) for p in originals) * 2
    summary = {"packets": len(originals), "identical": identical,
               "replay_dropped": report.verdicts.get("replay", 0)
               + report.verdicts.get("replay_window", 0),
               "integrity_dropped": report.verdicts.get("integrity", 0),
               "seconds": elapsed, "packets_per_second": 2 * len(originals) / elapsed,
               "gbit_per_second": nbytes * 8 / elapsed / 1e9, "sas": report.sas}
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(pcaptool.format_report(report, "decrypt"))
        print(f"round trip: {len(decrypted)}/{len(originals)} packets came back "
              f"{'identical' if identical else 'DIFFERENT'}; replayed packet dropped: "
              f"{summary['replay_dropped'] == 1}; corrupted packet dropped: "
              f"{summary['integrity_dropped'] == 1}")
        print(f"engine, through the pcap tool (file I/O included): "
              f"{summary['packets_per_second'] / 1e3:.0f} k packets/s, "
              f"{summary['gbit_per_second']:.2f} Gbit/s")
    ok = identical and summary["replay_dropped"] == 1 and summary["integrity_dropped"] == 1
    return 0 if ok else 1

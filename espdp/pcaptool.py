"""Offline ESP: decrypt or encrypt a capture with SAs given as ``ip xfrm`` lines.

The same engine as the tunnel runs over packets read from a pcap or pcapng
file, in batches, streaming (memory does not grow with the capture).
Decryption finds each packet's SA by (destination, SPI, proto) as XFRM does;
encryption uses one SA chosen by SPI, its sequence numbers continuing after
the SA's ``replay-oseq``.  Drops are counted and reported, never fatal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import pcap
from .engine import SA, VERDICTS, PacketBatch, SATable
from .errors import ConfigError
from .sa import SAInfo
from .xfrm.parse import parse_state_file

BATCH = 64
SLOT = 65536 + 256   # any IP packet, plus headroom and ESP trailer
HEADROOM = 128


@dataclass
class Report:
    """What became of a capture: totals and per-SA counters."""

    frames: int = 0
    written: int = 0
    not_ip: int = 0
    verdicts: dict = field(default_factory=dict)  # verdict -> packets
    sas: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"frames": self.frames, "written": self.written, "not_ip": self.not_ip,
                "verdicts": dict(sorted(self.verdicts.items())), "sas": self.sas}


def load_sas(path: Path) -> list[SAInfo]:
    """The SAs of an ``ip xfrm state add|update`` file (other verbs are refused)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    infos = []
    for command in parse_state_file(text, str(path)):
        if command.verb not in ("add", "update"):
            raise ConfigError(f"{path}: only 'state add' and 'state update' lines belong in an "
                              f"SA file, found 'state {command.verb}'")
        infos.append(command.info)
    if not infos:
        raise ConfigError(f"{path}: no SAs in the file")
    return infos


def _sa_summary(sa: SA) -> dict:
    info = sa.info
    if info.aead is not None:
        algs = f"{info.aead.name}/{info.aead.bits}"
    else:
        algs = f"{info.enc.name}+{info.auth.name}/{info.auth.bits}"
    return {"spi": f"{info.spi:#010x}", "src": str(info.src), "dst": str(info.dst),
            "mode": info.mode, "encap": info.encap is not None, "algorithms": algs,
            **sa.stats()}


def _drain(batch: PacketBatch, writer: pcap.PcapWriter, times: list, report: Report) -> None:
    for i in range(batch.count):
        verdict = VERDICTS[batch.verdict[i]]
        report.verdicts[verdict] = report.verdicts.get(verdict, 0) + 1
        if verdict == "ok":
            writer.write(batch.packet(i), times[i])
            report.written += 1
    batch.clear()
    times.clear()


def _run(packets: Iterable[pcap.CapturedPacket], out: Path, process, report: Report) -> None:
    batch = PacketBatch(BATCH, SLOT, HEADROOM)
    times: list = []
    with pcap.PcapWriter(out) as writer:
        for packet in packets:
            report.frames += 1
            if packet.ip is None:
                report.not_ip += 1
                continue
            batch.add(packet.ip)
            times.append(packet.timestamp)
            if batch.count == BATCH:
                process(batch)
                _drain(batch, writer, times, report)
        if batch.count:
            process(batch)
            _drain(batch, writer, times, report)


def decrypt_capture(sa_file: Path, capture: Path, out: Path) -> Report:
    table = SATable()
    sas = [SA(info) for info in load_sas(sa_file)]
    for sa in sas:
        table.add(sa)
    report = Report()
    _run(pcap.read_packets(capture), out, table.decrypt, report)
    report.sas = [_sa_summary(sa) for sa in sas]
    return report


def encrypt_capture(sa_file: Path, spi: int, capture: Path, out: Path,
                    keys_out: Optional[Path] = None) -> Report:
    infos = load_sas(sa_file)
    chosen = [info for info in infos if info.spi == spi]
    if not chosen:
        known = ", ".join(f"{info.spi:#x}" for info in infos)
        raise ConfigError(f"{sa_file}: no SA with spi {spi:#x} (the file has {known})")
    sa = SA(chosen[0])
    if keys_out is not None:
        pcap.write_wireshark_esp_sa(keys_out, infos)
    report = Report()
    _run(pcap.read_packets(capture), out, sa.encrypt, report)
    report.sas = [_sa_summary(sa)]
    return report


def format_report(report: Report, action: str) -> str:
    """A person's view: totals, then one line per SA."""
    lines = [f"{action}: {report.frames} frames, {report.written} packets written"
             + (f", {report.not_ip} not IP" if report.not_ip else "")]
    drops = {v: n for v, n in report.verdicts.items() if v != "ok"}
    if drops:
        lines.append("  dropped: " + ", ".join(f"{v} {n}" for v, n in sorted(drops.items())))
    for s in report.sas:
        other = {k: v for k, v in s["drops"].items()
                 if k not in ("replay", "replay_window", "integrity")}
        lines.append(
            f"  SA {s['spi']} {s['src']} -> {s['dst']} {s['mode']}"
            f"{' udp-encap' if s['encap'] else ''} {s['algorithms']}: "
            f"{s['packets']} packets, {s['bytes']} bytes, replay {s['replay']}, "
            f"replay-window {s['replay_window']}, integrity {s['integrity_failed']}"
            + ("".join(f", {k} {v}" for k, v in sorted(other.items()))))
    return "\n".join(lines)

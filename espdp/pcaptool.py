"""Offline ESP: decrypt or encrypt a capture with SAs given as ``ip xfrm`` lines.

The same engine as the tunnel runs over packets read from a pcap or pcapng
file, in batches, streaming (memory does not grow with the capture).
Decryption finds each packet's SA by (destination, SPI, proto) as XFRM does.
Encryption uses one SA chosen by SPI, or, without one, chooses the SA of
each packet through the file's ``dir out`` policies as the kernel would
(packets that would trigger an ACQUIRE are counted, packets a policy lets
through in the clear are written as they are); sequence numbers continue
after each SA's ``replay-oseq``.  Drops are counted and reported, never fatal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import pcap
from .config import read_text
from .engine import SA, VERDICTS, PacketBatch, SATable
from .errors import ConfigError, XfrmError
from .xfrm._syntax import logical_lines
from .xfrm.model import Xfrm
from .xfrm.policy import flow_of_packet
from .xfrm.policy_parse import parse_xfrm_file

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
    acquires: int = 0  # ACQUIRE events (one per flow identity, as the kernel sends them)

    def as_dict(self) -> dict:
        return {"frames": self.frames, "written": self.written, "not_ip": self.not_ip,
                "verdicts": dict(sorted(self.verdicts.items())), "acquires": self.acquires,
                "sas": self.sas}


def load_xfrm(path: Path) -> Xfrm:
    """An XFRM model holding the SAs and policies of an ``ip xfrm`` file."""
    text = read_text(path)
    parse_xfrm_file(text, str(path))  # every syntax error, with its line, before acting
    model = Xfrm()
    for lineno, line in logical_lines(text):
        if not line.strip():
            continue
        try:
            model.execute(line, now=0.0)
        except XfrmError as e:
            raise ConfigError(f"{path}:{lineno}: {e}") from None
    return model


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


def _table(model: Xfrm, sa_file: Path) -> SATable:
    if not len(model.sad.table):
        raise ConfigError(f"{sa_file}: no SAs in the file")
    return model.sad.table


def decrypt_capture(sa_file: Path, capture: Path, out: Path) -> Report:
    table = _table(load_xfrm(sa_file), sa_file)
    sas = list(table)
    report = Report()
    _run(pcap.read_packets(capture), out, table.decrypt, report)
    report.sas = [_sa_summary(sa) for sa in sas]
    return report


def encrypt_capture(sa_file: Path, spi: Optional[int], capture: Path, out: Path,
                    keys_out: Optional[Path] = None) -> Report:
    if spi is None:
        return encrypt_by_policy(sa_file, capture, out, keys_out)
    table = _table(load_xfrm(sa_file), sa_file)
    chosen = [sa for sa in table if sa.spi == spi]
    if not chosen:
        known = ", ".join(f"{sa.spi:#x}" for sa in table)
        raise ConfigError(f"{sa_file}: no SA with spi {spi:#x} (the file has {known})")
    sa = chosen[0]
    if keys_out is not None:
        pcap.write_wireshark_esp_sa(keys_out, [s.info for s in table])
    report = Report()
    _run(pcap.read_packets(capture), out, sa.encrypt, report)
    report.sas = [_sa_summary(sa)]
    return report


def encrypt_by_policy(sa_file: Path, capture: Path, out: Path,
                      keys_out: Optional[Path] = None) -> Report:
    """Each packet through the ``dir out`` policies: encrypt, clear, block or acquire."""
    model = load_xfrm(sa_file)
    acquires = []
    model.subscribe(acquires.append, groups=("acquire",))  # someone listens, as a daemon would
    if keys_out is not None:
        pcap.write_wireshark_esp_sa(keys_out, [sa.info for sa in model.sad.table])
    report = Report()
    batch, times = PacketBatch(BATCH, SLOT, HEADROOM), []
    with pcap.PcapWriter(out) as writer:
        for packet in pcap.read_packets(capture):
            report.frames += 1
            flow = flow_of_packet(packet.ip) if packet.ip is not None else None
            if flow is None:
                report.not_ip += 1
                continue
            decision = model.outbound(flow, now=0.0)
            if decision.action == "encrypt":
                batch.add(packet.ip, 0, decision.sa.index)
                times.append(packet.timestamp)
                if batch.count == BATCH:
                    model.sad.table.encrypt(batch)
                    _drain(batch, writer, times, report)
                continue
            if batch.count:  # keep the capture's order
                model.sad.table.encrypt(batch)
                _drain(batch, writer, times, report)
            verdict = "acquire" if decision.action in ("drop", "queued") else decision.action
            report.verdicts[verdict] = report.verdicts.get(verdict, 0) + 1
            if decision.action == "clear":
                writer.write(packet.ip, packet.timestamp)
                report.written += 1
        if batch.count:
            model.sad.table.encrypt(batch)
            _drain(batch, writer, times, report)
    report.sas = [_sa_summary(sa) for sa in model.sad.table]
    report.acquires = len(acquires)
    return report


def format_report(report: Report, action: str) -> str:
    """A person's view: totals, then one line per SA."""
    lines = [f"{action}: {report.frames} frames, {report.written} packets written"
             + (f", {report.not_ip} not IP" if report.not_ip else "")]
    drops = {v: n for v, n in report.verdicts.items() if v not in ("ok", "clear")}
    if drops:
        lines.append("  dropped: " + ", ".join(f"{v} {n}" for v, n in sorted(drops.items())))
    if report.verdicts.get("clear"):
        lines.append(f"  sent in the clear by policy: {report.verdicts['clear']}")
    if report.acquires:
        lines.append(f"  ACQUIRE events: {report.acquires}")
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

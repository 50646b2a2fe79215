"""Streaming pcap/pcapng reading, pcap writing, and Wireshark ``esp_sa`` export.

:func:`read_packets` reads classic pcap (micro- and nanosecond, either byte
order) and pcapng (several sections and interfaces), one record at a time:
memory does not grow with the capture.  Each :class:`CapturedPacket` carries
the frame as captured and the IP packet found in it (``ip`` is None when the
frame carries no IP, or its link type is not one this module knows).  A file
that is not a capture, or is cut short, raises :class:`ConfigError` naming the
file and the byte offset -- after the packets before that point were yielded.

:class:`PcapWriter` writes classic pcap (microseconds, little-endian, raw IP
by default).  :func:`write_wireshark_esp_sa` writes the SAs as Wireshark's
``esp_sa`` table, so that a person can decrypt the capture in Wireshark.

>>> import io
>>> from espdp.pcap import PcapWriter, read_packets
>>> packet = bytes.fromhex("4500001c000100004011f7cdc0000201c00002020035003500080000")
>>> buf = io.BytesIO()
>>> with PcapWriter(buf) as writer:
...     writer.write(packet, timestamp=1700000000.25)
>>> _ = buf.seek(0)
>>> [(p.index, p.timestamp, p.ip == packet) for p in read_packets(buf)]
[(0, 1700000000.25, True)]
"""

from __future__ import annotations

import ipaddress
import os
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple, Optional, Union

from . import algorithms
from .errors import ConfigError
from .sa import PROTO_ESP, SAInfo

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_DLT_RAW12 = 12  # DLT_RAW on most BSDs
LINKTYPE_DLT_RAW14 = 14  # DLT_RAW on OpenBSD
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

MAX_BLOCK = 256 * 1024 * 1024  # larger records or blocks are corruption, not data
_RAW_TYPES = frozenset((LINKTYPE_RAW, LINKTYPE_DLT_RAW12, LINKTYPE_DLT_RAW14,
                        LINKTYPE_IPV4, LINKTYPE_IPV6))
_VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100))
_ETHERTYPE_IP = frozenset((0x0800, 0x86DD))
_AF_IP = frozenset((2, 24, 28, 30))  # AF_INET; AF_INET6 of Net/OpenBSD, FreeBSD, macOS
_L2_HEADER = {  # link type -> (IP offset, offset of the 16-bit protocol field)
    LINKTYPE_ETHERNET: (14, 12), LINKTYPE_LINUX_SLL: (16, 14), LINKTYPE_LINUX_SLL2: (20, 0),
}
_PCAP_MAGIC = {  # magic as read little-endian -> (byte order, fraction divisor)
    0xA1B2C3D4: ("<", 1_000_000), 0xD4C3B2A1: (">", 1_000_000),
    0xA1B23C4D: ("<", 1_000_000_000), 0x4D3CB2A1: (">", 1_000_000_000),
}
_SHB = b"\x0a\x0d\x0d\x0a"
_U16 = struct.Struct("!H")

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]


@dataclass(frozen=True, slots=True)
class CapturedPacket:
    """One captured frame and the IP packet in it.

    ``ip`` is trimmed to the IP header's length when the frame is longer
    (Ethernet padding, FCS), never extended past the captured bytes; it is
    None when the frame carries no IP.  ``ip_offset`` is where ``ip`` starts
    in ``frame`` (None with ``ip``).
    """

    index: int
    timestamp: float
    linktype: int
    frame: bytes
    ip: Optional[bytes]
    ip_offset: Optional[int]


def _ip_offset(linktype: int, frame: bytes) -> Optional[int]:
    """Where the IP header starts in ``frame``, or None for a frame without IP."""
    n = len(frame)
    if linktype in _RAW_TYPES:
        return 0 if n and frame[0] >> 4 in (4, 6) else None
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        # NULL is in the capturing host's byte order, LOOP in network order;
        # families are small, so the right reading is the one below 256.
        family = int.from_bytes(frame[:4], "little")
        if family > 0xFF:
            family = int.from_bytes(frame[:4], "big")
        return 4 if n >= 4 and family in _AF_IP else None
    off, proto_at = _L2_HEADER.get(linktype, (0, -1))
    if proto_at < 0 or n < off:
        return None
    proto = _U16.unpack_from(frame, proto_at)[0]
    while proto in _VLAN_TPIDS and n >= off + 4:  # 802.1Q / 802.1ad tags, stacked
        proto = _U16.unpack_from(frame, off + 2)[0]
        off += 4
    return off if proto in _ETHERTYPE_IP else None


def _ip_bytes(frame: bytes, off: int) -> bytes:
    """The IP packet at ``off``, cut at the header's length if the frame is longer."""
    avail = len(frame) - off
    end = len(frame)
    if avail >= 4 and frame[off] >> 4 == 4:
        total = _U16.unpack_from(frame, off + 2)[0]
        if 20 <= total < avail:
            end = off + total
    elif avail >= 6 and frame[off] >> 4 == 6:
        payload = _U16.unpack_from(frame, off + 4)[0]
        if payload and 40 + payload < avail:  # 0: jumbogram, keep all
            end = off + 40 + payload
    return frame if off == 0 and end == len(frame) else frame[off:end]


def _packet(index: int, ts: float, linktype: int, frame: bytes) -> CapturedPacket:
    off = _ip_offset(linktype, frame)
    ip = None if off is None else _ip_bytes(frame, off)
    return CapturedPacket(index, ts, linktype, frame, ip, off)


class _Input:
    """A binary stream that knows its offset and its name for error messages."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self.f, self.name, self.offset = f, name, 0

    def error(self, message: str, offset: Optional[int] = None) -> ConfigError:
        at = self.offset if offset is None else offset
        return ConfigError(f"{self.name}: {message} (offset {at})")

    def read(self, n: int, what: str, eof_ok: bool = False, start: int = -1) -> bytes:
        """Exactly ``n`` bytes of ``what`` (which began at ``start``); b"" at a clean end."""
        data = self.f.read(n)
        while 0 < len(data) < n:  # pipes and raw files may return short reads
            more = self.f.read(n - len(data))
            if not more:
                break
            data += more
        if len(data) != n and not (eof_ok and not data):
            at = self.offset + len(data)
            begin = self.offset if start < 0 else start
            raise ConfigError(f"{self.name}: truncated at offset {at} "
                              f"(in {what} starting at offset {begin})")
        self.offset += len(data)
        return data


def read_packets(source: PathOrFile) -> Iterator[CapturedPacket]:
    """Yield the packets of a pcap or pcapng file (a path or a binary file object).

    A path is opened and closed here; a file object is read from its current
    position and left open.  Raises :class:`ConfigError` (file name and
    offset in the message) for a file that is not a capture or is cut short.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            f = open(source, "rb")
        except OSError as e:
            raise ConfigError(f"{source}: {e.strerror}") from None
        try:
            yield from _read(_Input(f, os.fspath(source)))
        finally:
            f.close()
    else:
        yield from _read(_Input(source, str(getattr(source, "name", "<stream>"))))


def _read(inp: _Input) -> Iterator[CapturedPacket]:
    magic = inp.read(4, "file header", eof_ok=True)
    if not magic:
        raise inp.error("empty file, not a pcap or pcapng capture", 0)
    if magic == _SHB:
        yield from _read_pcapng(inp, magic)
        return
    order_frac = _PCAP_MAGIC.get(int.from_bytes(magic, "little"))
    if order_frac is None:
        raise inp.error(f"not a pcap or pcapng file (magic {magic.hex()})", 0)
    order, frac = order_frac
    header = inp.read(20, "pcap file header", start=0)
    linktype = struct.unpack(order + "I", header[16:20])[0] & 0xFFFF
    record = struct.Struct(order + "IIII")
    index = 0
    while True:
        start = inp.offset
        head = inp.read(16, "record header", eof_ok=True)
        if not head:
            return
        sec, sub, caplen, _ = record.unpack(head)
        if caplen > MAX_BLOCK:
            raise inp.error(f"record of {caplen} bytes is absurd", start)
        frame = inp.read(caplen, "record", start=start)
        yield _packet(index, (sec * frac + sub) / frac, linktype, frame)
        index += 1


@dataclass
class _Interface:
    linktype: int
    snaplen: int
    divisor: int = 1_000_000  # ticks per second (if_tsresol)
    offset: int = 0  # seconds added to timestamps (if_tsoffset)


def _read_pcapng(inp: _Input, first: bytes) -> Iterator[CapturedPacket]:
    order = "<"
    interfaces: list[_Interface] = []
    index = 0
    btype_raw: bytes = first
    while True:
        start = inp.offset - 4
        head = inp.read(4, "block header", start=start)
        if btype_raw == _SHB:  # a new section: its byte order, no interfaces yet
            bom = inp.read(4, "section header", start=start)
            if bom == b"\x4d\x3c\x2b\x1a":
                order = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                order = ">"
            else:
                raise inp.error(f"bad pcapng byte-order magic {bom.hex()}", start + 8)
            interfaces = []
            prefix = bom
        else:
            prefix = b""
        btype, length = struct.unpack(order + "II", btype_raw + head)
        what = f"block of type {btype:#x}"
        if length < (28 if prefix else 12) or length % 4 or length > MAX_BLOCK:
            raise inp.error(f"pcapng {what} has a bad length {length}", start)
        body = prefix + inp.read(length - 12 - len(prefix), what, start=start)
        if struct.unpack(order + "I", inp.read(4, what, start=start))[0] != length:
            raise inp.error("pcapng block lengths disagree", start)
        if prefix and struct.unpack(order + "H", body[4:6])[0] != 1:
            raise inp.error("unsupported pcapng major version", start)
        elif btype == 1:
            interfaces.append(_parse_idb(inp, order, body, start))
        elif btype in (6, 2, 3):  # enhanced, obsolete and simple packet blocks
            yield _parse_packet_block(inp, order, btype, body, interfaces, index, start)
            index += 1
        # Other blocks (name resolution, statistics, secrets, custom...) are skipped.
        btype_raw = inp.read(4, "block header", eof_ok=True)
        if not btype_raw:
            return


def _parse_idb(inp: _Input, order: str, body: bytes, start: int) -> _Interface:
    if len(body) < 8:
        raise inp.error("interface description block is too short", start)
    linktype, _, snaplen = struct.unpack(order + "HHI", body[:8])
    iface = _Interface(linktype, snaplen)
    pos = 8
    while pos + 4 <= len(body):
        code, size = struct.unpack(order + "HH", body[pos:pos + 4])
        value = body[pos + 4:pos + 4 + size]
        if code == 0:
            break
        if len(value) != size:
            raise inp.error("interface option runs past its block", start)
        if code == 9 and size == 1:  # if_tsresol: 10^-v, or 2^-v with the top bit
            v = value[0]
            iface.divisor = 1 << (v & 0x7F) if v & 0x80 else 10 ** v
        elif code == 14 and size == 8:  # if_tsoffset
            iface.offset = struct.unpack(order + "q", value)[0]
        pos += 4 + size + (-size % 4)
    return iface


def _parse_packet_block(inp: _Input, order: str, btype: int, body: bytes,
                        interfaces: list[_Interface], index: int,
                        start: int) -> CapturedPacket:
    if btype == 3:  # simple packet block: interface 0, no timestamp
        if len(body) < 4:
            raise inp.error("simple packet block is too short", start)
        if_id, ts_ticks = 0, None
        origlen = struct.unpack(order + "I", body[:4])[0]
        caplen = min(origlen, len(body) - 4)
        data_at = 4
    else:
        if len(body) < 20:
            raise inp.error("packet block is too short", start)
        if btype == 6:
            if_id, hi, lo, caplen, _ = struct.unpack(order + "IIIII", body[:20])
        else:
            if_id, _, hi, lo, caplen, _ = struct.unpack(order + "HHIIII", body[:20])
        ts_ticks = hi << 32 | lo
        data_at = 20
        if caplen > len(body) - 20:
            raise inp.error(f"packet of {caplen} bytes overruns its block", start)
    if if_id >= len(interfaces):
        raise inp.error(f"packet for interface {if_id}, but the section describes "
                        f"{len(interfaces)}", start)
    iface = interfaces[if_id]
    if btype == 3 and iface.snaplen:
        caplen = min(caplen, iface.snaplen)
    ts = 0.0 if ts_ticks is None else ts_ticks / iface.divisor + iface.offset
    frame = body[data_at:data_at + caplen]
    return _packet(index, ts, iface.linktype, frame)


class PcapWriter:
    """Write classic pcap: microsecond timestamps, little-endian, one link type.

    A path is created (truncated) and closed by :meth:`close`; a file object
    is flushed but left open.  Packets over ``snaplen`` are cut, their
    original length recorded.  ``count`` is the number of packets written.
    A write that fails (a full disk) is a :class:`ConfigError` naming the
    file; what was written stays.
    """

    def __init__(self, target: PathOrFile, linktype: int = LINKTYPE_RAW,
                 snaplen: int = 262144) -> None:
        if not 0 < snaplen <= MAX_BLOCK:
            raise ConfigError(f"snaplen {snaplen} is out of range")
        self.linktype, self.snaplen, self.count = linktype, snaplen, 0
        self._own = isinstance(target, (str, os.PathLike))
        self.name = str(target) if self._own else str(getattr(target, "name", "<capture>"))
        if self._own:
            try:
                self._f: Optional[BinaryIO] = open(target, "wb")
            except OSError as e:
                raise ConfigError(f"{target}: {e.strerror}") from None
        else:
            self._f = target  # type: ignore[assignment]
        try:
            self._f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype))
        except OSError as e:
            self._abandon()
            raise self._failed(e) from None

    def _failed(self, e: OSError) -> ConfigError:
        return ConfigError(f"{self.name}: {e.strerror or e} (the capture written so far "
                           "is incomplete)")

    def _abandon(self) -> None:
        f, self._f = self._f, None
        if self._own and f is not None:
            try:
                f.close()       # flushes once more, fails the same way: it is closed anyway
            except OSError:
                pass

    def write(self, packet: bytes, timestamp: Optional[float] = None) -> None:
        """Append one packet; ``timestamp`` in seconds since the epoch, default now."""
        if self._f is None:
            raise ConfigError("write to a closed PcapWriter")
        ts = time.time() if timestamp is None else timestamp
        if not 0 <= ts < 2**32:
            raise ConfigError(f"timestamp {ts} does not fit a pcap record")
        usec_total = round(ts * 1_000_000)
        sec, usec = divmod(usec_total, 1_000_000)
        length = len(packet)
        caplen = min(length, self.snaplen)
        try:
            self._f.write(struct.pack("<IIII", sec, usec, caplen, length))
            self._f.write(packet if caplen == length else packet[:caplen])
        except OSError as e:
            self._abandon()
            raise self._failed(e) from None
        self.count += 1

    def close(self) -> None:
        """Flush, and close the file if this writer opened it (idempotent)."""
        if self._f is None:
            return
        try:
            self._f.flush()
        except OSError as e:
            self._abandon()
            raise self._failed(e) from None
        f, self._f = self._f, None
        if self._own:
            f.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.close()
        except ConfigError:
            if exc_type is None:   # else the error on its way out says it already
                raise


# ---- Wireshark esp_sa ----------------------------------------------------------
# Names as in Wireshark's epan/dissectors/packet-ipsec.c (esp_encryption_type_vals,
# esp_authentication_type_vals); keys as XFRM holds them, salt/nonce at the end,
# which is what Wireshark expects for GCM, CTR and ChaCha20-Poly1305.

_WS_AEAD = {
    ("rfc4106(gcm(aes))", 64): "AES-GCM with 8 octet ICV [RFC4106]",
    ("rfc4106(gcm(aes))", 96): "AES-GCM with 12 octet ICV [RFC4106]",
    ("rfc4106(gcm(aes))", 128): "AES-GCM with 16 octet ICV [RFC4106]",
    ("rfc7539esp(chacha20,poly1305)", 128): "ChaCha20 with Poly1305 [RFC7634]",
}
_WS_ENC = {
    "ecb(cipher_null)": "NULL",
    "cbc(aes)": "AES-CBC [RFC3602]",
    "rfc3686(ctr(aes))": "AES-CTR [RFC3686]",
}
_WS_AUTH = {
    ("hmac(sha1)", 96): "HMAC-SHA-1-96 [RFC2404]",
    ("hmac(sha256)", 96): "HMAC-SHA-256-96 [draft-ietf-ipsec-ciph-sha-256-00]",
    ("hmac(sha256)", 128): "HMAC-SHA-256-128 [RFC4868]",
    ("hmac(sha384)", 192): "HMAC-SHA-384-192 [RFC4868]",
    ("hmac(sha512)", 256): "HMAC-SHA-512-256 [RFC4868]",
    ("hmac(md5)", 96): "HMAC-MD5-96 [RFC2403]",
}
_WS_ANY_AUTH_BITS = (64, 96, 128, 192, 256)  # "ANY n bit authentication [no checking]"
_ESP_SA_COLUMNS = ("Protocol", "Src IP", "Dest IP", "SPI", "Encryption", "Encryption Key",
                   "Authentication", "Authentication Key", "SN", "ESN High Bits")


class EspSaExport(NamedTuple):
    """What :func:`write_wireshark_esp_sa` did: SAs written, and (spi, reason) skipped."""

    written: int
    skipped: list[tuple[int, str]]


def _ws_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    text = addr.compressed
    return addr.exploded if addr.version == 6 and "." in text else text


def _esp_sa_fields(info: SAInfo) -> tuple[Optional[list[str]], str]:
    """The UAT fields for an SA, or None and why Wireshark cannot take it."""
    if info.proto != PROTO_ESP:
        return None, "not an ESP SA"
    note = ""
    try:
        if info.aead is not None:
            alg = algorithms.lookup("aead", info.aead.name)
            bits = info.aead.bits or alg.default_icv_bits
            enc = _WS_AEAD.get((alg.name, bits))
            if enc is None:
                known = any(name == alg.name for name, _ in _WS_AEAD)
                return None, (f"Wireshark cannot decrypt {alg.name}"
                              + (f" with a {bits}-bit ICV" if known else ""))
            enc_key, auth, auth_key = info.aead.key, "NULL", ""
        elif info.enc is not None and info.auth is not None:
            ealg = algorithms.lookup("enc", info.enc.name)
            aalg = algorithms.lookup("auth", info.auth.name)
            enc = _WS_ENC.get(ealg.name)
            if enc is None:
                return None, f"Wireshark cannot decrypt {ealg.name}"
            bits = info.auth.bits or aalg.default_icv_bits
            auth = _WS_AUTH.get((aalg.name, bits))
            if auth is None:
                if bits not in _WS_ANY_AUTH_BITS:
                    return None, f"Wireshark has no {bits}-bit ICV for {aalg.name}"
                auth = f"ANY {bits} bit authentication [no checking]"
                note = f"Wireshark cannot check {aalg.name}/{bits}: ICVs left unchecked"
            enc_key, auth_key = info.enc.key, "0x" + info.auth.key.hex()
        else:
            return None, "no aead, or no enc with auth"
    except ConfigError as e:
        return None, str(e)
    seq_hi = info.replay_seq_hi if info.dir == "in" else (info.replay_oseq_hi
                                                          or info.replay_seq_hi)
    fields = ["IPv4" if info.dst.version == 4 else "IPv6",
              _ws_address(info.src), _ws_address(info.dst), f"0x{info.spi:08x}",
              enc, "0x" + enc_key.hex() if enc_key else "", auth, auth_key,
              "64-bit" if info.esn else "32-bit", f"{seq_hi:x}" if info.esn else "0"]
    return fields, note


def write_wireshark_esp_sa(path: Union[str, os.PathLike[str]], entries: Iterable[SAInfo],
                           esn_columns: bool = True) -> EspSaExport:
    """Write ``entries`` as Wireshark's ``esp_sa`` table; the file gets mode 0600.

    One quoted, comma-separated line per SA, in the columns of current
    Wireshark (the last two, SN and ESN High Bits, carry extended sequence
    numbers; releases without them, e.g. 4.0, warn and ignore them).
    ``esn_columns=False`` writes the 8 older columns and skips ESN SAs.  An SA
    Wireshark cannot decrypt (AES-CCM, AES-GMAC, an ICV length it lacks) is
    written as a ``#`` comment and listed in ``skipped``; a transform it can
    decrypt but not check (cmac(aes)) gets its "ANY n bit" entry.  ChaCha20
    needs a Wireshark newer than 4.0.  The file is opened 0600 before any key
    is written, and chmod-ed to 0600 if it existed.
    """
    ncols = 10 if esn_columns else 8
    lines = ["# Wireshark ESP SAs (esp_sa), written by espdp. It holds KEYS: keep it private.\n",
             f"# {', '.join(_ESP_SA_COLUMNS[:ncols])}\n"]
    written, skipped = 0, []
    for info in entries:
        fields, why = _esp_sa_fields(info)
        if fields is not None and info.esn and not esn_columns:
            fields, why = None, "ESN needs the SN columns of recent Wireshark"
        label = f"SPI 0x{info.spi:08x} {info.src} -> {info.dst}"
        if fields is None:
            skipped.append((info.spi, why))
            lines.append(f"# skipped {label}: {why}\n")
            continue
        if why:
            lines.append(f"# {label}: {why}\n")
        lines.append(",".join(f'"{v}"' for v in fields[:ncols]) + "\n")
        written += 1
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            os.fchmod(fd, 0o600)  # the mode given to os.open only applies to a new file
            f.writelines(lines)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    return EspSaExport(written, skipped)

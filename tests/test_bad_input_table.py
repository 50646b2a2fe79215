"""Bad input, one table (issue 8): each row is an input and what must become
of it, checked exactly.

* ``Esp`` rows: outer packets given to the engine through an SA pair's table
  (tests/helpers.py).  Every packet gets the named verdict, exactly that
  drop counter moves by the number of packets -- the SA's when the packet
  reached one, the table's when it was refused before -- and nothing else
  moves; the SA then still decrypts a good packet.  ``EspOut`` rows are the
  same on the way out.
* ``Demux`` rows: datagrams on the UDP encapsulation socket (RFC 3948:
  keepalive, non-ESP marker, ESP), through the C ``recvmmsg`` path and the
  Python fallback alike: the socket's counters exactly, the IKE callback's
  message, and the engine's verdict for what passed as ESP.
* ``Xfrm`` rows: a bad ``ip xfrm`` script read by the CLI (exit 2, one line
  ``espdp: FILE:LINE: ...`` naming the problem) and its last line sent to a
  running daemon's control socket (an error answer with the same words).
* ``Toml`` rows: ``espdp run --config`` as a subprocess in a namespace of its
  own: refused, exit 2, one line naming the problem, no traceback.
* ``Control`` rows: raw bytes to a running daemon's control socket: an
  error answer (or the connection closed, for an oversized request), and the
  daemon keeps serving, on that connection and on a new one.
* ``Peer`` rows: a connection from another user (a forked child that
  ``setuid``s to nobody): refused, counted, and the daemon keeps serving.

No message, answer or output of any row may show key material.  The rows
that overlap tests/test_bad_packets.py (which sweeps bit flips, truncations
and random bytes over every transform) use its helpers; here each kind of bad
input is one named row with its exact outcome.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from helpers import (
    decrypt_all,
    esp_packet,
    esp_seal,
    inner_packet,
    ipv6_with_headers,
    layout,
    make_pair,
    outer_ip,
    sa_info,
    udp_header,
    with_lengths,
)

from espdp.engine import SA, PacketBatch, SATable
from espdp.io import UdpEncapSocket

NEEDS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root, network namespaces and /dev/net/tun")

# Distinctive key material: no message may contain it.
SECRET_HEX = "5ec12e7a" * 5                            # 20 bytes: AES-128 + salt
SECRET_TEXT = "hunter2hunter2hunter2"                  # a text key (iproute2 takes those)
SECRETS = (SECRET_HEX, SECRET_TEXT)


def assert_no_secret(text: str) -> None:
    low = text.lower()
    for secret in SECRETS:
        assert secret not in low, "key material shows"


# ---------------------------------------------------------------- ESP rows

@dataclass
class Ctx:
    """The pair under test and how its packets are built."""

    pair: Any
    family: int
    transform: str
    encap: bool

    def good(self, size: int = 48, fill: int = 0) -> bytes:
        """The next packet the outbound SA makes."""
        verdict, packet, _ = self.pair.out.encrypt_packet(inner_packet(4, "udp", size,
                                                                       fill=fill))
        assert verdict == "ok"
        return packet

    def sealed(self, seq: int, nh: int = 4, payload: Optional[bytes] = None, spi: int = 0x1001,
               **kw) -> bytes:
        """ESP built by ``cryptography`` (helpers.esp_seal), with any field wrong."""
        payload = inner_packet(4) if payload is None else payload
        esp = esp_seal(self.transform, spi, seq, payload, nh, **kw)
        return esp_packet(self.family, esp, encap=self.encap)

    def accepted(self, packet: bytes) -> bytes:
        """``packet``, after checking that the SA takes it (set-up for replay rows)."""
        assert self.pair.table.decrypt_packet(packet)[0] == "ok"
        return packet


@dataclass
class Esp:
    id: str
    make: Callable[[Ctx], list]
    verdict: str
    counted: str                        # "sa" (the SA's drops) or "table" (before an SA)
    family: int = 4
    transform: str = "gcm"
    encap: bool = False
    sa: dict = field(default_factory=dict)

    def check(self, request) -> None:
        info = sa_info(self.family, transform=self.transform, encap=self.encap,
                       **{"replay_window": 32, **self.sa})
        pair = make_pair(info)
        ctx = Ctx(pair, self.family, self.transform, self.encap)
        packets = self.make(ctx)
        assert packets, "a row needs input"
        sa_before = Counter(pair.inb.stats()["drops"])
        table_before = Counter(pair.table.stats())
        packets_before = pair.inb.stats()["packets"]
        results, _, ok = decrypt_all(pair.table, packets, slot=65536 + 256)
        assert [r[0] for r in results] == [self.verdict] * len(packets)
        moved = {self.verdict: len(packets)}
        sa_moved = dict(Counter(pair.inb.stats()["drops"]) - sa_before)
        table_moved = dict(Counter(pair.table.stats()) - table_before)
        assert sa_moved == (moved if self.counted == "sa" else {})
        assert table_moved == (moved if self.counted == "table" else {})
        assert ok == 0
        if self.verdict != "dummy":      # a dummy packet passed its ICV: it counts as one
            assert pair.inb.stats()["packets"] == packets_before
        # ... and the SA still works.
        pair.out.oseq = max(pair.out.oseq, pair.inb.replay_top)
        inner = inner_packet(4, "icmp", 20)
        assert pair.table.decrypt_packet(pair.out.encrypt_packet(inner)[1])[:2] == ("ok", inner)


@dataclass
class EspOut:
    """Outbound: inner packets the SA must refuse (no packet, a counted drop)."""

    id: str
    make: Callable[[Any], list]            # (SA) -> inner packets, after any set-up
    verdict: str
    slot: int = 2048
    sa: dict = field(default_factory=dict)

    def check(self, request) -> None:
        sa = SA(sa_info(4, **self.sa))
        inners = self.make(sa)
        oseq = sa.oseq
        batch = PacketBatch(len(inners), self.slot, 128)
        for p in inners:
            batch.add(p)
        assert sa.encrypt(batch) == 0
        assert [batch.result(i) for i in range(batch.count)] == \
            [(self.verdict, None, 0)] * len(inners)
        assert sa.stats()["drops"] == {self.verdict: len(inners)}
        assert sa.stats()["packets"] == 0 and sa.oseq == oseq   # no sequence number spent


def _prefixes(ctx: Ctx) -> list:
    packet = ctx.good()
    return [packet[:n] for n in range(len(packet))]


def _consistent_cuts(ctx: Ctx, lo: int, hi: int) -> list:
    """The packet cut to each length whose ESP part is in [lo, hi), length fields fixed."""
    packet = ctx.good()
    esp = layout(packet).esp
    return [with_lengths(packet, n) for n in range(esp + lo, min(esp + hi, len(packet)))]


def _esp_overhead(ctx: Ctx) -> int:
    """ESP header + IV + ICV + the two trailer bytes: the least that reaches the ICV."""
    iv = 16 if ctx.transform == "cbc-sha256" else 8
    return 8 + iv + 16 + 2


def _flip(packet: bytes, offset: int, mask: int = 1) -> bytes:
    """``packet`` with ``mask`` flipped at ``offset`` (from the end when negative)."""
    p = bytearray(packet)
    p[offset] ^= mask
    return bytes(p)


def _set(packet: bytes, offset: int, value: bytes) -> bytes:
    p = bytearray(packet)
    p[offset:offset + len(value)] = value
    return bytes(p)


def _flip_esp(packet: bytes, k: int, mask: int = 1) -> bytes:
    """Flip a bit ``k`` bytes into the ESP header."""
    return _flip(packet, layout(packet).esp + k, mask)


def _set_spi(packet: bytes, spi: int) -> bytes:
    return _set(packet, layout(packet).esp, spi.to_bytes(4, "big"))


def _with_frag(packet: bytes, word: int) -> bytes:
    """IPv4 flags + fragment offset set to ``word`` (header checksum not recomputed:
    the engine does not check it)."""
    return _set(packet, 6, word.to_bytes(2, "big"))


def _v6_frag(offset_and_more: int) -> tuple:
    return (44, offset_and_more.to_bytes(2, "big") + (0xABCD).to_bytes(4, "big"))


PADN = (60, bytes([1, 4, 0, 0, 0, 0]))             # a destination options header: PadN
HBH = (0, bytes([1, 4, 0, 0, 0, 0]))


def _udp_len(packet: bytes, value: int) -> bytes:
    lay = layout(packet)
    return _set(packet, lay.udp + 4, value.to_bytes(2, "big"))


def _bad_pad(ctx: Ctx, pad: bytes, **kw) -> list:
    inner = inner_packet(4, "udp", 22)   # 50 bytes + pad + 2: padding of 4k (or 16k) bytes
    return [ctx.sealed(1, payload=inner, pad=pad, **kw)]


ESP_ROWS = [
    # truncation
    Esp("esp-truncated-at-every-offset-v4-udp", _prefixes, "malformed", "table", encap=True),
    Esp("esp-truncated-at-every-offset-v6-raw", _prefixes, "malformed", "table", family=6),
    Esp("esp-truncated-at-every-offset-cbc", _prefixes, "malformed", "table",
        transform="cbc-sha256"),
    Esp("esp-shorter-than-its-header-lengths-consistent",
        lambda c: _consistent_cuts(c, 0, 8), "malformed", "table", encap=True),
    Esp("esp-header-without-iv-and-icv-lengths-consistent",
        lambda c: _consistent_cuts(c, 8, _esp_overhead(c)), "malformed", "sa", family=6),
    Esp("esp-cut-after-the-iv-lengths-consistent",
        lambda c: _consistent_cuts(c, _esp_overhead(c), 10 ** 6), "integrity", "sa"),
    Esp("esp-cbc-text-not-whole-blocks",
        lambda c: [esp_packet(4, (lambda e: e[:24 + 21] + e[-16:])(
            esp_seal("cbc-sha256", 0x1001, 1, inner_packet(4, "udp", 22), 4)))],
        "malformed", "sa", transform="cbc-sha256"),
    # padding and next header (sealed with valid ICVs, so the trailer is what is wrong)
    Esp("bad-padding-wrong-byte", lambda c: _bad_pad(c, bytes([1, 2, 7, 4, 5, 6])),
        "bad_padding", "sa"),
    Esp("bad-padding-zeros", lambda c: _bad_pad(c, bytes(6)), "bad_padding", "sa"),
    Esp("bad-padding-cbc-reversed", lambda c: _bad_pad(c, bytes(range(12, 0, -1))),
        "bad_padding", "sa", transform="cbc-sha256"),
    Esp("bad-padding-length-255", lambda c: _bad_pad(c, bytes(range(1, 7)), pad_len=255),
        "bad_padding", "sa"),
    Esp("bad-padding-length-past-the-payload",
        lambda c: _bad_pad(c, bytes(range(1, 7)), pad_len=56), "bad_padding", "sa",
        family=6),
    Esp("wrong-next-header-tcp-in-tunnel-mode", lambda c: [c.sealed(1, nh=6)], "bad_inner",
        "sa"),
    Esp("wrong-next-header-ipv6-over-an-ipv4-inner", lambda c: [c.sealed(1, nh=41)],
        "bad_inner", "sa", encap=True),
    Esp("wrong-next-header-255", lambda c: [c.sealed(1, nh=255)], "bad_inner", "sa",
        transform="chacha"),
    Esp("next-header-59-is-a-dummy-packet", lambda c: [c.sealed(1, nh=59)], "dummy", "sa"),
    Esp("padding-swallows-the-whole-payload",
        lambda c: [c.sealed(1, payload=b"", pad=bytes(range(1, 7)))], "bad_inner", "sa"),
    # the ICV
    Esp("icv-last-bit-flipped", lambda c: [_flip(c.good(), -1)], "integrity", "sa"),
    Esp("icv-first-bit-flipped", lambda c: [_flip(c.good(), -16, 0x80)], "integrity", "sa",
        family=6, encap=True),
    Esp("icv-one-bit-off-chacha", lambda c: [_flip(c.good(), -9, 0x10)], "integrity", "sa",
        transform="chacha"),
    Esp("icv-one-bit-off-hmac", lambda c: [_flip(c.good(), -1)], "integrity", "sa",
        transform="cbc-sha256"),
    Esp("iv-one-bit-off", lambda c: [_flip_esp(c.good(), 8)], "integrity", "sa"),
    Esp("ciphertext-one-bit-off", lambda c: [_flip_esp(c.good(), 20)], "integrity", "sa"),
    Esp("sequence-number-one-bit-off", lambda c: [_flip_esp(c.good(), 7, 0x02)], "integrity",
        "sa"),
    # SPI
    Esp("unknown-spi", lambda c: [c.sealed(1, spi=0x1002)], "no_sa", "table"),
    Esp("unknown-spi-udp", lambda c: [c.sealed(1, spi=0xFFFFFFFF)], "no_sa", "table",
        encap=True),
    Esp("spi-0-raw-esp", lambda c: [_set_spi(c.good(), 0)], "no_sa", "table", family=6),
    Esp("spi-0-in-udp-is-the-non-esp-marker", lambda c: [_set_spi(c.good(), 0)], "non_esp",
        "table", encap=True),
    Esp("spi-one-bit-off", lambda c: [_set_spi(c.good(), 0x1001 ^ 0x100)], "no_sa", "table",
        encap=True),
    Esp("another-destination", lambda c: [c.sealed(1)], "no_sa", "table",
        sa={"dst": sa_info(4).src}),
    Esp("raw-esp-for-an-encapsulating-sa",
        lambda c: [esp_packet(4, esp_seal("gcm", 0x1001, 1, inner_packet(4), 4))],
        "encap_mismatch", "sa", encap=True),
    # sequence numbers
    Esp("sequence-0", lambda c: [c.sealed(0)], "seq_zero", "sa"),
    Esp("replayed", lambda c: [c.accepted(c.good())] * 2, "replay", "sa"),
    Esp("replayed-after-later-ones",
        lambda c: [c.accepted(c.sealed(5)), c.accepted(c.sealed(9)), c.sealed(5)][::2],
        "replay", "sa"),
    Esp("too-old-for-the-window",
        lambda c: [c.accepted(c.sealed(100)) and c.sealed(68), c.sealed(1)], "replay_window",
        "sa"),
    Esp("too-old-for-a-window-of-4096",
        lambda c: [c.accepted(c.sealed(10_000)) and c.sealed(10_000 - 4096)], "replay_window",
        "sa", sa={"replay_window": 4096}),
    # size
    Esp("ipv4-total-length-beyond-the-packet",
        lambda c: [_set(c.good(), 2, (0xFFFF).to_bytes(2, "big"))], "malformed", "table"),
    Esp("ipv6-payload-length-beyond-the-packet",
        lambda c: [_set(c.good(), 4, (len(c.good())).to_bytes(2, "big"))], "malformed",
        "table", family=6),
    Esp("ipv4-header-length-below-20",
        lambda c: [_set(c.good(), 0, b"\x44")], "malformed", "table"),
    Esp("ipv4-header-length-beyond-the-total-length",
        lambda c: [with_lengths(_set(c.good(), 0, b"\x4f"), 52)], "malformed", "table"),
    Esp("ip-version-5", lambda c: [_set(c.good(), 0, b"\x55")], "malformed", "table"),
    Esp("not-esp-nor-udp-tcp", lambda c: [outer_ip(4, bytes(40), proto=6)], "not_esp",
        "table"),
    # fragments
    Esp("ipv4-more-fragments", lambda c: [_with_frag(c.good(), 0x2000)], "fragment", "table"),
    Esp("ipv4-fragment-offset", lambda c: [_with_frag(c.good(), 0x0001)], "fragment",
        "table", encap=True),
    Esp("ipv4-last-fragment-df-set", lambda c: [_with_frag(c.good(), 0x4010)], "fragment",
        "table"),
    Esp("ipv6-fragment-header", lambda c: [ipv6_with_headers(c.good(), [_v6_frag(0x0009)])],
        "fragment", "table", family=6),
    Esp("ipv6-fragment-header-first-piece",
        lambda c: [ipv6_with_headers(c.good(), [_v6_frag(0x0001)])], "fragment", "table",
        family=6, encap=True),
    # IPv6 extension header chains
    Esp("ipv6-chain-hbh-dstopts-fragment",
        lambda c: [ipv6_with_headers(c.good(), [HBH, PADN, _v6_frag(0x0008)])], "fragment",
        "table", family=6),
    Esp("ipv6-chain-longer-than-8-headers",
        lambda c: [ipv6_with_headers(c.good(), [PADN] * 9)], "not_esp", "table", family=6),
    Esp("ipv6-chain-running-past-the-packet",
        lambda c: [_set(ipv6_with_headers(c.good(), [PADN]), 41, b"\xc8")], "malformed",
        "table", family=6),
    Esp("ipv6-chain-ending-in-no-next-header",
        lambda c: [ipv6_with_headers(c.good(), [(59, PADN[1])])], "not_esp", "table",
        family=6),
    Esp("ipv6-chain-ending-in-ah", lambda c: [ipv6_with_headers(c.good(), [(51, PADN[1])])],
        "not_esp", "table", family=6),
    Esp("ipv6-chain-header-cut-short",
        lambda c: [with_lengths(ipv6_with_headers(c.good(), [PADN]), 44)], "malformed",
        "table", family=6),
    # UDP length
    Esp("udp-length-beyond-the-packet",
        lambda c: [_udp_len(c.good(), len(c.good()) - 20 + 1)], "malformed", "table",
        encap=True),
    Esp("udp-length-0", lambda c: [_udp_len(c.good(), 0)], "malformed", "table", encap=True),
    Esp("udp-length-7", lambda c: [_udp_len(c.good(), 7)], "malformed", "table", family=6,
        encap=True),
    Esp("udp-length-one-word-of-esp", lambda c: [_udp_len(c.good(), 12)], "malformed",
        "table", encap=True),
    Esp("udp-length-cuts-the-icv", lambda c: [_udp_len(c.good(), len(c.good()) - 20 - 4)],
        "integrity", "sa", encap=True),
    # the non-ESP marker and keepalives, as the engine sees them inside a whole packet
    Esp("non-esp-marker-with-garbage",
        lambda c: [outer_ip(4, udp_header(bytes(4) + bytes(range(200))), proto=17)],
        "non_esp", "table", encap=True),
    Esp("non-esp-marker-alone", lambda c: [outer_ip(4, udp_header(bytes(4)), proto=17)],
        "non_esp", "table", encap=True),
    Esp("keepalive-0xff", lambda c: [outer_ip(6, udp_header(b"\xff"), proto=17)],
        "keepalive", "table", family=6, encap=True),
    Esp("keepalive-variant-two-0xff",
        lambda c: [outer_ip(4, udp_header(b"\xff\xff"), proto=17)], "malformed", "table",
        encap=True),
    Esp("keepalive-variant-0x00", lambda c: [outer_ip(4, udp_header(b"\x00"), proto=17)],
        "malformed", "table", encap=True),
    Esp("keepalive-variant-0xff-with-padding",
        lambda c: [outer_ip(4, udp_header(b"\xff" + bytes(7)), proto=17)], "no_sa",
        "table", encap=True),
    Esp("empty-udp-datagram", lambda c: [outer_ip(4, udp_header(b""), proto=17)],
        "malformed", "table", encap=True),
]

ESP_OUT_ROWS = [
    EspOut("outbound-too-big-for-the-slot", lambda sa: [inner_packet(4, "udp", 1880)],
           "too_big"),
    EspOut("outbound-sequence-exhausted",
           lambda sa: setattr(sa, "oseq", 0xFFFFFFFF) or [inner_packet(4)] * 3,
           "seq_overflow"),
    EspOut("outbound-sequence-exhausted-esn",
           lambda sa: setattr(sa, "oseq", (1 << 64) - 1) or [inner_packet(4)] * 2,
           "seq_overflow", sa={"flags": frozenset({"esn"}), "replay_window": 32}),
]


# ---------------------------------------------------------------- UDP demultiplexing

@dataclass
class Demux:
    id: str
    payload: bytes
    stats: dict                         # the socket's counters that must be non-zero
    path: str                           # "mmsg" (C) or "python"
    verdict: Optional[str] = None       # the engine's, for a datagram passed on as ESP
    ike: Optional[bytes] = None         # what the IKE callback must get (with on_ike)

    def check(self, request) -> None:
        got = []
        on_ike = (lambda m, peer: got.append(m)) if self.ike is not None else None
        with UdpEncapSocket(socket.AF_INET, 0, "127.0.0.1", on_ike=on_ike) as rx, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            rx.io_path = self.path
            tx.sendto(self.payload, ("127.0.0.1", rx.port))
            assert select.select([rx], [], [], 2)[0]
            batch = PacketBatch(4, 2048, 128)
            added = rx.read_batch(batch)
            assert {k: v for k, v in rx.stats.items() if v} == self.stats
            assert got == ([] if self.ike is None else [self.ike])
            assert added == (1 if self.verdict else 0) == batch.count
            if self.verdict:
                _DEMUX_TABLE.decrypt(batch)
                assert batch.result(0)[0] == self.verdict


def _demux_table() -> SATable:
    table = SATable()
    table.add(SA(sa_info(4, spi=0x1001, encap=True, replay_window=32,
                         dst=ipaddress.ip_address("127.0.0.1"))))
    return table


_DEMUX_TABLE = _demux_table()
_ROOM = 2048 - 128 - 28      # what a slot holds after headroom and the outer headers

_DEMUX_CASES = [
    ("keepalive", b"\xff", {"keepalive": 1}, None, None),
    ("keepalive-variant-two-0xff", b"\xff\xff", {"esp": 1}, "malformed", None),
    ("keepalive-variant-0xfe", b"\xfe", {"esp": 1}, "malformed", None),
    ("empty-datagram", b"", {"esp": 1}, "malformed", None),
    ("three-zero-bytes", bytes(3), {"esp": 1}, "malformed", None),
    ("non-esp-marker-garbage-no-ike-daemon", bytes(4) + b"\x13\x37garbage" * 20,
     {"non_esp": 1, "ike_unhandled": 1}, None, None),
    ("non-esp-marker-garbage-to-the-ike-daemon", bytes(4) + b"\x13\x37garbage" * 20,
     {"non_esp": 1}, None, b"\x13\x37garbage" * 20),
    ("non-esp-marker-alone", bytes(4), {"non_esp": 1}, None, b""),
    ("oversized-datagram", b"\x00\x00\x10\x01\x00\x00\x00\x01" + bytes(_ROOM - 7),
     {"truncated": 1}, None, None),
    ("largest-datagram-that-fits", b"\x00\x00\x10\x01\x00\x00\x00\x01" + bytes(_ROOM - 8),
     {"esp": 1},
     "integrity", None),
    ("esp-unknown-spi", b"\x00\x00\x10\x02" + bytes(60), {"esp": 1}, "no_sa", None),
    ("esp-garbage-for-a-known-spi", b"\x00\x00\x10\x01\x00\x00\x00\x07" + bytes(range(60)),
     {"esp": 1}, "integrity", None),
]
DEMUX_ROWS = [Demux(f"udp-demux-{name}-{path}", payload, {"received": 1, **stats}, path,
                    verdict, ike)
              for name, payload, stats, verdict, ike in _DEMUX_CASES
              for path in ("mmsg", "python")]


# ---------------------------------------------------------------- ip xfrm lines

GCM = "aead 'rfc4106(gcm(aes))'"
SA_HEAD = "ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0xa0b0 mode tunnel"
SA_OK = f"{SA_HEAD} {GCM} 0x{SECRET_HEX} 128"
POL_HEAD = "ip xfrm policy add src 10.9.1.0/24 dst 10.9.2.0/24"


@dataclass
class Xfrm:
    id: str
    text: str                 # the script; its last logical line goes to the daemon too
    message: str              # what the one-line error must say
    line: int = 1             # where the file's error is
    control: bool = True      # also through the control socket

    def check(self, request) -> None:
        from espdp.cli import main

        tmp = request.getfixturevalue("tmp_path")
        capsys = request.getfixturevalue("capsys")
        path = tmp / "sas.xfrm"
        path.write_bytes(self.text.encode("utf-8", "surrogateescape"))
        assert main(["pcap", "decrypt", "--xfrm", str(path), str(tmp / "in.pcap"),
                     str(tmp / "out.pcap")]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and len(err) < 600, err
        assert err.startswith(f"espdp: {path}:{self.line}: "), err
        assert self.message in err, err
        assert_no_secret(err)
        if not self.control or os.geteuid() != 0:   # the daemon needs root
            return
        daemon = request.getfixturevalue("daemon")
        from espdp.client import ControlClient
        from espdp.errors import ConfigError

        last = self.text.rstrip("\n").splitlines()[-1]
        with ControlClient(daemon.control) as client:
            with pytest.raises(ConfigError) as exc:
                client.xfrm(last)
            answer = str(exc.value)
            assert self.message in answer, answer
            assert_no_secret(answer)
            assert client.request("status")["tun"] == "esp0"     # the same connection goes on


XFRM_ROWS = [
    Xfrm("xfrm-not-an-xfrm-command", "ip route add 10.0.0.0/8 dev eth0",
         "'route': expected 'xfrm' after 'ip'"),
    Xfrm("xfrm-unknown-verb", "ip xfrm state frobnicate", "unknown command 'frobnicate'"),
    Xfrm("xfrm-state-add-without-dst", "ip xfrm state add src 192.0.2.1 proto esp spi 1",
         "'dst' is required"),
    Xfrm("xfrm-bad-address", SA_OK.replace("192.0.2.2", "192.0.2.300"),
         "'dst': expected an IPv4 or IPv6 address, got '192.0.2.300'"),
    Xfrm("xfrm-mixed-families", SA_OK.replace("192.0.2.2", "2001:db8::2"),
         "'dst': 2001:db8::2 is not of the same address family as 'src' 192.0.2.1"),
    Xfrm("xfrm-spi-not-a-number", SA_OK.replace("0xa0b0", "zz"),
         "'spi': expected a number, got 'zz'"),
    Xfrm("xfrm-spi-beyond-32-bits", SA_OK.replace("0xa0b0", "0x1ffffffff"),
         "'spi': '0x1ffffffff' is out of range (at most 0xffffffff)"),
    Xfrm("xfrm-word-given-twice", SA_OK + " src 192.0.2.9", "'src' is given twice"),
    Xfrm("xfrm-unterminated-quote", SA_HEAD + " aead 'rfc4106(gcm(aes)) 0x00 128",
         "unterminated ' quote"),
    Xfrm("xfrm-unknown-algorithm", SA_OK.replace("rfc4106(gcm(aes))", "rfc4106(gcm(des))"),
         "'aead': unknown algorithm 'rfc4106(gcm(des))' (known: rfc4106(gcm(aes)), "),
    Xfrm("xfrm-key-too-short", SA_OK.replace(SECRET_HEX, SECRET_HEX[:32 - 2]),
         "rfc4106(gcm(aes)): key is 120 bits, expected 160/224/288 bits"),
    Xfrm("xfrm-key-odd-hex-digits", SA_OK.replace(SECRET_HEX, SECRET_HEX + "a"),
         "key is not valid hex"),
    Xfrm("xfrm-key-not-hex", SA_OK.replace(SECRET_HEX, SECRET_HEX[:-2] + "zz"),
         "key is not valid hex"),
    Xfrm("xfrm-text-key-of-the-wrong-length", SA_OK.replace(f"0x{SECRET_HEX}", SECRET_TEXT),
         "rfc4106(gcm(aes)): key is 168 bits, expected"),
    Xfrm("xfrm-key-and-icv-swapped", f"{SA_HEAD} {GCM} 128 0x{SECRET_HEX}",
         "'aead': expected an ICV length in bits after the key"),
    Xfrm("xfrm-text-key-and-icv-swapped", f"{SA_HEAD} {GCM} 128 {SECRET_TEXT}",
         "'aead': expected an ICV length in bits after the key"),
    Xfrm("xfrm-key-where-the-algorithm-goes", f"{SA_HEAD} aead 0x{SECRET_HEX} 128",
         "'aead': unknown algorithm <a word that may be a key, not shown>"),
    Xfrm("xfrm-text-key-where-the-algorithm-goes", f"{SA_HEAD} aead {SECRET_TEXT} 128",
         "'aead': unknown algorithm <a word that may be a key, not shown>"),
    Xfrm("xfrm-icv-length-impossible", SA_OK[:-3] + "100",
         "rfc4106(gcm(aes)): ICV length 100 bits is invalid (64/96/128)"),
    Xfrm("xfrm-aead-and-auth", SA_OK + f" auth 'hmac(sha1)' 0x{SECRET_HEX}",
         "'auth': an aead algorithm is already given"),
    Xfrm("xfrm-encryption-without-integrity",
         f"{SA_HEAD} enc 'cbc(aes)' 0x{SECRET_HEX[:32]}",
         "enc cbc(aes) without auth: ESP without integrity is refused"),
    Xfrm("xfrm-no-algorithm", SA_HEAD, "an ESP SA needs aead, or enc with auth"),
    Xfrm("xfrm-mode-beet", SA_OK.replace("mode tunnel", "mode beet"),
         "mode beet: only transport and tunnel are supported"),
    Xfrm("xfrm-proto-ah", SA_OK.replace("proto esp", "proto ah"),
         "'proto': only esp is supported, got 'ah'"),
    Xfrm("xfrm-replay-window-not-a-number", SA_OK + " replay-window lots",
         "'replay-window': expected a number, got 'lots'"),
    Xfrm("xfrm-encap-port-out-of-range", SA_OK + " encap espinudp 4500 70000 0.0.0.0",
         "'encap': '70000' is out of range (at most 0xffff)"),
    Xfrm("xfrm-limit-unknown", SA_OK + " limit time-sometimes 5",
         "'limit': unknown limit 'time-sometimes'"),
    Xfrm("xfrm-duplicate-sa", f"{SA_OK}\n{SA_OK}\n",
         "EEXIST: an SA dst 192.0.2.2 spi 0x0000a0b0", line=2),
    Xfrm("xfrm-delete-a-missing-sa",
         "ip xfrm state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x77",
         "ESRCH: no SA dst 192.0.2.2 spi 0x00000077"),
    Xfrm("xfrm-policy-dir-sideways", f"{POL_HEAD} dir sideways",
         "'dir': expected in, out or fwd, got 'sideways'"),
    Xfrm("xfrm-policy-prefix-33", POL_HEAD.replace("10.9.2.0/24", "10.9.2.0/33") + " dir out",
         "'dst': expected an address or ADDRESS/LENGTH, got '10.9.2.0/33'"),
    Xfrm("xfrm-policy-tmpl-proto-ah", f"{POL_HEAD} dir out tmpl proto ah",
         "'proto': only esp is supported, got 'ah'"),
    Xfrm("xfrm-policy-priority-not-a-number", f"{POL_HEAD} dir out priority high",
         "'priority': expected a number, got 'high'"),
    Xfrm("xfrm-policy-action-unknown", f"{POL_HEAD} dir out action drop",
         "'action': expected allow or block, got 'drop'"),
    Xfrm("xfrm-very-long-line", f"{SA_OK} {'x' * 60_000}", "'xxxxxxxxxxxxxxx"),
    Xfrm("xfrm-not-utf8", f"# keys below\n{SA_HEAD} \udcff\udcfe", "not UTF-8 text", line=2,
         control=False),
    Xfrm("xfrm-nul-byte", SA_OK.replace("mode tunnel", "mode tun\0nel"),
         "'mode': expected transport, tunnel or beet, got 'tun\0nel'"),
]


# ---------------------------------------------------------------- TOML for `espdp run`

GOOD_SA = f"""
[[sa]]
src = "192.0.2.1"
dst = "192.0.2.2"
spi = 0xa0b0
mode = "tunnel"
aead = {{ name = "rfc4106(gcm(aes))", key = "0x{SECRET_HEX}", icv_bits = 128 }}
"""


@dataclass
class Toml:
    id: str
    text: Any                 # str, or bytes written as they are
    message: str              # what the one line must say
    flags: tuple = ("--control", "--state-dir")   # given in the row's directory

    def check(self, request) -> None:
        from espdp.lab import python_env

        ns = request.getfixturevalue("toml_netns")
        tmp = request.getfixturevalue("tmp_path")
        path = tmp / "tunnel.toml"
        path.write_bytes(self.text.encode() if isinstance(self.text, str) else self.text)
        (tmp / "not-utf8.xfrm").write_bytes(b"ip xfrm state \xff\xfe\n")
        where = {"--control": str(tmp / "c.sock"), "--state-dir": str(tmp / "st")}
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "espdp", "run", "--config",
                str(path)] + [w for flag in self.flags for w in (flag, where[flag])]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=python_env(), cwd=tmp)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.terminate()          # SIGTERM: it cleans up what it made
            proc.communicate(timeout=10)
            pytest.fail("the configuration was not refused: `espdp run` kept running")
        assert proc.returncode == 2, err
        assert "Traceback" not in err and out == ""
        lines = err.splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("espdp: ")
        assert self.message in lines[0], lines[0]
        assert_no_secret(err)
        assert not os.path.exists(tmp / "c.sock")


TUN = '[tunnel]\ntun = "x0"\n'
TOML_ROWS = [
    Toml("toml-not-toml", "this is = not toml [", "tunnel.toml: "),
    Toml("toml-unknown-table", "[nonsense]\n", "unknown table or key 'nonsense'"),
    Toml("toml-unknown-tunnel-key", TUN + "bogus = 1\n", "unknown key 'bogus'"),
    Toml("toml-no-tun-nor-fd", "[tunnel]\nmtu = 1400\n", "needs 'tun'"),
    Toml("toml-tun-name-too-long", '[tunnel]\ntun = "a-name-far-too-long"\n', "'tun'"),
    Toml("toml-tun-name-with-a-slash", '[tunnel]\ntun = "a/b"\n', "'tun'"),
    Toml("toml-address-an-integer", TUN + "address = [167837953]\n", "'address'"),
    Toml("toml-address-without-sense", TUN + 'address = ["10.0.0.300/24"]\n', "'address'"),
    Toml("toml-route-a-table", TUN + "route = { a = 1 }\n", "'route'"),
    Toml("toml-udp-port-70000", TUN + "udp_port = 70000\n", "'udp_port'"),
    Toml("toml-udp-port-negative", TUN + "udp_port = -1\n", "'udp_port'"),
    Toml("toml-mtu-too-small", TUN + "mtu = 100\n", "'mtu'"),
    Toml("toml-nat-keepalive-a-string", TUN + 'nat_keepalive = "often"\n', "'nat_keepalive'"),
    Toml("toml-raw-esp-a-number", TUN + "raw_esp = 1\n", "'raw_esp'"),
    Toml("toml-metrics-not-host-port", TUN + 'metrics = "nowhere"\n', "HOST:PORT"),
    Toml("toml-address-mode-unknown", TUN + 'address_mode = "loud"\n', "'address_mode'"),
    Toml("toml-sa-unknown-key", TUN + GOOD_SA + 'colour = "red"\n', "unknown key 'colour'"),
    Toml("toml-sa-spi-not-a-number", TUN + GOOD_SA.replace("0xa0b0", '"zz"'), "'spi'"),
    Toml("toml-sa-key-too-short", TUN + GOOD_SA.replace(SECRET_HEX, SECRET_HEX[:30]),
         "key is 120 bits"),
    Toml("toml-sa-key-not-hex", TUN + GOOD_SA.replace(SECRET_HEX, SECRET_HEX[:-1] + "g"),
         "not valid hex"),
    Toml("toml-sa-aead-without-icv-bits", TUN + GOOD_SA.replace(", icv_bits = 128", ""),
         "needs icv_bits"),
    Toml("toml-sa-aead-and-auth",
         TUN + GOOD_SA + f'auth = {{ name = "hmac(sha1)", key = "0x{SECRET_HEX}" }}\n',
         "already given"),
    Toml("toml-sa-enc-without-auth",
         TUN + GOOD_SA.replace('aead = { name = "rfc4106(gcm(aes))"', 'enc = { name = "cbc(aes)"')
         .replace(", icv_bits = 128", "").replace(SECRET_HEX, SECRET_HEX[:32]),
         "without auth"),
    Toml("toml-sa-not-a-table", "sa = 5\n" + TUN, "'sa' must be an array of tables"),
    Toml("toml-policy-dir-sideways",
         TUN + '[[policy]]\nsrc = "10.0.0.0/8"\ndst = "10.1.0.0/16"\ndir = "sideways"\n',
         "[[policy]] 1"),
    Toml("toml-policy-tmpl-unknown-key",
         TUN + '[[policy]]\nsrc = "10.0.0.0/8"\ndst = "10.1.0.0/16"\ndir = "out"\n'
         'tmpl = [{ colour = "red" }]\n', "unknown key 'colour'"),
    Toml("toml-duplicate-sa", TUN + GOOD_SA + GOOD_SA, "SA/policy 2: "),
    Toml("toml-xfrm-file-missing", 'xfrm = "missing.xfrm"\n' + TUN, "missing.xfrm"),
    Toml("toml-xfrm-file-not-utf8", 'xfrm = "not-utf8.xfrm"\n' + TUN, "not UTF-8"),
    Toml("toml-not-utf8", b"[tunnel]\ntun = \"x0\xff\"\n", "not UTF-8"),
    Toml("toml-nested-too-deeply", "a = " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    Toml("toml-fd-not-open", "[tunnel]\nfd = 999\n",
         "fd 999: Bad file descriptor (expected an open TUN device)"),
    Toml("toml-tun-an-existing-other-device", '[tunnel]\ntun = "lo"\n',
         "tun lo: the device exists with other flags"),
    Toml("toml-state-dir-a-file", TUN + 'state_dir = "/etc/hostname"\n',
         "state_dir /etc/hostname: not a directory", flags=("--control",)),
    Toml("toml-control-under-a-file", TUN + 'control = "/etc/hostname/c.sock"\n',
         "control socket /etc/hostname/c.sock: a path in it is not a directory",
         flags=("--state-dir",)),
    Toml("toml-control-in-a-missing-directory", TUN + 'control = "/proc/none/c.sock"\n',
         "control socket /proc/none/c.sock: No such file or directory",
         flags=("--state-dir",)),
]


# ---------------------------------------------------------------- control socket

@dataclass
class Control:
    id: str
    data: bytes
    error: Optional[str]              # the answer's error (None: an ok answer)
    closes: bool = False              # the daemon ends this connection (after answering)

    def check(self, request) -> None:
        daemon = request.getfixturevalue("daemon")
        with _connect(daemon.control) as c:
            reset = False
            try:
                c.sendall(self.data)
            except BrokenPipeError:
                # The daemon closed on an oversized request while it was being sent ...
                reset = True
            try:
                line = _readline(c)
            except ConnectionResetError:
                # ... and the data it left unread made the close a reset, which may
                # drop the answer on the way.
                line, reset = b"", True
            assert not reset or (self.closes and len(self.data) > 2 * 64 * 1024)
            if line or not reset:
                answer = json.loads(line)
                assert_no_secret(json.dumps(answer))
                if self.error is None:
                    assert answer["ok"] is True, answer
                else:
                    assert answer["ok"] is False and self.error in answer["error"], answer
            if self.closes:
                try:
                    assert _readline(c) == b""
                except ConnectionResetError:
                    pass
            else:
                c.sendall(b'{"id": 2, "op": "status"}\n')
                assert json.loads(_readline(c))["result"]["tun"] == "esp0"
        _still_serving(daemon)


def _connect(path: str) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(10)
    c.connect(path)
    return c


def _readline(c: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = c.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _still_serving(daemon) -> None:
    assert daemon.proc.poll() is None, daemon.output()
    with _connect(daemon.control) as c:
        c.sendall(b'{"id": 9, "op": "xfrm", "line": "ip xfrm state count"}\n')
        answer = json.loads(_readline(c))
    assert answer["ok"] is True, answer


LIST_KEYS = b'{"op": "xfrm", "line": "ip xfrm state list", "show_keys": %s}\n'
CONTROL_ROWS = [
    Control("control-not-json", b"{not json\n", "not a JSON object"),
    Control("control-json-array", b"[1, 2]\n", "not a JSON object"),
    Control("control-json-string", b'"status"\n', "not a JSON object"),
    Control("control-not-utf8", b'{"op": "\xff\xfe"}\n', "not a JSON object"),
    Control("control-nul-inside", b'{"op": "sta\x00tus"}\n', "not a JSON object"),
    Control("control-no-op", b'{"id": 1}\n', "'op' must be a string"),
    Control("control-op-a-list", b'{"op": ["xfrm"]}\n', "'op' must be a string"),
    Control("control-unknown-op", b'{"op": "reboot"}\n', "unknown op 'reboot'"),
    Control("control-xfrm-without-line", b'{"op": "xfrm"}\n', "needs a 'line'"),
    Control("control-xfrm-line-a-number", b'{"op": "xfrm", "line": 5}\n', "needs a 'line'"),
    Control("control-monitor-groups-a-string", b'{"op": "monitor", "groups": "sa"}\n',
            "'groups' must be a list"),
    Control("control-nested-too-deeply", b"[" * 60000 + b"\n", "not a JSON object"),
    Control("control-nested-too-deeply-inside",
            b'{"op": "status", "x": ' + b'{"a": ' * 10000 + b"\n", "not a JSON object"),
    Control("control-show-keys-not-true", LIST_KEYS % b'"yes"', None),
    Control("control-show-keys-1", LIST_KEYS % b"1", None),
    Control("control-oversized-line", b"x" * (64 * 1024 + 1), "request longer than", True),
    Control("control-oversized-json", b'{"op": "xfrm", "line": "' + b"a" * (1 << 20),
            "request longer than", True),
    Control("control-oversized-line-arriving-whole",
            b'{"op": "xfrm", "line": "' + b"a" * (64 * 1024) + b'"}\n{"op": "status"}\n',
            "request longer than", True),
]


# ---------------------------------------------------------------- other users

@dataclass
class Peer:
    id: str
    open_modes: bool          # socket 0666 and its directory searchable: only SO_PEERCRED
    expect: str               # what the child sees: "refused" (an answer) or "EACCES"

    def check(self, request) -> None:
        daemon = request.getfixturevalue("daemon")
        directory = os.path.dirname(daemon.control)
        modes = (os.stat(directory).st_mode & 0o7777, os.stat(daemon.control).st_mode & 0o7777)
        before = daemon.status()["control_refused"]
        if self.open_modes:
            os.chmod(directory, 0o711)
            os.chmod(daemon.control, 0o666)
        try:
            seen = _as_nobody(daemon.control)
        finally:
            os.chmod(directory, modes[0])
            os.chmod(daemon.control, modes[1])
        if self.expect == "refused":
            assert json.loads(seen) == {"ok": False, "error": "permission denied"}
            assert daemon.status()["control_refused"] == before + 1
            assert "refused a connection from uid 65534" in daemon.output()
        else:
            assert seen == b"EACCES"
            assert daemon.status()["control_refused"] == before
        _still_serving(daemon)


def _as_nobody(path: str) -> bytes:
    """Connect to ``path`` from a forked child running as uid/gid 65534; what it read."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                c = _connect(path)
            except PermissionError:
                os.write(write_end, b"EACCES")
            else:   # the daemon answers (and closes) as soon as it has looked at us
                os.write(write_end, _readline(c) or b"closed")
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        _, status = os.waitpid(pid, 0)
        assert status == 0
        return os.read(read_end, 65536)
    finally:
        os.close(read_end)


PEER_ROWS = [
    Peer("control-from-another-user-past-the-file-mode", True, "refused"),
    Peer("control-from-another-user-default-modes", False, "EACCES"),
]


# ---------------------------------------------------------------- the table

TABLE = (ESP_ROWS + ESP_OUT_ROWS + DEMUX_ROWS + XFRM_ROWS + TOML_ROWS + CONTROL_ROWS
         + PEER_ROWS)
_NEEDS_NS = (Toml, Control, Peer)


def _param(row):
    marks = [NEEDS_ROOT] if isinstance(row, _NEEDS_NS) else []
    return pytest.param(row, id=row.id, marks=marks)


@pytest.fixture(scope="module")
def daemon():
    """One `espdp run` in a namespace of its own, for the control-socket rows."""
    from espdp.lab import Lab, keys, tunnel_config

    with Lab("tbl") as lab:
        yield lab.start("a", tunnel_config("a", 4, True, *keys()))


@pytest.fixture(scope="module")
def toml_netns():
    """A namespace where `espdp run` may try (and must fail) to start."""
    name = f"espdp-toml{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize("row", [_param(r) for r in TABLE])
def test_bad_input(row, request):
    row.check(request)


def test_the_table_is_whole(capsys):
    ids = [row.id for row in TABLE]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    kinds = Counter(type(row).__name__ for row in TABLE)
    with capsys.disabled():
        print(f"\nbad-input table: {len(TABLE)} rows ("
              + ", ".join(f"{k} {n}" for k, n in kinds.items()) + ")")
    assert set(kinds) == {"Esp", "EspOut", "Demux", "Xfrm", "Toml", "Control", "Peer"}


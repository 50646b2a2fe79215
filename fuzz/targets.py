"""Fuzz targets: every place espdp reads bytes or text it did not write.

Each target takes one input (bytes) and either returns or raises the one
kind of error that input may cause (a clear ``ConfigError`` for a bad
configuration line, nothing at all for a packet: packets are counted and
dropped).  Anything else is a bug, and atheris reports it as a crash.

* ``esp_raw``: arbitrary outer packets against a table of SAs (GCM IPv4
  tunnel, ChaCha20 IPv6 tunnel, CBC+SHA-256 transport, UDP-encapsulated).
* ``esp_sealed``: arbitrary *plaintext* (inner packet, padding, pad length,
  next header) sealed with valid keys by ``cryptography`` so that it passes
  the ICV check and reaches the trailer and inner-packet parsing.
* ``udp_demux``: datagrams on the UDP encapsulation path (keepalive, non-ESP
  marker, ESP) with a fuzzed source address and port.
* ``xfrm_parse``, ``toml_config``: ``ip xfrm`` scripts and TOML files.
* ``control_json``: what a control-socket client sends.
* ``pcap``: capture files (pcap and pcapng).

``SEEDS[name]`` are starting inputs taken from what the tests use.
"""

from __future__ import annotations

import io
import itertools
import socket
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import (  # noqa: E402
    esp_packet,
    esp_seal,
    inner_packet,
    sa_info,
)

from espdp import config  # noqa: E402
from espdp.control import ControlSession  # noqa: E402
from espdp.engine import SA, PacketBatch, SATable  # noqa: E402
from espdp.errors import EspdpError  # noqa: E402
from espdp.io._datagram import deliver, new_stats  # noqa: E402
from espdp.pcap import read_packets  # noqa: E402
from espdp.sa import Encap  # noqa: E402
from espdp.xfrm import Xfrm  # noqa: E402
from espdp.xfrm.policy_parse import parse_xfrm_file  # noqa: E402

# ---------------------------------------------------------------- packets

_LAYOUTS = (  # (transform, family, mode, encap)
    ("gcm", 4, "tunnel", False),
    ("chacha", 6, "tunnel", True),
    ("cbc-sha256", 4, "transport", False),
    ("gcm", 6, "transport", True),
)
_SPIS = [0x100 + k for k in range(len(_LAYOUTS))]
_seq = itertools.count(1)


def _table() -> SATable:
    table = SATable()
    for spi, (transform, family, mode, encap) in zip(_SPIS, _LAYOUTS, strict=True):
        info = sa_info(family, mode, transform, spi=spi, replay_window=0,
                       encap=Encap("espinudp", 4500, 4500) if encap else None)
        table.add(SA(info))
    return table


TABLE = _table()


def esp_raw(data: bytes) -> None:
    verdict, packet, _ = TABLE.decrypt_packet(bytes(data))
    assert verdict != "ok" or packet is not None


def esp_sealed(data: bytes) -> None:
    if len(data) < 4:
        return
    k = data[0] % len(_LAYOUTS)
    transform, family, mode, encap = _LAYOUTS[k]
    nh, pad_len, npad = data[1], data[2], data[3] % 32
    pad, plain = data[4:4 + npad], data[4 + npad:]
    if transform == "cbc-sha256":  # whole blocks, or cryptography refuses
        plain += bytes((-(len(plain) + len(pad) + 2)) % 16)
    esp = esp_seal(transform, _SPIS[k], next(_seq), plain, nh, pad=pad, pad_len=pad_len)
    verdict, packet, _ = TABLE.decrypt_packet(esp_packet(family, esp, encap=encap))
    if verdict == "ok":  # never more than what was sealed (transport: plus the IP header)
        sealed = len(plain) + len(pad)   # a short pad length leaves pad bytes as payload
        assert packet is not None and len(packet) <= sealed + (40 if family == 6 else 20)


# ---------------------------------------------------------------- UDP demultiplexing

_BATCH = PacketBatch(4)


def udp_demux(data: bytes) -> None:
    if len(data) < 3:
        return
    family = socket.AF_INET6 if data[0] & 1 else socket.AF_INET
    host = "2001:db8::9" if family == socket.AF_INET6 else "192.0.2.9"
    payload = data[3:][:_BATCH.slot_size - _BATCH.headroom - 48]
    _BATCH.clear()
    start = _BATCH.headroom + (48 if family == socket.AF_INET6 else 28)
    memoryview(_BATCH.data[0])[start:start + len(payload)] = payload
    local = bytes(16 if family == socket.AF_INET6 else 4)
    got = []
    if deliver(_BATCH, family, len(payload), (host, data[1] << 8 | data[2]), local, 4500,
               new_stats(), lambda m, p: got.append(m)):
        TABLE.decrypt(_BATCH)


# ---------------------------------------------------------------- text

def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def xfrm_parse(data: bytes) -> None:
    try:
        parse_xfrm_file(_text(data), "<fuzz>")
    except EspdpError:
        pass


def toml_config(data: bytes) -> None:
    try:
        config.loads(_text(data), "<fuzz>")
    except EspdpError:
        pass


def control_json(data: bytes) -> None:
    session = ControlSession(Xfrm(), {"status": lambda request, now: {}})
    for chunk in data.split(b"\x00"):   # several reads
        session.receive(chunk + b"\n", 1.0)
        session.take_events()
    assert session.internal_errors == 0   # bad input gets an error answer, never a bug


def pcap(data: bytes) -> None:
    try:
        for _ in read_packets(io.BytesIO(data)):
            pass
    except EspdpError:
        pass


TARGETS = {f.__name__: f for f in (esp_raw, esp_sealed, udp_demux, xfrm_parse, toml_config,
                                   control_json, pcap)}


# ---------------------------------------------------------------- seeds

def _seeds() -> dict[str, list[bytes]]:
    esp = []
    for spi, (transform, family, mode, encap) in zip(_SPIS, _LAYOUTS, strict=True):
        info = sa_info(family, mode, transform, spi=spi,
                       encap=Encap("espinudp", 4500, 4500) if encap else None)
        inner = inner_packet(family) if mode == "tunnel" else _transport(family)
        esp.append(SA(info).encrypt_packet(inner)[1])
    key = "0x" + "11" * 20
    xfrm = (f"ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x10 reqid 1 "
            f"mode tunnel aead 'rfc4106(gcm(aes))' {key} 128 encap espinudp 4500 4500 "
            "0.0.0.0\nip xfrm policy add src 10.0.0.0/8 dst 10.1.0.0/16 dir out tmpl "
            "src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel\n")
    toml = ('[tunnel]\ntun = "esp0"\naddress = ["10.9.1.1/32"]\n[[sa]]\nsrc = "192.0.2.1"\n'
            f'dst = "192.0.2.2"\nspi = 0x10\nmode = "tunnel"\naead = {{ name = '
            f'"rfc4106(gcm(aes))", key = "{key}", icv_bits = 128 }}\n')
    control = (b'{"id":1,"op":"xfrm","line":"' + xfrm.splitlines()[0].encode() + b'"}\x00'
               b'{"id":2,"op":"monitor","groups":["sa"]}\x00{"id":3,"op":"status"}')
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)
    capture = header + b"".join(struct.pack("<IIII", 0, 0, len(p), len(p)) + p for p in esp)
    sealed = [bytes([k, 4, 0, 0]) + inner_packet(_LAYOUTS[k][1]) for k in range(4)]
    return {"esp_raw": esp, "esp_sealed": sealed,
            "udp_demux": [b"\x00\x11\x94" + esp[0], b"\x01\x11\x94\xff",
                          b"\x00\x11\x94\x00\x00\x00\x00ike"],
            "xfrm_parse": [xfrm.encode()], "toml_config": [toml.encode()],
            "control_json": [control], "pcap": [capture]}


def _transport(family: int) -> bytes:
    from helpers import transport_packet

    return transport_packet(family)


SEEDS = _seeds()

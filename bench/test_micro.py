"""Micro-benchmarks of the per-batch steps, with pytest-benchmark.

    .venv/bin/python -m pytest bench/test_micro.py [--benchmark-json out.json]

Not part of the test suite (``testpaths`` is ``tests``): these time, they do
not check.  Each round handles one batch of 64 packets; pytest-benchmark's
table gives the time per batch, so 64 / mean is packets per second.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from espdp import _vnet  # noqa: E402
from espdp._flow import FlowCache  # noqa: E402
from espdp.engine import SA, PacketBatch, SATable  # noqa: E402
from espdp.sa import AlgoKey, SAInfo  # noqa: E402

KEYS = {"aes128gcm16": AlgoKey("rfc4106(gcm(aes))", bytes(range(20)), 128),
        "chacha20poly1305": AlgoKey("rfc7539esp(chacha20,poly1305)", bytes(range(36)), 128)}


def udp_packet(size: int, sport: int = 1000) -> bytes:
    head = bytearray.fromhex("4500000000004000401100000a0000010a000002")
    head[2:4] = size.to_bytes(2, "big")
    return bytes(head) + struct.pack("!HHHH", sport, 5201, size - 20, 0) + bytes(size - 28)


def info(name: str) -> SAInfo:
    return SAInfo(src=ipaddress.ip_address("192.0.2.1"), dst=ipaddress.ip_address("192.0.2.2"),
                  spi=0x1001, mode="tunnel", aead=KEYS[name], replay_window=4096)


@pytest.fixture(params=[64, 1400])
def size(request):
    return request.param


@pytest.mark.parametrize("name", list(KEYS))
def test_encrypt_batch(benchmark, name, size):
    table = SATable()
    index = table.add(SA(info(name)))
    template, work = PacketBatch(64), PacketBatch(64)
    for _ in range(64):
        template.add(udp_packet(size), sa=index)

    def step():
        work.copy_from(template)
        return table.encrypt(work)

    assert benchmark(step) == 64


@pytest.mark.parametrize("name", list(KEYS))
def test_decrypt_batch(benchmark, name, size):
    sender, receiver = SA(info(name)), SATable()
    receiver.add(SA(info(name).replace(replay_window=0)))   # the same packets, again and again
    packets = [sender.encrypt_packet(udp_packet(size))[1] for _ in range(64)]
    template, work = PacketBatch(64, 2304), PacketBatch(64, 2304)
    for p in packets:
        template.add(p)

    def step():
        work.copy_from(template)
        return receiver.decrypt(work)

    assert benchmark(step) == 64


def test_flow_classify_batch(benchmark):
    table = SATable()
    index = table.add(SA(info("aes128gcm16")))
    cache = FlowCache(4096)
    batch = PacketBatch(64)
    for i in range(64):
        batch.add(udp_packet(200, sport=1000 + i % 8))
        cache.insert(batch, i, index, 1500, 1)
    assert len(benchmark(cache.classify, batch, table, 1)) == 0


def test_tso_cut_64k(benchmark):
    """A 64 KiB TCP segment from the TUN cut into 1388-byte packets (47 of them)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    b.setblocking(False)
    head = bytearray.fromhex("4500000000004000400600000a0000010a000002")
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x10, 500, 0, 0)
    payload = bytes(1388 * 47)
    head[2:4] = (20 + 20 + len(payload)).to_bytes(2, "big")
    vnet = struct.pack("<BBHHHH", 1, 1, 40, 1388, 20, 16)
    message = vnet + bytes(head) + tcp + payload
    reader = _vnet.VnetTun(b.fileno())
    batch = PacketBatch(64)
    stats = {"received": 0}

    def step():
        a.send(message)
        batch.clear()
        return reader.read_batch(batch, stats)

    assert benchmark(step) == 47
    a.close()
    b.close()

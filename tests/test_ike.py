"""The IKE relay: IKE behind the non-ESP marker on the UDP port goes to a
local IKE daemon with the peer's address, and its replies go back out."""

from __future__ import annotations

import socket
import time

import pytest

from espdp.engine import PacketBatch
from espdp.errors import ConfigError
from espdp.ike import IkeRelay, frame, unframe
from espdp.io.udp import UdpEncapSocket


@pytest.mark.parametrize("peer", [("192.0.2.9", 4500), ("2001:db8::9", 61000)])
def test_frames_round_trip(peer):
    assert unframe(frame(b"ike!", peer)) == (b"ike!", peer)


@pytest.mark.parametrize("data", [b"", b"\x01\x04\x11", b"\x02\x04\x00\x01" + bytes(4),
                                  b"\x01\x05\x00\x01" + bytes(16), b"\x01\x06\x00\x01\x00"])
def test_bad_frames_are_refused(data):
    assert unframe(data) is None


def test_relay_hands_ike_over_and_sends_replies_from_the_udp_port():
    ike = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)     # the IKE daemon
    ike.bind(("127.0.0.1", 0))
    ike.settimeout(2)
    relay = IkeRelay(f"127.0.0.1:{ike.getsockname()[1]}")
    udp = UdpEncapSocket(socket.AF_INET, 0, "127.0.0.1", on_ike=relay)
    relay.sockets = {4: udp}
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)    # the remote IKE peer
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(2)
    with ike, udp, peer:
        peer.sendto(b"\0\0\0\0" + b"IKE_SA_INIT request", ("127.0.0.1", udp.port))
        time.sleep(0.05)
        assert udp.read_batch(PacketBatch(4)) == 0          # not ESP: no slot
        data, relay_addr = ike.recvfrom(2048)
        assert unframe(data) == (b"IKE_SA_INIT request", peer.getsockname())
        ike.sendto(frame(b"IKE_SA_INIT response", peer.getsockname()), relay_addr)
        ike.sendto(b"garbage", relay_addr)
        time.sleep(0.05)
        assert relay.handle() == 1
        reply, source = peer.recvfrom(2048)
        assert reply == b"\0\0\0\0IKE_SA_INIT response" and source[1] == udp.port
        assert relay.stats == {"to_ike": 1, "from_ike": 1, "forward_errors": 0,
                               "bad_frames": 1, "no_socket": 0}
        assert udp.stats["non_esp"] == 1 and udp.stats["ike_unhandled"] == 0
    relay.close()


def test_bad_endpoint_is_a_config_error():
    with pytest.raises(ConfigError, match="HOST:PORT"):
        IkeRelay("localhost")

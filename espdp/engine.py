"""The per-packet engine: SAs with their crypto contexts, a table with inbound
lookup, and batches of packets processed in place with the GIL released.

>>> import ipaddress
>>> from espdp.sa import SAInfo, AlgoKey
>>> info = SAInfo(src=ipaddress.ip_address("192.0.2.1"), dst=ipaddress.ip_address("192.0.2.2"),
...               spi=0x1001, mode="tunnel", replay_window=32,
...               aead=AlgoKey("rfc4106(gcm(aes))", bytes(20), 128))
>>> out, peer = SA(info), SATable()
>>> _ = peer.add(SA(info))
>>> inner = bytes.fromhex("450000140000400040000000c0a80101c0a80102")  # minimal IPv4 header
>>> verdict, packet, mark = out.encrypt_packet(inner)
>>> verdict, len(packet)
('ok', 76)
>>> peer.decrypt_packet(packet)[0:2] == ("ok", inner)
True

Verdicts are the names in :data:`VERDICTS`; every drop is also counted in
the SA's ``stats()`` (or the table's ``stats()`` when no SA was found).
"""

from ._engine import (
    FLAG_MAPPING,
    FLAG_SOFT_EXPIRED,
    SA,
    VERDICTS,
    OseqSweep,
    PacketBatch,
    SATable,
    oseq_array,
)
from ._replay import ReplayWindow

__all__ = ["FLAG_MAPPING", "FLAG_SOFT_EXPIRED", "VERDICTS", "SA", "PacketBatch", "SATable",
           "ReplayWindow", "OseqSweep", "oseq_array"]

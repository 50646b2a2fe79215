"""Typed stub of src_cython/espdp/_vnet.pyx."""

from collections.abc import Iterable
from typing import Optional

from ._engine import PacketBatch

TUNSETOFFLOAD: int
TUNSETVNETHDRSZ: int
IFF_VNET_HDR: int
TUN_F_CSUM: int
TUN_F_TSO4: int
TUN_F_TSO6: int
HEADER_SIZE: int

class VnetTun:
    fd: int
    pending: bool
    def __init__(self, fd: int) -> None: ...
    def read_batch(self, batch: PacketBatch, stats: dict[str, int]) -> int: ...
    def write_batch(self, batch: PacketBatch, indexes: Optional[Iterable[int]],
                    stats: dict[str, int]) -> int: ...

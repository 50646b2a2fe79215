"""Typed stub of src_cython/espdp/_mmsg.pyx."""

from collections.abc import Iterable
from typing import Optional

from ._engine import PacketBatch

HAVE_MMSG: bool

def recv_batch(fd: int, batch: PacketBatch, family: int, local_port: int,
               local: Optional[bytes], stats: dict[str, int],
               want_ike: bool = True) -> tuple[int, list[tuple[bytes, tuple[str, int]]]]: ...
def send_batch(fd: int, batch: PacketBatch, indexes: Optional[Iterable[int]], family: int,
               stats: dict[str, int], mark: int, gso: bool = False) -> tuple[int, int, bool]: ...
def tun_read_batch(fd: int, batch: PacketBatch, stats: dict[str, int]) -> int: ...
def tun_write_batch(fd: int, batch: PacketBatch, indexes: Optional[Iterable[int]],
                    stats: dict[str, int]) -> int: ...


class GroReader:
    fd: int
    pending: bool
    def __init__(self, fd: int) -> None: ...
    def read(self, batch: PacketBatch, family: int, local_port: int, local: Optional[bytes],
             stats: dict[str, int],
             want_ike: bool = True) -> tuple[int, list[tuple[bytes, tuple[str, int]]]]: ...

def enable_gro(fd: int) -> bool: ...

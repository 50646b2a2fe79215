"""The I/O layer: devices that move whole packets between the kernel (or
memory) and the engine's :class:`espdp.engine.PacketBatch`.

Every device has ``read_batch(batch) -> int`` (fills slots from
``batch.count`` on, each packet placed at the slot's headroom, until EAGAIN
or the batch is full; never blocks), ``write_batch(batch, indexes=None) ->
int`` (writes the given slots' ``[offset:offset + length]``), ``fileno()``,
``close()``, ``stats`` and context-manager use.  This layer never parses ESP:
UDP devices only look at the first word of a datagram (keepalive, non-ESP
marker) and at the outer IP + UDP header the engine wrote.

* :class:`Tun` -- a TUN device created by name or adopted from an fd;
* :class:`UdpEncapSocket` -- ESP in UDP (RFC 3948) over IPv4 or IPv6;
* :class:`MemoryPipe`, :class:`MemoryUdp` -- in-memory pairs for tests.
"""

from .memory import MemoryPipe, MemoryUdp
from .raw import KernelInjector, RawEspSocket
from .tun import Tun
from .udp import UdpEncapSocket

__all__ = ["KernelInjector", "MemoryPipe", "MemoryUdp", "RawEspSocket", "Tun",
           "UdpEncapSocket"]

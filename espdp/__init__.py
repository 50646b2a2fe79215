"""espdp: a userspace ESP (IPsec) dataplane with Linux XFRM semantics.

>>> from espdp import SAInfo, SA, SATable, PacketBatch   # doctest: +SKIP
"""

from .errors import ConfigError, EspdpError, XfrmError
from .sa import AlgoKey, Encap, Lifetime, Mark, SAInfo, Selector

__version__ = "0.1.0"

__all__ = [
    "AlgoKey", "ConfigError", "Encap", "EspdpError", "Lifetime", "Mark", "SAInfo",
    "Selector", "XfrmError", "SA", "SATable", "PacketBatch",
]


def __getattr__(name: str):
    # The compiled engine is imported lazily so that pure-Python tools (the
    # parser, the pcap reader) work before the extension is built.
    if name in ("SA", "SATable", "PacketBatch"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)

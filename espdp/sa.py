"""What an SA and its parts are, as plain data (``struct xfrm_usersa_info``).

These objects are what the ``ip xfrm`` parser produces, what the control
plane stores and what :class:`espdp.engine.SA` is built from.  They hold no
crypto state.  ``repr`` never shows key material.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Optional, Union

from . import algorithms
from .errors import ConfigError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

INFINITY = 0xFFFF_FFFF_FFFF_FFFF  # XFRM_INF: the default byte/packet limit

PROTO_ESP = 50
MAX_REPLAY_WINDOW = 32768  # what XFRM's replay_esn attribute can carry (4096-byte bitmap)
MODES = ("transport", "tunnel", "beet")
SA_FLAGS = {  # name -> XFRM_STATE_* bit
    "noecn": 1, "decap-dscp": 2, "nopmtudisc": 4, "wildrecv": 8,
    "icmp": 16, "af-unspec": 32, "align4": 64, "esn": 128,
}
SA_EXTRA_FLAGS = {"dont-encap-dscp": 1, "oseq-may-wrap": 2}
ENCAP_TYPES = {"espinudp-nonike": 1, "espinudp": 2, "espintcp": 7}


@dataclass(frozen=True)
class Mark:
    """A mark with its mask; ``mask`` defaults to all ones as in iproute2."""

    value: int
    mask: int = 0xFFFFFFFF

    def matches(self, mark: int) -> bool:
        """XFRM lookup: a packet mark matches when ``(mark & m) == v``."""
        return (mark & self.mask) == self.value

    def apply(self, mark: int) -> int:
        """set-mark / output-mark: ``(mark & ~m) | (v & m)``."""
        return (mark & ~self.mask & 0xFFFFFFFF) | (self.value & self.mask)


@dataclass(frozen=True)
class Selector:
    """Traffic selector (``struct xfrm_selector``); ports carry ICMP type/code."""

    src: IPNetwork
    dst: IPNetwork
    proto: int = 0
    sport: int = 0
    sport_mask: int = 0
    dport: int = 0
    dport_mask: int = 0
    ifindex: int = 0

    @property
    def family(self) -> int:
        return self.dst.version


@dataclass(frozen=True)
class Lifetime:
    """Soft and hard limits (``struct xfrm_lifetime_cfg``).

    Byte and packet limits default to infinity; a limit of 0 means expire
    now.  Time limits are seconds, 0 meaning never; ``use`` counts from the
    first use.
    """

    soft_bytes: int = INFINITY
    hard_bytes: int = INFINITY
    soft_packets: int = INFINITY
    hard_packets: int = INFINITY
    soft_add_expires: int = 0
    hard_add_expires: int = 0
    soft_use_expires: int = 0
    hard_use_expires: int = 0


@dataclass(frozen=True)
class Encap:
    """UDP or TCP encapsulation (``struct xfrm_encap_tmpl``)."""

    type: str  # one of ENCAP_TYPES
    sport: int
    dport: int
    oa: Optional[IPAddress] = None


@dataclass(frozen=True)
class AlgoKey:
    """An algorithm with its key; ``bits`` is the ICV length or truncation."""

    name: str
    key: bytes = field(repr=False)
    bits: int = 0

    def __repr__(self) -> str:
        return f"AlgoKey(name={self.name!r}, key=<{len(self.key) * 8} bits>, bits={self.bits})"


@dataclass(frozen=True)
class SAInfo:
    """One security association, as ``ip xfrm state add`` describes it."""

    src: IPAddress
    dst: IPAddress
    spi: int
    proto: int = PROTO_ESP
    mode: str = "transport"
    reqid: int = 0
    dir: Optional[str] = None  # None, "in" or "out"
    seq: int = 0
    mark: Optional[Mark] = None
    if_id: int = 0
    replay_window: int = 0
    replay_seq: int = 0
    replay_oseq: int = 0
    replay_seq_hi: int = 0
    replay_oseq_hi: int = 0
    flags: frozenset = frozenset()
    extra_flags: frozenset = frozenset()
    aead: Optional[AlgoKey] = None
    enc: Optional[AlgoKey] = None
    auth: Optional[AlgoKey] = None
    selector: Optional[Selector] = None
    lifetime: Lifetime = Lifetime()
    encap: Optional[Encap] = None
    set_mark: Optional[Mark] = None
    tfcpad: int = 0
    ttl: int = 64  # outer TTL / hop limit in tunnel mode (espdp's, not XFRM's)

    @property
    def family(self) -> int:
        return self.dst.version

    @property
    def esn(self) -> bool:
        return "esn" in self.flags

    def replace(self, **changes) -> SAInfo:
        return replace(self, **changes)

    def validate(self) -> None:
        """Refuse what XFRM or good sense refuses, with a message for a person."""
        if self.proto != PROTO_ESP:
            raise ConfigError(f"proto {self.proto}: only esp (50) is supported")
        if self.src.version != self.dst.version:
            raise ConfigError(f"src {self.src} and dst {self.dst} are of different families")
        if self.mode not in ("transport", "tunnel"):
            raise ConfigError(f"mode {self.mode}: only transport and tunnel are supported")
        if not 0 <= self.spi <= 0xFFFFFFFF:
            raise ConfigError(f"spi {self.spi:#x} does not fit 32 bits")
        if self.dir not in (None, "in", "out"):
            raise ConfigError(f"dir {self.dir!r}: expected in or out")
        unknown = set(self.flags) - SA_FLAGS.keys() | set(self.extra_flags) - SA_EXTRA_FLAGS.keys()
        if unknown:
            raise ConfigError(f"unknown flag(s): {', '.join(sorted(unknown))}")
        if not 0 <= self.replay_window <= MAX_REPLAY_WINDOW:
            raise ConfigError(f"replay-window {self.replay_window} is out of range "
                              f"0..{MAX_REPLAY_WINDOW}")
        if self.esn and self.replay_window == 0 and self.dir != "out":
            raise ConfigError("flag esn needs a replay-window > 0 on an inbound SA")
        if self.encap is not None:
            if self.encap.type not in ("espinudp", "espinudp-nonike"):
                raise ConfigError(f"encap {self.encap.type}: only espinudp is supported")
            for port in (self.encap.sport, self.encap.dport):
                if not 0 < port < 65536:
                    raise ConfigError(f"encap port {port} is out of range")
        if not 0 < self.ttl < 256:
            raise ConfigError(f"ttl {self.ttl} is out of range 1..255")
        self._validate_algorithms()

    def _validate_algorithms(self) -> None:
        if self.aead is not None:
            if self.enc is not None or self.auth is not None:
                raise ConfigError("aead cannot be combined with enc or auth")
            alg = algorithms.lookup("aead", self.aead.name)
            algorithms.check_key(alg, self.aead.key)
            algorithms.check_icv_bits(alg, self.aead.bits)
            return
        if self.enc is None:
            raise ConfigError("an ESP SA needs aead, or enc with auth")
        algorithms.check_key(algorithms.lookup("enc", self.enc.name), self.enc.key)
        if self.auth is None:
            raise ConfigError(f"enc {self.enc.name} without auth: ESP without integrity is refused")
        alg = algorithms.lookup("auth", self.auth.name)
        algorithms.check_key(alg, self.auth.key)
        algorithms.check_icv_bits(alg, self.auth.bits)

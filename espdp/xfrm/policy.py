"""What a security policy is, as plain data (``struct xfrm_userpolicy_info``).

A :class:`Policy` is a selector, a direction and what to do with the traffic
it selects: let it through in the clear or block it (``action``), and when it
has templates (``tmpl``), which SAs must protect it.  :class:`Flow` is the
traffic side of a lookup and :func:`selector_matches` the kernel's match
(``__xfrm4_selector_match`` / ``__xfrm6_selector_match`` in
``net/xfrm/xfrm_policy.c``).  The database that stores policies is
:mod:`espdp.xfrm.spd`; the ``ip xfrm policy`` reader is
:mod:`espdp.xfrm.policy_parse`.

Checks follow ``verify_newpolicy_info`` and ``validate_tmpl``
(``net/xfrm/xfrm_user.c``); where espdp is stricter it says so.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Optional

from ..errors import ConfigError
from ..sa import PROTO_ESP, IPAddress, Lifetime, Mark, Selector
from ._syntax import GRE, ICMP_PROTOS, PORT_PROTOS

__all__ = [
    "ACTIONS", "DIRS", "DIR_CODE", "LEVELS", "POLICY_FLAGS", "PTYPES", "XFRM_MAX_DEPTH",
    "Flow", "Policy", "Template", "selector_matches",
]

DIR_CODE = {"in": 0, "out": 1, "fwd": 2}  # XFRM_POLICY_IN / _OUT / _FWD
DIRS = tuple(DIR_CODE)
ACTIONS = ("allow", "block")  # XFRM_POLICY_ALLOW 0, XFRM_POLICY_BLOCK 1
PTYPES = ("main", "sub")  # XFRM_POLICY_TYPE_MAIN 0, _SUB 1
LEVELS = ("required", "use")  # xfrm_user_tmpl.optional 0 / 1
POLICY_FLAGS = {"localok": 1, "icmp": 2}  # XFRM_POLICY_LOCALOK, XFRM_POLICY_ICMP
XFRM_MAX_DEPTH = 6  # templates per policy
TEMPLATE_MODES = ("transport", "tunnel")
U32 = 0xFFFFFFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= U32:
        raise ConfigError(f"{name} {value} does not fit 32 bits")


@dataclass(frozen=True)
class Template:
    """One ``tmpl`` of a policy (``struct xfrm_user_tmpl``).

    ``spi`` 0 means any SPI.  ``reqid`` is kept as given: an outbound
    template needs an SA with exactly that reqid, for an inbound one 0 is a
    wildcard (the SAD applies that).  ``level use`` makes the template
    optional.  An absent address is None; an unspecified one (``0.0.0.0``,
    ``::``) is kept as written, and means "any" as it does to the kernel.
    """

    dst: Optional[IPAddress] = None
    src: Optional[IPAddress] = None
    proto: int = PROTO_ESP
    spi: int = 0
    mode: str = "transport"
    reqid: int = 0
    level: str = "required"

    @property
    def optional(self) -> bool:
        return self.level == "use"

    @property
    def family(self) -> Optional[int]:
        """4 or 6 from the addresses; None when the template has none."""
        addr = self.dst if self.dst is not None else self.src
        return None if addr is None else addr.version

    def validate(self) -> None:
        if self.proto != PROTO_ESP:
            raise ConfigError(f"tmpl proto {self.proto}: only esp (50) is supported")
        if self.mode not in TEMPLATE_MODES:
            raise ConfigError(f"tmpl mode {self.mode}: only transport and tunnel are supported")
        if self.level not in LEVELS:
            raise ConfigError(f"tmpl level {self.level!r}: expected required or use")
        _check_u32("tmpl spi", self.spi)
        _check_u32("tmpl reqid", self.reqid)
        if self.src is not None and self.dst is not None and self.src.version != self.dst.version:
            raise ConfigError(f"tmpl src {self.src} and dst {self.dst} are of different families")


@dataclass(frozen=True)
class Policy:
    """One security policy, as ``ip xfrm policy add`` describes it.

    ``index`` 0 asks the SPD to choose one; a given index must carry the
    direction in its low three bits (``index & 7``: in 0, out 1, fwd 2).
    Lower ``priority`` values win.  ``mark`` None is the kernel's {0, 0}
    (matches every packet).  Byte and packet limits in ``lifetime`` are kept
    but, as in the kernel, only the time limits expire a policy.
    """

    selector: Selector
    dir: str
    action: str = "allow"
    priority: int = 0
    index: int = 0
    mark: Optional[Mark] = None
    if_id: int = 0
    templates: tuple[Template, ...] = ()
    lifetime: Lifetime = Lifetime()
    flags: frozenset = frozenset()
    ptype: str = "main"

    @property
    def family(self) -> int:
        return self.selector.family

    @property
    def dir_code(self) -> int:
        return DIR_CODE[self.dir]

    def replace(self, **changes) -> Policy:
        return replace(self, **changes)

    def validate(self) -> None:
        """Refuse what XFRM refuses (``verify_newpolicy_info``, ``validate_tmpl``)."""
        self._validate_words()
        self._validate_numbers()
        self._validate_selector()
        self._validate_templates()

    def _validate_words(self) -> None:
        for name, value, allowed in (("dir", self.dir, DIRS), ("action", self.action, ACTIONS),
                                     ("ptype", self.ptype, PTYPES)):
            if value not in allowed:
                raise ConfigError(f"{name} {value!r}: expected {' or '.join(allowed)}")
        unknown = set(self.flags) - POLICY_FLAGS.keys()
        if unknown:
            raise ConfigError(f"unknown policy flag(s): {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(POLICY_FLAGS)})")

    def _validate_numbers(self) -> None:
        for name in ("priority", "index", "if_id"):
            _check_u32(name, getattr(self, name))
        if self.mark is not None:
            _check_u32("mark", self.mark.value)
            _check_u32("mark mask", self.mark.mask)
        for name, value in vars(self.lifetime).items():
            if not 0 <= value <= U64:
                raise ConfigError(f"limit {name} {value} does not fit 64 bits")
        if self.index and self.index & 7 != self.dir_code:
            raise ConfigError(f"index {self.index:#x} is not a dir {self.dir} index "
                              f"(index & 7 must be {self.dir_code})")

    def _validate_selector(self) -> None:
        sel = self.selector
        if sel.src.version != sel.dst.version:
            raise ConfigError(f"selector src {sel.src} and dst {sel.dst} are of different "
                              "families")
        if not 0 <= sel.proto <= 255:
            raise ConfigError(f"selector proto {sel.proto} is out of range 0..255")
        for name in ("sport", "sport_mask", "dport", "dport_mask"):
            if not 0 <= getattr(sel, name) <= 0xFFFF:
                raise ConfigError(f"selector {name} {getattr(sel, name)} does not fit 16 bits")
        if (sel.sport_mask or sel.dport_mask) and sel.proto not in (
                PORT_PROTOS + ICMP_PROTOS + (GRE,)):
            raise ConfigError(f"selector ports need proto tcp, udp, sctp or dccp "
                              f"(or ICMP type/code, a GRE key), not proto {sel.proto}")

    def _validate_templates(self) -> None:
        if len(self.templates) > XFRM_MAX_DEPTH:
            raise ConfigError(f"{len(self.templates)} templates: at most {XFRM_MAX_DEPTH} "
                              "(XFRM_MAX_DEPTH)")
        family = self.family
        for number, tmpl in enumerate(self.templates, 1):
            tmpl.validate()
            tmpl_family = tmpl.family or family
            if tmpl.mode == "transport" and tmpl_family != family:
                raise ConfigError(f"tmpl {number}: transport mode cannot change the address "
                                  f"family (IPv{family} to IPv{tmpl_family})")
            if tmpl.optional and tmpl.mode != "transport" and self.dir == "out":
                # validate_tmpl (Linux 6.10+): an optional tunnel template would let
                # outbound traffic through unencrypted that only the tunnel may carry
                raise ConfigError(f"tmpl {number}: level use (optional) needs mode transport "
                                  "in a dir out policy")
            family = tmpl_family


@dataclass(frozen=True)
class Flow:
    """The traffic a policy lookup is for (the kernel's ``struct flowi``).

    For ICMP and ICMPv6 ``sport`` carries the type and ``dport`` the code;
    for GRE the upper and lower 16 bits of the key: exactly what
    ``xfrm_flowi_sport``/``xfrm_flowi_dport`` put in the port fields.
    ``ifindex`` is the output interface (a selector ``dev`` matches it).
    """

    src: IPAddress
    dst: IPAddress
    proto: int = 0
    sport: int = 0
    dport: int = 0
    ifindex: int = 0

    def __post_init__(self) -> None:
        if self.src.version != self.dst.version:
            raise ConfigError(f"flow src {self.src} and dst {self.dst} are of different "
                              "families")

    @property
    def family(self) -> int:
        return self.dst.version


_IPV6_EXTENSIONS = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options


def flow_of_packet(packet: bytes) -> Optional[Flow]:
    """The flow of an IP packet as the kernel's decode_session sees it, or None
    when the packet is not a whole enough IPv4/IPv6 packet to tell."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        off, proto = (packet[0] & 0x0F) * 4, packet[9]
        src, dst = ipaddress.IPv4Address(packet[12:16]), ipaddress.IPv4Address(packet[16:20])
        if int.from_bytes(packet[6:8], "big") & 0x1FFF:  # a later fragment: no ports
            return Flow(src, dst, proto)
    elif len(packet) >= 40 and packet[0] >> 4 == 6:
        off, proto = 40, packet[6]
        src, dst = ipaddress.IPv6Address(packet[8:24]), ipaddress.IPv6Address(packet[24:40])
        while proto in _IPV6_EXTENSIONS and off + 8 <= len(packet):
            proto, off = packet[off], off + (packet[off + 1] + 1) * 8
    else:
        return None
    ports = packet[off:off + 4]
    if proto in PORT_PROTOS and len(ports) == 4:
        return Flow(src, dst, proto, int.from_bytes(ports[:2], "big"),
                    int.from_bytes(ports[2:], "big"))
    if proto in ICMP_PROTOS and len(ports) >= 2:
        return Flow(src, dst, proto, ports[0], ports[1])
    return Flow(src, dst, proto)


def flow_key(packet: bytes) -> Optional[bytes]:
    """The bytes of ``packet`` that decide its :func:`flow_of_packet`: two packets
    with the same key have the same flow.  None when that is not cheap to tell
    (IPv6 extension headers, packets too short to have ports)."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20:
        off, proto = (packet[0] & 0x0F) * 4, packet[9]
        if packet[6] & 0x1F or packet[7]:  # a later fragment: the flow has no ports
            return b"f" + packet[9:10] + packet[12:20]
        head = packet[9:10] + packet[12:20]
    elif version == 6 and len(packet) >= 40:
        off, proto = 40, packet[6]
        if proto in _IPV6_EXTENSIONS:
            return None
        head = packet[6:7] + packet[8:40]
    else:
        return None
    if proto in PORT_PROTOS:
        ports = packet[off:off + 4]
        return head + ports if len(ports) == 4 else None
    if proto in ICMP_PROTOS:
        ports = packet[off:off + 2]
        return head + ports if len(ports) == 2 else None
    return head


def upper_matches(sel: Selector, flow: Flow) -> bool:
    """The non-address half of a selector match: ports under masks, proto, dev."""
    return (not ((flow.dport ^ sel.dport) & sel.dport_mask)
            and not ((flow.sport ^ sel.sport) & sel.sport_mask)
            and (not sel.proto or flow.proto == sel.proto)
            and (not sel.ifindex or flow.ifindex == sel.ifindex))


def selector_matches(sel: Selector, flow: Flow) -> bool:
    """``xfrm_selector_match``: both prefixes, proto (0 = any), ports under masks, dev."""
    return (sel.dst.version == flow.dst.version
            and flow.dst in sel.dst and flow.src in sel.src
            and upper_matches(sel, flow))

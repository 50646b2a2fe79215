"""XFRM events and the JSON form of SAs.

Each event is a frozen dataclass whose fields are already JSON-ready
(addresses as strings, SPIs as ``"0x%08x"``); :meth:`to_json` adds
``"type"``.  The kernel's notification groups (``XFRMNLGRP_*``) are
:data:`GROUPS`; an event belongs to the groups in its ``groups`` attribute
(a POLEXPIRE goes to ``expire`` as in the kernel, and to ``polexpire``).

Key material never appears in an event: :func:`sa_to_json` writes keys only
when asked (``show_keys``), and events are always built without them.
Each event may carry ``ref``, the live object it is about (an SA state, a
policy); it is not part of the JSON and not compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Optional

from ..sa import PROTO_ESP, SA_EXTRA_FLAGS, SA_FLAGS, Lifetime, Mark, SAInfo, Selector
from ._syntax import LIMITS

__all__ = [
    "GROUPS", "AEEvent", "AcquireEvent", "Event", "ExpireEvent", "MappingEvent", "MigrateEvent",
    "PolicyEvent", "PolicyExpireEvent", "SAEvent", "address", "mark_json", "sa_id_json",
    "sa_to_json", "selector_json", "spi_hex",
]

GROUPS = ("acquire", "expire", "sa", "policy", "aevent", "mapping", "migrate", "polexpire")
_DEFAULT_LIFETIME = Lifetime()


# ---------------------------------------------------------------- JSON pieces

def address(addr: Any) -> Optional[str]:
    """An address or prefix as a string (None stays None)."""
    return None if addr is None else str(addr)


def spi_hex(spi: int) -> str:
    return f"0x{spi:08x}"


def proto_name(proto: int) -> Any:
    return "esp" if proto == PROTO_ESP else proto


def mark_json(mark: Optional[Mark]) -> Optional[dict]:
    return None if mark is None else {"value": mark.value, "mask": mark.mask}


def selector_json(sel: Optional[Selector]) -> Optional[dict]:
    if sel is None:
        return None
    out: dict = {"src": str(sel.src), "dst": str(sel.dst), "proto": sel.proto}
    for name in ("sport", "sport_mask", "dport", "dport_mask", "ifindex"):
        if getattr(sel, name):
            out[name] = getattr(sel, name)
    return out


def lifetime_json(lft: Lifetime) -> dict:
    """The limits that differ from the defaults, named as ``ip xfrm`` names them."""
    return {word: getattr(lft, name) for word, name in LIMITS.items()
            if getattr(lft, name) != getattr(_DEFAULT_LIFETIME, name)}


def _algo_json(alg: Any, bits_name: Optional[str], show_keys: bool) -> Optional[dict]:
    if alg is None:
        return None
    out: dict = {"name": alg.name}
    if bits_name:
        out[bits_name] = alg.bits
    if show_keys:
        out["key"] = "0x" + alg.key.hex()
    return out


def sa_id_json(info: SAInfo) -> dict:
    """``struct xfrm_usersa_id``: what names an SA."""
    return {"dst": str(info.dst), "spi": spi_hex(info.spi), "proto": proto_name(info.proto)}


def _info_json(info: SAInfo, show_keys: bool) -> dict:
    out: dict = {"src": str(info.src), "dst": str(info.dst), "proto": proto_name(info.proto),
                 "spi": spi_hex(info.spi), "reqid": info.reqid, "mode": info.mode}
    if info.dir:
        out["dir"] = info.dir
    out["replay-window"] = info.replay_window
    out["flag"] = [name for name in SA_FLAGS if name in info.flags]
    if info.extra_flags:
        out["extra-flag"] = [name for name in SA_EXTRA_FLAGS if name in info.extra_flags]
    for word, alg, bits in (("aead", info.aead, "icv_bits"), ("enc", info.enc, None),
                            ("auth", info.auth, "trunc_bits")):
        if alg is not None:
            out[word] = _algo_json(alg, bits, show_keys)
    if info.selector is not None:
        out["sel"] = selector_json(info.selector)
    lifetime = lifetime_json(info.lifetime)
    if lifetime:
        out["lifetime"] = lifetime
    for word, mark in (("mark", info.mark), ("set-mark", info.set_mark)):
        if mark is not None:
            out[word] = mark_json(mark)
    if info.if_id:
        out["if_id"] = info.if_id
    if info.encap is not None:
        out["encap"] = {"type": info.encap.type, "sport": info.encap.sport,
                        "dport": info.encap.dport, "oa": address(info.encap.oa)}
    if info.tfcpad:
        out["tfcpad"] = info.tfcpad
    if info.seq:
        out["seq"] = info.seq
    return out


def sa_to_json(state: Any, show_keys: bool = False) -> dict:
    """An SA (a SAD state, or a bare :class:`SAInfo`) as ``ip -j xfrm state`` would show it.

    A state provides ``info``, ``status`` ("valid", "larval", "acquire" or
    "dying"), ``seq``, ``current()`` (bytes, packets, add_time, use_time),
    ``xstats()`` (replay_window, replay, integrity_failed) and
    ``replay_json()`` (or None).  Keys only with ``show_keys``.
    """
    if isinstance(state, SAInfo):
        return _info_json(state, show_keys)
    out = _info_json(state.info, show_keys)
    if state.seq:
        out["seq"] = state.seq
    replay = state.replay_json()
    if replay is not None:
        out["anti-replay"] = replay
    out["current"] = state.current()
    out["stats"] = state.xstats()
    out["state"] = state.status
    return out


# ---------------------------------------------------------------- events

@dataclass(frozen=True)
class Event:
    """Base of every event: ``type``, ``groups`` and :meth:`to_json`."""

    type: ClassVar[str] = "event"
    groups: ClassVar[frozenset] = frozenset()

    def to_json(self) -> dict:
        out: dict = {"type": self.type}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "ref" and not (value is None and f.default is None):
                out[f.name] = value
        return out


def _ref() -> Any:
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class AcquireEvent(Event):
    """XFRM_MSG_ACQUIRE: an outbound template found no SA.  ``seq`` is global and
    never 0; ``sel`` is the exact flow; ``policy`` the policy that asked."""

    type: ClassVar[str] = "acquire"
    groups: ClassVar[frozenset] = frozenset({"acquire"})
    seq: int
    id: dict
    saddr: str
    sel: dict
    policy: dict
    tmpl: list
    mark: Optional[dict] = None
    if_id: int = 0
    ref: Any = _ref()


@dataclass(frozen=True)
class ExpireEvent(Event):
    """XFRM_MSG_EXPIRE: soft (the SA is dying) or hard (the SA is already gone).
    Also for larval (ALLOCSPI) and acquire states, which only expire hard."""

    type: ClassVar[str] = "expire"
    groups: ClassVar[frozenset] = frozenset({"expire"})
    sa: dict
    hard: bool
    ref: Any = _ref()


@dataclass(frozen=True)
class PolicyExpireEvent(Event):
    """XFRM_MSG_POLEXPIRE (sent to the kernel's EXPIRE group)."""

    type: ClassVar[str] = "polexpire"
    groups: ClassVar[frozenset] = frozenset({"expire", "polexpire"})
    policy: dict
    hard: bool
    ref: Any = _ref()


@dataclass(frozen=True)
class SAEvent(Event):
    """NEWSA, UPDSA, DELSA (``sa``) or FLUSHSA (``proto``, None for all)."""

    type: ClassVar[str] = "sa"
    groups: ClassVar[frozenset] = frozenset({"sa"})
    action: str
    sa: Optional[dict] = None
    proto: Any = None
    ref: Any = _ref()


@dataclass(frozen=True)
class PolicyEvent(Event):
    """NEWPOLICY, UPDPOLICY, DELPOLICY (``policy``) or FLUSHPOLICY (``dir``)."""

    type: ClassVar[str] = "policy"
    groups: ClassVar[frozenset] = frozenset({"policy"})
    action: str
    policy: Optional[dict] = None
    dir: Optional[str] = None
    ref: Any = _ref()


@dataclass(frozen=True)
class AEEvent(Event):
    """XFRM_MSG_NEWAE: replay state and current lifetime of an SA.

    ``reason``: "seq" (a sequence number advanced by ``replay_maxdiff``),
    "timer" (``replay_maxage`` passed with changes) or "update" (echo of a
    NEWAE request, the kernel's XFRM_AE_CU).  ``replay`` holds seq, oseq,
    seq_hi, oseq_hi, bitmap (hex) and window.
    """

    type: ClassVar[str] = "aevent"
    groups: ClassVar[frozenset] = frozenset({"aevent"})
    id: dict
    saddr: str
    reqid: int
    replay: dict
    current: dict
    reason: str
    mark: Optional[dict] = None
    if_id: int = 0
    ref: Any = _ref()


@dataclass(frozen=True)
class MappingEvent(Event):
    """XFRM_MSG_MAPPING: an inbound encap SA saw a good packet from another
    outer address or port.  ``old``/``new``: {addr, port}.  The SA is unchanged."""

    type: ClassVar[str] = "mapping"
    groups: ClassVar[frozenset] = frozenset({"mapping"})
    id: dict
    reqid: int
    old: dict
    new: dict
    ref: Any = _ref()


@dataclass(frozen=True)
class MigrateEvent(Event):
    """XFRM_MSG_MIGRATE: the outer addresses of SAs and templates changed.
    ``migrate`` is a list of {old_src, old_dst, new_src, new_dst, proto, mode, reqid}."""

    type: ClassVar[str] = "migrate"
    groups: ClassVar[frozenset] = frozenset({"migrate"})
    sel: Optional[dict]
    dir: str
    migrate: list
    encap: Optional[dict] = None
    ref: Any = _ref()

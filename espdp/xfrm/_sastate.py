"""One entry of the SAD and what it needs from the engine (private to the SAD).

:class:`SAState` is an SA, a larval ALLOCSPI state or an acquire state with
its timers and counters.  The functions below answer "which lifetime trigger
fires now" (the SAD's transition table decides what that does) and keep a
valid SA's engine object in step with it: UPDSA and MIGRATE change the
engine object in place (``SA.update``), NEWAE sets its replay state and
counters, and an SA that leaves the SAD has its engine object killed, so a
holder of a stale reference can send nothing with it.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Optional

from ..engine import SA as EngineSA
from ..errors import ConfigError, XfrmError
from ..sa import INFINITY, Mark, SAInfo

logger = logging.getLogger(__name__)

COUNTERS = ("packets", "bytes", "replay_window", "replay", "integrity_failed")
LARVAL, ACQUIRE, VALID, DYING, DEAD = "larval", "acquire", "valid", "dying", "dead"
LIVE = (VALID, DYING)


def mark_vm(mark: Optional[Mark]) -> tuple[int, int]:
    return (0, 0) if mark is None else (mark.value & mark.mask, mark.mask)


class SAState:
    """One entry of the SAD."""

    __slots__ = ("info", "status", "engine", "add_time", "use_time", "seq", "serial",
                 "expires_at", "deadline", "ae_last", "ae_time", "mapping", "queue",
                 "announced", "acquire_for")

    def __init__(self, info: SAInfo, status: str, now: float, serial: int) -> None:
        self.info, self.status, self.serial = info, status, serial
        self.engine: Any = None
        self.add_time, self.use_time = now, None
        self.seq = info.seq
        self.expires_at: Optional[float] = None  # larval and acquire states
        self.deadline: Optional[float] = None    # the time-based check scheduled
        self.ae_last: tuple = (0, 0, 0)
        self.ae_time = now
        self.mapping: Optional[tuple] = None     # (time, addr, port) of the last MAPPING
        self.queue: list = []                    # packets held while acquiring
        self.announced = False                   # an ACQUIRE went out for it
        self.acquire_for: Optional[tuple] = None  # (policy, template, flow)

    def __repr__(self) -> str:
        return (f"<SAState {self.status} {self.info.src}->{self.info.dst} "
                f"spi={self.info.spi:#010x} reqid={self.info.reqid}>")

    def mark_matches(self, mark: int) -> bool:
        value, mask = mark_vm(self.info.mark)
        return (mark & mask) == value

    def counters(self) -> dict:
        if self.engine is None:
            return dict.fromkeys(COUNTERS, 0)
        stats = self.engine.stats()
        return {k: stats[k] for k in COUNTERS}

    def current(self) -> dict:
        c = self.counters()
        return {"bytes": c["bytes"], "packets": c["packets"], "add_time": self.add_time,
                "use_time": self.use_time or 0}

    def xstats(self) -> dict:
        c = self.counters()
        return {k: c[k] for k in ("replay_window", "replay", "integrity_failed")}

    def replay_json(self) -> Optional[dict]:
        if self.engine is None:
            return None
        return {"seq": replay_top(self), "oseq": self.engine.oseq}

    def replay_state(self) -> dict:
        """GETAE's view: seq, oseq, their high halves (ESN), bitmap (hex), window."""
        top = replay_top(self)
        oseq = self.engine.oseq if self.engine is not None else 0
        return {"seq": top & 0xFFFFFFFF, "oseq": oseq & 0xFFFFFFFF, "seq_hi": top >> 32,
                "oseq_hi": oseq >> 32, "bitmap": f"{export_bitmap(self):#x}",
                "window": self.info.replay_window}


# ---------------------------------------------------------------- lifetimes

def next_deadline(st: SAState) -> Optional[float]:
    """When a time limit of ``st`` next needs a look (None: no time limit)."""
    if st.status in (LARVAL, ACQUIRE):
        return st.expires_at
    if st.status not in LIVE:
        return None
    lft = st.info.lifetime
    times = [st.add_time + lft.hard_add_expires if lft.hard_add_expires else None]
    if st.use_time is not None and lft.hard_use_expires:
        times.append(st.use_time + lft.hard_use_expires)
    if st.status == VALID:
        if lft.soft_add_expires:
            times.append(st.add_time + lft.soft_add_expires)
        if st.use_time is not None and lft.soft_use_expires:
            times.append(st.use_time + lft.soft_use_expires)
    times = [t for t in times if t is not None]
    return min(times) if times else None


def time_trigger(st: SAState, now: float) -> Optional[str]:
    """"hard", "soft" or None by time (``xfrm_timer_handler``; 0 means never; use
    time counts from the first use, so an unused SA never use-expires)."""
    if st.status in (LARVAL, ACQUIRE):
        return "hard" if now >= st.expires_at else None
    lft, used = st.info.lifetime, st.use_time
    if (lft.hard_add_expires and now >= st.add_time + lft.hard_add_expires) or (
            lft.hard_use_expires and used is not None and now >= used + lft.hard_use_expires):
        return "hard"
    if st.status == VALID and (
            (lft.soft_add_expires and now >= st.add_time + lft.soft_add_expires)
            or (lft.soft_use_expires and used is not None
                and now >= used + lft.soft_use_expires)):
        return "soft"
    return None


def count_trigger(st: SAState, c: dict) -> Optional[str]:
    """"hard", "soft" or None by bytes and packets (``xfrm_state_check_expire``: a
    limit of 0 fires at once), or by what the engine reported (limit drops, the
    soft flag)."""
    lft = st.info.lifetime
    engine = st.engine
    if (c["packets"] >= lft.hard_packets or c["bytes"] >= lft.hard_bytes
            or (engine is not None and engine.stats()["drops"].get("limit"))):
        return "hard"
    if st.status == VALID and (c["packets"] >= lft.soft_packets or c["bytes"] >= lft.soft_bytes
                               or (engine is not None and engine.soft_expired)):
        return "soft"
    return None


def polled(st: SAState) -> bool:
    """Does ``st`` need its counters read at each tick (finite byte/packet limits,
    or use-time limits still waiting for the first use)?"""
    lft = st.info.lifetime
    return st.status in LIVE and (
        any(v != INFINITY for v in (lft.soft_bytes, lft.hard_bytes, lft.soft_packets,
                                    lft.hard_packets))
        or (st.use_time is None and bool(lft.soft_use_expires or lft.hard_use_expires)))


# ---------------------------------------------------------------- engine objects

def make_engine(info: SAInfo) -> Any:
    return EngineSA(info)


def sync_engine(st: SAState, top: Optional[int] = None, bitmap: Optional[int] = None,
                counters: Optional[dict] = None) -> None:
    """Bring ``st``'s engine object in step with ``st.info`` (UPDSA, MIGRATE) and,
    for NEWAE, with an imported replay state and counters."""
    engine = st.engine
    try:
        engine.update(st.info)
    except ConfigError as e:
        raise XfrmError("EINVAL", str(e)) from None
    if top is not None or bitmap is not None:
        state = engine.replay_state()
        old_top = state["seq_hi"] << 32 | state["seq"]
        engine.set_replay_state(old_top if top is None else top, engine.oseq,
                                state["bitmap"] if bitmap is None else bitmap)
    if counters:
        stats = engine.stats()
        engine.set_counters(counters.get("packets", stats["packets"]),
                            counters.get("bytes", stats["bytes"]))


def replay_top(st: SAState) -> int:
    """The inbound top as XFRM reports it (64 bits with ESN)."""
    return 0 if st.engine is None else st.engine.replay_top


def export_bitmap(st: SAState) -> int:
    """The replay bitmap (bit i: ``top - i`` seen)."""
    if st.engine is None or not st.info.replay_window:
        return 0
    return st.engine.replay_state()["bitmap"]


def retire(engine: Any) -> None:
    """An engine object that left the SAD can no longer send."""
    if engine is not None:
        engine.kill()


def ae_snapshot(st: SAState) -> tuple:
    """What AE events compare: inbound top, outbound seq, packets."""
    engine = st.engine
    if engine is None:
        return (0, 0, 0)
    return (replay_top(st), engine.oseq, st.counters()["packets"])


def replay_values(st: SAState, seq: Optional[int], seq_hi: Optional[int],
                  oseq: Optional[int], oseq_hi: Optional[int]) -> tuple:
    """(top, oseq) from NEWAE's halves; absent halves keep the current ones."""
    top, cur_oseq = replay_top(st), st.engine.oseq
    new_top = ((top >> 32 if seq_hi is None else seq_hi) << 32 |
               (top & 0xFFFFFFFF if seq is None else seq))
    new_oseq = ((cur_oseq >> 32 if oseq_hi is None else oseq_hi) << 32 |
                (cur_oseq & 0xFFFFFFFF if oseq is None else oseq))
    if not st.info.esn:
        new_top &= 0xFFFFFFFF
        new_oseq &= 0xFFFFFFFF
    return new_top, new_oseq


# ---------------------------------------------------------------- SAD helpers

def better(st: SAState, best: SAState) -> bool:
    """xfrm_state_look_at: not dying beats dying; then the newest."""
    if (st.status == DYING) != (best.status == DYING):
        return best.status == DYING
    return (st.add_time, st.serial) > (best.add_time, best.serial)


def unspecified(addr: Any) -> Any:
    return ipaddress.ip_address("0.0.0.0" if addr.version == 4 else "::")


def template_addresses(template: Any, flow: Any) -> tuple:
    """(daddr, saddr) an outbound template asks for (``xfrm_tmpl_resolve_one``):
    in tunnel mode its own addresses (the flow's where it has none), in
    transport mode the flow's."""
    if template.mode == "transport":
        return flow.dst, flow.src
    return tuple(flow_addr if addr is None or addr.is_unspecified else addr
                 for addr, flow_addr in ((template.dst, flow.dst), (template.src, flow.src)))


def valid_update(old: SAInfo, new: SAInfo) -> dict:
    """The fields ``xfrm_state_update`` takes from an update of a valid SA."""
    if (old.encap is None) != (new.encap is None):
        raise XfrmError("EINVAL", "update cannot add or remove encapsulation")
    if old.encap is not None and old.encap.type != new.encap.type:
        raise XfrmError("EINVAL", f"update cannot change encap {old.encap.type} "
                        f"to {new.encap.type}")
    changes: dict = {"lifetime": new.lifetime, "encap": new.encap}
    if new.set_mark is not None:
        changes["set_mark"] = new.set_mark
    if new.if_id:
        changes["if_id"] = new.if_id
    return changes

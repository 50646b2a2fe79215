"""A cluster node inside ``espdp run``: the loop's side of :mod:`.agent`.

:class:`Cluster` runs on the daemon's loop thread (the only one that may touch
the engine).  It keeps the map SA -> segment (the segment of the SA's peer:
the end of the SA that is not a cluster address, with its UDP port in
addr+port mode, so one node owns both directions of a peer's SAs), answers
the agent's messages and feeds the :class:`~.filter.SegmentFilter`.

Taking a segment (the agent won its claim in etcd)::

    claimed ──> arm request: every SA of the segment with its replay state (GETAE)
            ──> agent: read checkpoints, start past them, write the starts (CAS)
            ──> armed: NEWAE with the starts (never lowering a number), the SAs
                armed in the filter, the segment owned: packets flow

Giving one up (rebalancing): the segment stops being owned and its SAs
disarmed in the same loop iteration, their last values go to the agent, which
writes them and only then deletes the segment's key.  An SA added later to an
owned segment is armed on its own the same way.

Every ``checkpoint_interval`` the SAs whose values moved are sent to the agent
in one batch (one transaction); an SA's budget (see the filter) grows when
etcd has acknowledged its checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

from ..xfrm.sad import LIVE
from .agent import Agent
from .config import ClusterConfig
from .filter import SegmentFilter
from .hash import PeerSegments
from .replicate import ReplicatingXfrm, apply_record
from .seal import Sealer, read_secret

logger = logging.getLogger(__name__)


@dataclass
class Armed:
    st: Any                 # the SAState
    engine: Any
    segment: int
    written: tuple          # (oseq, seq, bitmap) etcd has for it


def replay_values(st: Any) -> dict:
    """An SA's replay state as the control plane exports it (GETAE), as integers."""
    rs = st.replay_state()
    return {"oseq": rs["oseq_hi"] << 32 | rs["oseq"], "seq": rs["seq_hi"] << 32 | rs["seq"],
            "bitmap": int(rs["bitmap"], 16), "window": st.info.replay_window,
            "esn": bool(st.info.esn)}


class Cluster:
    """One node's membership in the cluster, on the daemon's loop; see the module
    docstring.  ``store``: an :class:`~.store.Store` (tests), else from ``cfg``."""

    def __init__(self, cfg: ClusterConfig, xfrm: Any, clock: Any = time.monotonic,
                 store: Any = None) -> None:
        self.cfg = cfg
        self.xfrm = xfrm
        self.clock = clock
        self.sealer = Sealer(read_secret(cfg.secret_file))
        self.peers = PeerSegments(cfg.segments, cfg.seed, cfg.hash == "addr+port",
                                  cfg.ipv6_words)
        self.filter = SegmentFilter(self.peers, cfg.segments, clock)
        self.local = frozenset(cfg.addresses)
        self.agent = Agent(cfg, self.sealer, self._post, self._set_fence, clock, store)
        self.started = clock()
        self.sas: dict[str, tuple] = {}          # checkpoint id -> (SAState, segment)
        self.armed: dict[str, Armed] = {}
        self.owned: set[int] = set()
        self.contested: set[str] = set()         # another node wrote its checkpoint
        self._identity: dict[int, tuple] = {}    # id(SAInfo) -> (info, checkpoint id, segment)
        self._activating: dict[int, int] = {}    # segment -> arm token
        self._arming: dict[int, tuple] = {}      # token -> (segment or None, ids)
        self._tokens = 0
        self._generation = -1
        self._retry_at: Optional[float] = None
        self._next_checkpoint = 0.0
        self._checkpoint_pending = False
        self._inbox: deque = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.forwarding = False
        self.stopped_at: Optional[float] = None   # wall time forwarding last stopped
        self.started_at: Optional[float] = None   # wall time forwarding last (re)started
        self.transitions = 0
        self._warned: set = set()

    # ------------------------------------------------------------ wiring

    def attach(self, tunnel: Any) -> None:
        """Hook into a :class:`~espdp.tunnel.Tunnel` and start the agent."""
        tunnel.dataplane.cluster_filter = self.filter
        tunnel.watch(self._wake_r, self._on_wake)
        tunnel.after_poll(self.poll)
        self.agent.start()

    def replicating(self, xfrm: Any) -> ReplicatingXfrm:
        """What the control socket should use: changes also go to etcd."""
        return ReplicatingXfrm(xfrm, lambda name, record:
                               self.agent.request(("publish", name, record)))

    def close(self) -> None:
        """Stop forwarding, hand the last checkpoints to the agent, leave."""
        self.filter.fence_until = 0.0
        final = [dict(replay_values(a.st), id=cid) for cid, a in self.armed.items()
                 if a.st.engine is a.engine]
        self.filter.disarm_all()
        self.agent.stop(final)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _post(self, message: tuple) -> None:   # agent thread
        self._inbox.append(message)
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def _set_fence(self, deadline: float) -> None:   # agent thread
        self.filter.fence_until = deadline

    def _on_wake(self, now: float) -> int:
        try:
            os.read(self._wake_r, 4096)
        except OSError:
            pass
        self.poll()
        return 0

    # ------------------------------------------------------------ the loop's work

    def poll(self) -> None:
        """After each round of the daemon's loop: messages, SA changes, checkpoints."""
        while self._inbox:
            self._handle(self._inbox.popleft())
        now = self.clock()
        if self.xfrm.generation != self._generation or (
                self._retry_at is not None and now >= self._retry_at):
            self._reconcile(now)
        if not self._checkpoint_pending and (now >= self._next_checkpoint
                                             or self.filter.checkpoint_due):
            self._checkpoint(now)
        forwarding = self.filter.forwarding(now) and bool(self.owned)
        if forwarding != self.forwarding:
            self.forwarding = forwarding
            self.transitions += 1
            if forwarding:
                self.started_at = time.time()
                logger.info("cluster: forwarding segments %s", sorted(self.owned))
            else:
                self.stopped_at = time.time()
                logger.warning("cluster: stopped forwarding: %s", self.reason(now))

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "claimed":
            self._claimed(message[1])
        elif kind == "armed":
            self._armed(*message[1:])
        elif kind == "release":
            self._release(message[1])
        elif kind == "lost":
            self._lost()
        elif kind == "checkpointed":
            self._checkpointed(message[1], message[2])
        elif kind == "apply":
            try:
                apply_record(self.xfrm, message[1], self.clock())
            except Exception as e:  # noqa: BLE001 - one bad record must not stop the rest
                logger.warning("cluster: a replicated change failed here: %s", e)

    # ------------------------------------------------------------ SAs and segments

    def _refresh(self) -> None:
        """The map checkpoint id -> (SAState, segment) of every live SA."""
        self._generation = self.xfrm.generation
        sas, identity = {}, {}
        for st in self.xfrm.sad.dump():
            if st.engine is None or st.status not in LIVE:
                continue
            known = self._identity.get(id(st.info))
            if known is None or known[0] is not st.info:
                segment = self._segment_of(st.info)
                known = (st.info, self.sealer.checkpoint_id(st.info), segment)
            identity[id(st.info)] = known
            if known[2] is not None and known[1] not in sas:
                sas[known[1]] = (st, known[2])
        self._identity, self.sas = identity, sas

    def _segment_of(self, info: Any) -> Optional[int]:
        """The segment of the SA's peer (its end that is not a cluster address)."""
        if info.src in self.local and info.dst not in self.local:
            peer, port = info.dst, info.encap.dport if info.encap else 0
        elif info.dst in self.local and info.src not in self.local:
            peer, port = info.src, info.encap.sport if info.encap else 0
        else:
            if info.spi not in self._warned:
                self._warned.add(info.spi)
                logger.warning("cluster: SA spi %#x has no end at a cluster address; "
                               "it is never used here", info.spi)
            return None
        return self.peers.of(peer, port)

    def _reconcile(self, now: float) -> None:
        """Disarm SAs that went or moved; arm SAs new in owned segments."""
        self._retry_at = None
        self._refresh()
        for cid, armed in list(self.armed.items()):
            entry = self.sas.get(cid)
            if entry is None or entry[0].engine is not armed.engine \
                    or entry[1] != armed.segment or armed.segment not in self.owned:
                self._disarm(cid)
                self.agent.request(("forget", [cid]))
        busy = {cid for _, ids in self._arming.values() for cid in ids}
        todo = [cid for cid, (_, segment) in self.sas.items()
                if segment in self.owned and cid not in self.armed and cid not in busy
                and cid not in self.contested]
        if todo:
            self._request_arm(None, todo)

    def _request_arm(self, segment: Optional[int], ids: list) -> None:
        self._tokens += 1
        self._arming[self._tokens] = (segment, ids)
        if segment is not None:
            self._activating[segment] = self._tokens
        items = [dict(replay_values(self.sas[cid][0]), id=cid, segment=self.sas[cid][1])
                 for cid in ids]
        self.agent.request(("arm", self._tokens, items))

    def _claimed(self, segment: int) -> None:
        if segment not in self.agent.owned:   # given up or lost since
            return
        self._refresh()
        self.contested = {c for c in self.contested
                          if self.sas.get(c, (None, None))[1] != segment}
        self._request_arm(segment, [cid for cid, (_, s) in self.sas.items() if s == segment])

    def _armed(self, token: int, results: dict, failed: list) -> None:
        segment, _ = self._arming.pop(token, (None, []))
        if segment is not None and self._activating.get(segment) != token:
            return   # given up or lost meanwhile
        if segment is not None and failed:   # etcd failed us: try the segment again soon
            del self._activating[segment]
            self._retry_segment(segment)
            return
        self._refresh()
        for cid, values in results.items():
            entry = self.sas.get(cid)
            if entry is None or (entry[1] not in self.owned and entry[1] != segment):
                continue
            st, seg = entry
            self._start(st, values)
            self.filter.arm(st.engine, values["oseq"] + self.cfg.jump,
                            values["oseq"] + self.cfg.jump // 2)
            self.armed[cid] = Armed(st, st.engine, seg,
                                    (values["oseq"], values["seq"], values["bitmap"]))
        if segment is not None:
            del self._activating[segment]
            self.owned.add(segment)
            self.filter.set_owned(segment, True)
        if failed:
            self._retry_at = self.clock() + 0.5

    def _retry_segment(self, segment: int) -> None:
        """Arm a claimed segment again (after etcd failed during the first try)."""
        self._inbox.append(("claimed", segment))

    def _start(self, st: Any, values: dict) -> None:
        """Move the SA to its start with NEWAE, never lowering a number."""
        now = replay_values(st)
        oseq = max(now["oseq"], values["oseq"])
        seq, bitmap = now["seq"], now["bitmap"]
        if values["seq"] > seq:
            seq, bitmap = values["seq"], values["bitmap"]
        if (oseq, seq, bitmap) == (now["oseq"], now["seq"], now["bitmap"]):
            return
        info = st.info
        self.xfrm.newae(info.dst, info.spi, info.proto, info.mark, now=self.clock(),
                        seq=seq & 0xFFFFFFFF, seq_hi=seq >> 32, oseq=oseq & 0xFFFFFFFF,
                        oseq_hi=oseq >> 32, bitmap=bitmap)

    def _disarm(self, cid: str) -> Optional[Armed]:
        armed = self.armed.pop(cid, None)
        if armed is not None:
            self.filter.disarm(armed.engine)
        return armed

    def _release(self, segment: int) -> None:
        """Stop using ``segment`` now; its last values go to the agent."""
        self.owned.discard(segment)
        self._activating.pop(segment, None)
        self.filter.set_owned(segment, False)
        final = []
        for cid, armed in list(self.armed.items()):
            if armed.segment == segment:
                self._disarm(cid)
                if armed.st.engine is armed.engine:
                    final.append(dict(replay_values(armed.st), id=cid))
        self.agent.request(("released", segment, final))

    def _lost(self) -> None:
        self.filter.disarm_all()
        self.owned.clear()
        self.armed.clear()
        self._activating.clear()
        self.contested.clear()

    # ------------------------------------------------------------ checkpoints

    def _checkpoint(self, now: float) -> None:
        self._next_checkpoint = now + self.cfg.checkpoint_interval
        self.filter.checkpoint_due = False
        items = []
        for cid, armed in self.armed.items():
            if armed.st.engine is not armed.engine:
                continue
            values = replay_values(armed.st)
            if (values["oseq"], values["seq"], values["bitmap"]) != armed.written:
                items.append(dict(values, id=cid))
        if items:
            self._checkpoint_pending = True
            self.agent.request(("checkpoint", items))

    def _checkpointed(self, written: dict, conflicts: list) -> None:
        self._checkpoint_pending = False
        jump = self.cfg.jump
        for cid, values in written.items():
            armed = self.armed.get(cid)
            if armed is not None:
                armed.written = (values["oseq"], values["seq"], values["bitmap"])
                self.filter.raise_limit(armed.engine, values["oseq"] + jump,
                                        values["oseq"] + jump // 2)
        for cid in conflicts:
            if self._disarm(cid) is not None:
                self.contested.add(cid)
                logger.warning("cluster: another node armed an SA this node was using "
                               "(checkpoint %s…): stopped using it here", cid[:8])

    # ------------------------------------------------------------ status

    def reason(self, now: float) -> Optional[str]:
        """Why this node does not forward (None when it does)."""
        agent = self.agent
        if self.filter.forwarding(now) and self.owned:
            return None
        if agent.error is not None:
            since = now - (agent.error_since or now)
            what = f"etcd unreachable for {since:.1f}s ({agent.error})"
            if agent.lease is not None and agent.last_renew is not None:
                return (f"lease not renewed for {now - agent.last_renew:.1f}s: {what}; "
                        "stopped before the lease could expire")
            return what
        if agent.problem:
            return agent.problem
        if not self.filter.forwarding(now):
            return "lease not renewed in time"
        return "no segment owned"

    def summary(self, now: float) -> dict:
        """A few numbers for ``espdp status`` and the metrics."""
        agent = self.agent
        return {"node": self.cfg.node, "forwarding": self.filter.forwarding(now)
                and bool(self.owned), "reason": self.reason(now), "owned": sorted(self.owned),
                "members": len(agent.view["nodes"]), "takeovers": agent.view["takeovers"],
                "checkpoint_age": None if agent.last_checkpoint is None
                else round(now - agent.last_checkpoint, 3),
                "checkpoint_writes": agent.counters["checkpoint_writes"],
                "checkpoint_records": agent.counters["checkpoint_records"],
                "drops": dict(self.filter.counters), "armed": len(self.armed)}

    def status(self, request: Any = None, now: Optional[float] = None) -> dict:
        """``espdp cluster status``: nodes, segments and owners, checkpoints, takeovers."""
        now = self.clock() if now is None else now
        agent, view = self.agent, self.agent.view
        owners = view["owners"]
        nodes = []
        for name in sorted(set(view["nodes"]) | {self.cfg.node}):
            nodes.append({"name": name, "member": name in view["nodes"],
                          "self": name == self.cfg.node,
                          "segments": sorted(s for s, n in owners.items() if n == name)})
        window = [r for t, r in agent.recent_writes if t >= now - 10]
        span = min(10.0, max(now - self.started, 1e-3))
        out = self.summary(now)
        out.update({
            "cluster": self.cfg.name, "session": agent.session,
            "lease": None if agent.lease is None else f"{agent.lease:x}",
            "fence_in": round(max(0.0, self.filter.fence_until - now), 2),
            "etcd": {"endpoint": agent.store.endpoint, "ok": agent.error is None,
                     "error": agent.error,
                     "since": None if agent.error_since is None
                     else round(now - agent.error_since, 1)},
            "nodes": nodes,
            "segments": [{"segment": s, "owner": owners.get(s),
                          "active_here": s in self.owned} for s in range(self.cfg.segments)],
            "checkpoints": {"age": out["checkpoint_age"], "interval": self.cfg.checkpoint_interval,
                            "jump": self.cfg.jump, "writes": agent.counters["checkpoint_writes"],
                            "records": agent.counters["checkpoint_records"],
                            "writes_per_second": round(len(window) / span, 2),
                            "records_per_second": round(sum(window) / span, 2),
                            "conflicts": agent.counters["conflicts"]},
            "takeover_log": view.get("log", []),
            "counters": dict(agent.counters),
            "sas": {"armed": len(self.armed), "in_cluster": len(self.sas),
                    "contested": len(self.contested)},
            "stopped_at": self.stopped_at, "started_at": self.started_at,
            "config": {"segments": self.cfg.segments, "seed": self.cfg.seed,
                       "hash": self.cfg.hash, "ipv6_words": self.cfg.ipv6_words,
                       "inbound": self.cfg.inbound,
                       "lease_ttl": self.cfg.lease_ttl, "fence_margin": self.cfg.fence_margin,
                       "max_rate": self.cfg.max_rate},
        })
        return out

"""The per-batch hook of the dataplane: this node's packets only, and only while safe.

:class:`SegmentFilter` is what :class:`~espdp.dataplane.Dataplane` calls (its
``cluster_filter``) once per batch, before any crypto:

* **inbound** (:meth:`SegmentFilter.inbound`, right after a batch is read from
  a wire socket): the segment of each packet is the xt_cluster hash of its
  outer source address (and port), cached per address; packets of segments
  this node does not own are removed from the batch, which is compacted so the
  engine never sees them.
* **outbound** (:meth:`SegmentFilter.outbound`, after each packet got its SA,
  before encryption): a slot keeps its SA only when that SA is *armed* on this
  node (its segment is owned and its sequence number was moved past the
  cluster's checkpoint); other slots get SA -1, which the engine skips.

Both stop everything once ``fence_until`` (a monotonic time written by the
etcd agent: last successful lease renewal + TTL - margin) has passed: a node
that cannot renew its lease stops forwarding before the lease can expire,
whether or not etcd answers.

The **budget**: an armed SA may use sequence numbers up to its ``limit`` (its
last checkpoint that etcd acknowledged + the jump).  A batch that would go
past it is held back (counted ``budget``) and a checkpoint asked for at once;
past ``soft`` a checkpoint is asked for early.  That is what makes the jump a
new owner applies always large enough, whatever the real packet rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from .hash import PeerSegments

IPPROTO_UDP = 17


class SegmentFilter:
    """Owned segments, armed SAs and the fence; see the module docstring.

    The common batch comes from one peer (inbound) or goes to one SA (outbound):
    that case costs a few byte-string comparisons and dict lookups, no numpy
    call per packet (a numpy call costs microseconds on a small machine)."""

    def __init__(self, peers: PeerSegments, total: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.peers = peers
        self.clock = clock
        self.owned = [False] * total     # segment -> owned here
        self.fence_until = 0.0           # monotonic; the agent thread moves it
        self._engines: dict[int, Any] = {}          # SA index -> engine SA (armed)
        self._limit: dict[int, int] = {}
        self._soft: dict[int, int] = {}
        self.checkpoint_due = False
        self.counters = {"not_owned_in": 0, "not_owned_out": 0, "fenced_in": 0,
                         "fenced_out": 0, "budget": 0}

    # ------------------------------------------------------------ control (loop thread)

    def forwarding(self, now: float) -> bool:
        return now < self.fence_until

    def set_owned(self, segment: int, owned: bool) -> None:
        self.owned[segment] = owned

    def arm(self, engine: Any, limit: int, soft: int) -> None:
        """Let ``engine`` encrypt up to sequence number ``limit``."""
        index = engine.index
        self._engines[index] = engine
        self._limit[index], self._soft[index] = limit, soft

    def raise_limit(self, engine: Any, limit: int, soft: int) -> None:
        index = engine.index
        if self._engines.get(index) is engine:
            self._limit[index] = max(self._limit[index], limit)
            self._soft[index] = max(self._soft[index], soft)

    def disarm(self, engine: Any) -> None:
        index = engine.index
        if self._engines.get(index) is engine:
            del self._engines[index], self._limit[index], self._soft[index]

    def disarm_all(self) -> None:
        self._engines.clear()
        self._limit.clear()
        self._soft.clear()
        self.owned[:] = [False] * len(self.owned)

    def armed(self, engine: Any) -> bool:
        return self._engines.get(engine.index) is engine

    # ------------------------------------------------------------ per batch

    def inbound(self, batch: Any) -> None:
        """Remove the packets of segments this node does not own (or all, fenced)."""
        n = batch.count
        if not n:
            return
        if self.clock() >= self.fence_until:
            self.counters["fenced_in"] += n
            batch.count = 0
            return
        segment = self._one_peer(batch, n)
        if segment is not None:
            if not self.owned[segment]:
                self.counters["not_owned_in"] += n
                batch.count = 0
            return
        owned = self.owned
        kept = [i for i, head in enumerate(self._heads(batch, n)) if owned[self._segment(head)]]
        k = len(kept)
        if k == n:
            return
        self.counters["not_owned_in"] += n - k
        if k:
            rows = np.array(kept)
            batch.data[:k] = batch.data[rows]
            for column in (batch.offset, batch.length, batch.mark):
                column[:k] = column[rows]
        batch.count = k

    def outbound(self, batch: Any) -> None:
        """Take the SA from slots whose SA is not armed here (or from all, fenced)."""
        n = batch.count
        sas = batch.sa[:n]
        chosen = sas.tolist()
        indexes = set(chosen)
        indexes.discard(-1)
        if not indexes:
            return
        if self.clock() >= self.fence_until:
            self.counters["fenced_out"] += n - chosen.count(-1)
            sas[:] = -1
            return
        for index in indexes:
            engine = self._engines.get(index)
            count = chosen.count(index) if len(indexes) > 1 else n - chosen.count(-1)
            if engine is None:
                self.counters["not_owned_out"] += count
            else:
                oseq = engine.oseq
                if oseq + count <= self._limit[index]:
                    if oseq + count > self._soft[index]:
                        self.checkpoint_due = True
                    continue
                self.counters["budget"] += count
                self.checkpoint_due = True
            sas[sas == index] = -1

    def _one_peer(self, batch: Any, n: int) -> Optional[int]:
        """The segment when every packet of the batch comes from one peer (same
        offset, same outer source, same port in addr+port mode), else None."""
        offsets = batch.offset[:n].tobytes()
        if offsets != offsets[:4] * n:
            return None
        off = int(batch.offset[0])
        data = batch.data
        first = data[:n, off].tobytes()
        if first != first[:1] * n:
            return None
        if first[0] == 0x45:
            start, width, proto_at, port_at = 12, 4, 9, 20
        elif first[0] >> 4 == 6:
            start, width, proto_at, port_at = 8, 16, 6, 40
        else:
            return None
        key = data[:n, off + start:off + start + width].tobytes()
        if key != key[:width] * n:
            return None
        if self.peers.with_port:
            both = data[:n, off + port_at:off + port_at + 2].tobytes() + \
                data[:n, off + proto_at].tobytes()
            if both[:2 * n] != both[:2] * n or both[2 * n:] != both[2 * n:2 * n + 1] * n:
                return None
        return self._segment_at(batch, 0)

    def _segment_at(self, batch: Any, i: int) -> int:
        off = int(batch.offset[i])
        return self._segment(batch.data[i, off:off + 48].tobytes())

    def _heads(self, batch: Any, n: int) -> list:
        """The first 48 bytes of each packet (one copy when the offsets are equal)."""
        offsets = batch.offset[:n].tobytes()
        if offsets == offsets[:4] * n:
            off = int(batch.offset[0])
            heads = batch.data[:n, off:off + 48].tobytes()
            return [heads[j:j + 48] for j in range(0, 48 * n, 48)]
        return [batch.data[i, int(batch.offset[i]):int(batch.offset[i]) + 48].tobytes()
                for i in range(n)]

    def _segment(self, head: bytes) -> int:
        """The segment of the outer packet starting with ``head``."""
        version = head[0] >> 4
        if version == 4:
            raw, ihl, proto = head[12:16], (head[0] & 0x0F) * 4, head[9]
        elif version == 6:
            raw, ihl, proto = head[8:24], 40, head[6]
        else:
            return 0   # not IP: the engine drops it as malformed
        port = 0
        if self.peers.with_port and proto == IPPROTO_UDP:
            port = int.from_bytes(head[ihl:ihl + 2], "big")
        return self.peers.of_raw(raw, port)

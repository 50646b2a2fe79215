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
from typing import Any

import numpy as np

from .hash import PeerSegments

IPPROTO_UDP = 17


class SegmentFilter:
    """Owned segments, armed SAs and the fence; see the module docstring."""

    def __init__(self, peers: PeerSegments, total: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.peers = peers
        self.clock = clock
        self.owned = np.zeros(total, dtype=bool)
        self.fence_until = 0.0          # monotonic; the agent thread moves it
        self._allowed = np.zeros(64, dtype=bool)   # engine SA index -> may encrypt
        self._engines: dict[int, Any] = {}          # SA index -> engine SA
        self._limit: dict[int, int] = {}
        self._soft: dict[int, int] = {}
        self.checkpoint_due = False
        self.counters = {"not_owned_in": 0, "not_owned_out": 0, "fenced_in": 0,
                         "fenced_out": 0, "budget": 0}

    # ------------------------------------------------------------ control (loop thread)

    def forwarding(self, now: float) -> bool:
        return now < self.fence_until

    def arm(self, engine: Any, limit: int, soft: int) -> None:
        """Let ``engine`` encrypt up to sequence number ``limit``."""
        index = engine.index
        if index >= self._allowed.size:
            grown = np.zeros(max(index + 1, 2 * self._allowed.size), dtype=bool)
            grown[:self._allowed.size] = self._allowed
            self._allowed = grown
        self._allowed[index] = True
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
            self._allowed[index] = False
            del self._engines[index], self._limit[index], self._soft[index]

    def disarm_all(self) -> None:
        self._allowed[:] = False
        self._engines.clear()
        self._limit.clear()
        self._soft.clear()
        self.owned[:] = False

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
        keep = self.owned[self._segments(batch, n)]
        if keep.all():
            return
        kept = np.flatnonzero(keep)
        self.counters["not_owned_in"] += n - kept.size
        k = kept.size
        if k:
            batch.data[:k] = batch.data[kept]
            for column in (batch.offset, batch.length, batch.mark):
                column[:k] = column[kept]
        batch.count = k

    def outbound(self, batch: Any) -> None:
        """Take the SA from slots whose SA is not armed here (or from all, fenced)."""
        n = batch.count
        sas = batch.sa[:n]
        chosen = sas >= 0
        if not chosen.any():
            return
        if self.clock() >= self.fence_until:
            self.counters["fenced_out"] += int(chosen.sum())
            sas[chosen] = -1
            return
        allowed = self._allowed
        index = np.where(chosen, sas, 0)
        ok = chosen & (index < allowed.size)
        ok[ok] = allowed[index[ok]]
        refused = chosen & ~ok
        if refused.any():
            self.counters["not_owned_out"] += int(refused.sum())
            sas[refused] = -1
        if ok.any():
            self._spend(sas, sas[ok])

    def _spend(self, sas: np.ndarray, live: np.ndarray) -> None:
        first = live[0]
        if (live == first).all():
            groups = ((int(first), int(live.size)),)
        else:
            values, counts = np.unique(live, return_counts=True)
            groups = zip(values.tolist(), counts.tolist(), strict=True)
        for index, count in groups:
            oseq = self._engines[index].oseq
            if oseq + count > self._limit[index]:
                held = sas == index
                self.counters["budget"] += int(held.sum())
                sas[held] = -1
                self.checkpoint_due = True
            elif oseq + count > self._soft[index]:
                self.checkpoint_due = True

    def _segments(self, batch: Any, n: int) -> np.ndarray:
        """The segment of each of the first ``n`` packets (their outer source)."""
        data, offsets = batch.data, batch.offset[:n]
        off = int(offsets[0])
        if (offsets == off).all():
            heads = data[:n, off:off + 48]
            first = heads[:, 0]
            if (first == 0x45).all() and (heads[:, 9] == heads[0, 9]).all():
                keys = heads[:, 12:16] if not self.peers.with_port else \
                    np.concatenate([heads[:, 12:16], heads[:, 20:22]], axis=1)
            elif (first >> 4 == 6).all() and (heads[:, 6] == heads[0, 6]).all():
                keys = heads[:, 8:24] if not self.peers.with_port else \
                    np.concatenate([heads[:, 8:24], heads[:, 40:42]], axis=1)
            else:
                keys = None
            if keys is not None and (keys == keys[0]).all():  # one peer: one hash lookup
                return np.full(n, self._segment_at(batch, 0), dtype=np.intp)
        return np.fromiter((self._segment_at(batch, i) for i in range(n)), dtype=np.intp,
                           count=n)

    def _segment_at(self, batch: Any, i: int) -> int:
        off = int(batch.offset[i])
        row = batch.data[i]
        version = int(row[off]) >> 4
        if version == 4:
            raw, ihl, proto = row[off + 12:off + 16], (int(row[off]) & 0x0F) * 4, row[off + 9]
        elif version == 6:
            raw, ihl, proto = row[off + 8:off + 24], 40, row[off + 6]
        else:
            return 0   # not IP: the engine drops it as malformed
        port = 0
        if self.peers.with_port and proto == IPPROTO_UDP:
            port = int(row[off + ihl]) << 8 | int(row[off + ihl + 1])
        return self.peers.of_raw(raw.tobytes(), port)

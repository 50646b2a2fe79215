"""Which segments a node claims or gives up: balanced by count, sticky by preference.

With ``n`` live nodes and ``total`` segments every node should own between
``lo = total // n`` and ``hi = ceil(total / n)``.  Each node decides for
itself from the same view of etcd (members and owners):

* it claims free segments while it has fewer than ``lo``, or fewer than
  ``hi`` when no other node is below ``lo`` (a starving node goes first);
* it gives up one segment when it has more than ``hi``, or more than ``lo``
  while another node is below ``lo`` (a node that came back gets its share).

Which segment: each (node, segment) pair has a rank (a hash); a node claims
the free segments it ranks highest on and gives away the one the starving
node ranks highest on, so segments tend to return to the same node and two
nodes rarely race for the same free segment.  Claims are transactions in
etcd, so a race only costs a retry.

>>> plan("a", ["a", "b"], {0: "b", 1: "b", 2: "b", 3: "b"}, 4)
Plan(claims=[], release=None)
>>> plan("b", ["a", "b"], {0: "b", 1: "b", 2: "b", 3: "b"}, 4).release is not None
True
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional


def rank(node: str, segment: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{node}|{segment}".encode()).digest()[:8], "big")


@dataclass
class Plan:
    claims: list = field(default_factory=list)
    release: Optional[int] = None


def plan(me: str, members: list, owners: dict, total: int,
         leaving: frozenset = frozenset()) -> Plan:
    """What ``me`` should do given the live ``members`` and ``owners`` (segment ->
    node; absent or None when free).  ``leaving``: segments ``me`` is already
    giving up (counted as gone)."""
    if me not in members or not members:
        return Plan()
    n = len(members)
    lo, hi = total // n, math.ceil(total / n)
    counts = {m: 0 for m in members}
    free = []
    for segment in range(total):
        owner = owners.get(segment)
        if owner is None:
            free.append(segment)
        elif owner in counts and not (owner == me and segment in leaving):
            counts[owner] += 1
    # a segment whose owner is not a member is not free yet: its key goes with the lease
    mine = counts[me]
    starving = [m for m in members if m != me and counts[m] < lo]
    out = Plan()
    for segment in sorted(free, key=lambda s: rank(me, s), reverse=True):
        if mine < lo or (mine < hi and not starving):
            out.claims.append(segment)
            mine += 1
    if not out.claims and (mine > hi or (mine > lo and starving)):
        taker = min(starving, key=lambda m: (counts[m], m)) if starving else None
        owned = [s for s in range(total) if owners.get(s) == me and s not in leaving]
        if owned:
            out.release = max(owned, key=lambda s: rank(taker or me, s) if taker
                              else -rank(me, s))
    return out

"""The etcd side of a node, in a thread of its own: membership, segment
ownership, checkpoints and replicated SAs/policies.

It never touches the engine (which is not thread-safe): it talks to the
daemon's loop through messages (:meth:`Agent.request` in, ``post`` out) and
moves exactly one thing directly, the filter's ``fence_until``, a float.

Keys, under ``/espdp/NAME/``::

    nodes/NODE          {node, session, pid, since}     attached to NODE's lease
    segments/NN         {node, session, lease, since}   attached to the owner's lease
    history/NN          {owner, session, since, released}
    takeovers/NN-REV    {segment, from, to, at}
    checkpoints/ID      {oseq, seq, bitmap, node, session, at}   ID: seal.checkpoint_id
    state/sa/ID, state/policy/ID, state/flush/KIND       sealed records (see seal)

* **Membership**: a lease of ``lease_ttl`` seconds, renewed every quarter of
  it.  After each successful renewal sent at ``t`` the filter may forward
  until ``t + TTL - fence_margin``: etcd cannot expire the lease before
  ``t + TTL``, so this node has stopped before anyone can take its segments.
* **Segments**: claimed with a transaction (``create_revision == 0``: exactly
  one node wins), given up by deleting the key after the loop has stopped
  using it and written a last checkpoint (see :mod:`.balance`).
* **Checkpoints**: written only with compare-and-swap on the key's
  ``mod_revision`` as this node last wrote it.  A failed compare means another
  node armed the SA meanwhile (unless the checkpoint there is this run's own,
  whose answer was lost): this node stops using it.  Arming reads the
  checkpoint, starts past it by the jump and writes the new start *before*
  the SA may send (see :mod:`.node`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Optional

from .balance import plan
from .config import ClusterConfig
from .seal import Sealer
from .store import EtcdUnavailable, Store, compare, delete, get, put

logger = logging.getLogger(__name__)

TXN_ITEMS = 60          # SAs per transaction (etcd allows 128 operations by default)
M32 = 0xFFFFFFFF


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def start_values(item: dict, current: Optional[dict], jump: int, inbound: str) -> dict:
    """Where an SA starts on the node that arms it: past the checkpoint
    ``current`` (None when there is none) by ``jump``; inbound per ``inbound``.

    * outbound: ``max(local, checkpoint + jump)``: the previous owner never
      went past its last acknowledged checkpoint + jump (its budget);
    * inbound ``window``: the checkpoint's top and bitmap (no packet lost; a
      packet the previous owner accepted after that checkpoint can be
      accepted once more);
    * inbound ``strict``: top ``checkpoint + jump``, every bit of the window
      set: nothing at or below it is accepted (no replay; the peer's packets
      up to there are lost).
    """
    oseq, seq, bitmap = item["oseq"], item["seq"], item["bitmap"]
    if current is not None:
        oseq = max(oseq, int(current["oseq"]) + jump)
        if inbound == "strict":
            top = int(current["seq"]) + jump
            if top > seq:
                seq, bitmap = top, (1 << item["window"]) - 1
        elif int(current["seq"]) > seq:
            seq, bitmap = int(current["seq"]), int(current.get("bitmap", "0"), 16)
    if not item["esn"]:   # a non-ESN SA ends at 2^32 - 1: refused after, never wrapped
        oseq, seq = min(oseq, M32), min(seq, M32)
    return {"oseq": oseq, "seq": seq, "bitmap": bitmap}


class Agent:
    """See the module docstring.  ``post(message)`` hands a message to the loop;
    ``set_fence(deadline)`` moves the filter's fence."""

    def __init__(self, cfg: ClusterConfig, sealer: Sealer, post: Callable[[tuple], None],
                 set_fence: Callable[[float], None], clock: Callable[[], float] = time.monotonic,
                 store: Optional[Store] = None) -> None:
        self.cfg, self.sealer, self.post, self.set_fence, self.clock = \
            cfg, sealer, post, set_fence, clock
        self.store = store or Store(cfg.endpoints, cfg.timeout, cfg.ca_cert, cfg.cert, cfg.key)
        self.session = os.urandom(8).hex()
        self.lease: Optional[int] = None
        self.owned: set[int] = set()
        self.leaving: set[int] = set()
        self.revisions: dict[str, int] = {}       # checkpoint id -> mod revision we wrote
        self._my_value: dict[int, bytes] = {}
        self._pending_release: dict[int, list] = {}
        self._unpublished: deque = deque()
        self._state_rev = 0
        self._next_keepalive = 0.0
        self._next_count = 0.0
        self._requests: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        # what status shows (replaced whole, read by the loop's thread)
        self.view: dict = {"nodes": {}, "owners": {}, "takeovers": 0, "log": []}
        self.problem: Optional[str] = "joining the cluster"
        self.error: Optional[str] = None
        self.error_since: Optional[float] = None
        self.last_renew: Optional[float] = None
        self.last_checkpoint: Optional[float] = None
        self.counters = {"checkpoint_writes": 0, "checkpoint_records": 0, "claims": 0,
                         "releases": 0, "takeovers": 0, "conflicts": 0, "renewals": 0}
        self.recent_writes: deque = deque()       # (time, records) of the last 10 s

    # ------------------------------------------------------------ keys

    def key(self, *parts: Any) -> str:
        return self.cfg.prefix + "/".join(str(p) for p in parts)

    def seg_key(self, segment: int) -> str:
        return self.key("segments", f"{segment:02d}")

    def ckpt_key(self, ckpt_id: str) -> str:
        return self.key("checkpoints", ckpt_id)

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="espdp-cluster", daemon=True)
        self._thread.start()

    def request(self, message: tuple) -> None:
        self._requests.put(message)

    def stop(self, final: Optional[list] = None, timeout: float = 3.0) -> None:
        """Write ``final`` checkpoints, give the segments up and revoke the lease
        (others take over at once), then end the thread."""
        if self._thread is None:
            return
        self._requests.put(("stop", final or []))
        self._thread.join(timeout)
        self._stopping.set()
        self._thread.join(1.0)
        self._thread = None

    def _run(self) -> None:
        tick = min(0.2, self.cfg.keepalive_interval / 2)
        next_step = 0.0
        while not self._stopping.is_set():
            try:
                message = self._requests.get(timeout=max(0.0, next_step - self.clock()))
            except queue.Empty:
                message = None
            try:
                if message is not None:
                    if message[0] == "stop":
                        self._leave(message[1])
                        return
                    self._handle(message)
                if self.clock() >= next_step:
                    next_step = self.clock() + tick
                    self._step()
                self._ok()
            except EtcdUnavailable as e:
                self._failed(str(e))
            except Exception:  # a bug must not end membership silently: the fence stops us
                logger.exception("cluster agent: step failed")

    def _ok(self) -> None:
        if self.error is not None:
            logger.info("cluster: etcd answers again (%s)", self.store.endpoint)
        self.error = self.error_since = None

    def _failed(self, error: str) -> None:
        if self.error is None:
            self.error_since = self.clock()
            logger.warning("cluster: etcd unreachable: %s", error)
        self.error = error

    # ------------------------------------------------------------ each step

    def _step(self) -> None:
        # The renewal first: it is what keeps this node forwarding when etcd is slow.
        if self.lease is None:
            self._join()
        elif self.clock() >= self._next_keepalive:
            self._renew()
        self._publish_pending()
        self._replicate_in()   # before any claim: a segment is armed with the SAs known
        if self.lease is None:
            return
        for segment, items in list(self._pending_release.items()):
            self._finish_release(segment, items)
        self._read_view()
        self._rebalance()

    def _join(self) -> None:
        sent = self.clock()
        lease = self.store.grant(self.cfg.lease_ttl)
        self.store.put(self.key("nodes", self.cfg.node),
                       _json({"node": self.cfg.node, "session": self.session,
                              "pid": os.getpid(), "since": time.time()}), lease)
        self.lease = lease
        self._renewed(sent, self.cfg.lease_ttl)
        self.problem = None
        logger.info("cluster: node %s joined (lease %x)", self.cfg.node, lease)

    def _renew(self) -> None:
        sent = self.clock()
        ttl = self.store.keepalive(self.lease)
        if ttl <= 0:
            self._lose("the lease expired in etcd")
            return
        self._renewed(sent, ttl)

    def _renewed(self, sent: float, ttl: int) -> None:
        self.last_renew = sent
        self.counters["renewals"] += 1
        self._next_keepalive = sent + self.cfg.keepalive_interval
        self.set_fence(sent + ttl - self.cfg.fence_margin)

    def _lose(self, reason: str) -> None:
        logger.warning("cluster: %s: every segment given up", reason)
        self.set_fence(0.0)
        self.lease = None
        self.owned.clear()
        self.leaving.clear()
        self.revisions.clear()
        self._pending_release.clear()
        self.problem = reason
        self.post(("lost", reason))

    def _read_view(self) -> None:
        _, (nodes, segments), revision = self.store.txn(
            [], [get(self.key("nodes") + "/", prefix=True),
                 get(self.key("segments") + "/", prefix=True)])
        members = {}
        for kv in nodes:
            record = json.loads(kv.value)
            if record["node"] != self.cfg.node or record["session"] == self.session:
                members[record["node"]] = record
        owners: dict[int, str] = {}
        for kv in segments:
            record = json.loads(kv.value)
            segment = int(kv.key.rsplit("/", 1)[1])
            node = record["node"]
            if node == self.cfg.node and record["session"] != self.session:
                node += "~previous"   # a previous run of this node: not ours, not free yet
            owners[segment] = node
        mine = {s for s, n in owners.items() if n == self.cfg.node}
        for segment in self.owned - mine:   # deleted behind our back (an operator?)
            logger.warning("cluster: segment %d is no longer ours in etcd", segment)
            self.owned.discard(segment)
            self.leaving.add(segment)
            self.post(("release", segment))
        view = dict(self.view, nodes=members, owners=owners, revision=revision)
        if self.clock() >= self._next_count:
            self._next_count = self.clock() + 1.0
            kvs, count, _ = self.store.range(self.key("takeovers") + "/", prefix=True)
            view["takeovers"] = count
            view["log"] = [json.loads(kv.value) for kv in kvs[-10:]]
        self.view = view

    def _rebalance(self) -> None:
        view = self.view
        decided = plan(self.cfg.node, sorted(view["nodes"]), view["owners"],
                       self.cfg.segments, frozenset(self.leaving))
        for segment in decided.claims:
            self._claim(segment)
        release = decided.release
        if release is not None and release in self.owned and not self.leaving:
            logger.info("cluster: giving segment %d up to rebalance", release)
            self.leaving.add(release)
            self.post(("release", release))

    def _claim(self, segment: int) -> bool:
        key, history = self.seg_key(segment), self.key("history", f"{segment:02d}")
        value = _json({"node": self.cfg.node, "session": self.session, "lease": self.lease,
                       "since": time.time()})
        won, responses, revision = self.store.txn(
            [compare(key, "CREATE", 0)],
            [get(history), put(key, value, self.lease),
             put(history, _json({"owner": self.cfg.node, "session": self.session,
                                 "since": time.time(), "released": False}))])
        if not won:
            return False
        previous = json.loads(responses[0][0].value) if responses[0] else None
        takeover = previous is not None and not previous.get("released", True)
        if takeover:
            self.store.put(self.key("takeovers", f"{segment:02d}-{revision}"), _json(
                {"segment": segment, "from": previous["owner"], "to": self.cfg.node,
                 "at": time.time()}))
            self.counters["takeovers"] += 1
            logger.info("cluster: took segment %d over from %s", segment, previous["owner"])
        else:
            logger.info("cluster: claimed segment %d", segment)
        self.counters["claims"] += 1
        self.owned.add(segment)
        self._my_value[segment] = value
        self.view = dict(self.view, owners={**self.view["owners"], segment: self.cfg.node})
        self.post(("claimed", segment, takeover))
        return True

    # ------------------------------------------------------------ requests from the loop

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "arm":
            self._arm(message[1], message[2])
        elif kind == "checkpoint":
            self._checkpoint(message[1])
        elif kind == "released":
            self._finish_release(message[1], message[2])
        elif kind == "forget":
            for ckpt_id in message[1]:
                self.revisions.pop(ckpt_id, None)
        elif kind == "publish":
            self._unpublished.append((message[1], message[2]))
            self._publish_pending()

    def _arm(self, token: int, items: list) -> None:
        """Read each SA's checkpoint, start past it, write the start (compare and
        swap); the loop arms the SAs written."""
        results, failed = {}, []
        try:
            for chunk in _chunks(items):
                results.update(self._arm_chunk(chunk, failed))
        except EtcdUnavailable:
            self.post(("armed", token, {}, [item["id"] for item in items]))
            raise
        self.post(("armed", token, results, failed))

    def _arm_chunk(self, items: list, failed: list) -> dict:
        results = {}
        for _attempt in range(3):
            _, found, _ = self.store.txn([], [get(self.ckpt_key(i["id"])) for i in items])
            writes = {}
            for item, kvs in zip(items, found, strict=True):
                current = json.loads(kvs[0].value) if kvs else None
                writes[item["id"]] = (start_values(item, current, self.cfg.jump,
                                                   self.cfg.inbound),
                                      kvs[0].mod_revision if kvs else 0)
            won, revision = self._write(writes)
            if won:
                for ckpt_id, (values, _) in writes.items():
                    self.revisions[ckpt_id] = revision
                    results[ckpt_id] = values
                return results
            # someone wrote one of them between our read and our write: read again
        failed += [item["id"] for item in items]
        return results

    def _write(self, writes: dict) -> tuple[bool, int]:
        """One transaction: each checkpoint only if its mod revision is as given."""
        now = time.time()
        compares, puts = [], []
        for ckpt_id, (values, revision) in writes.items():
            key = self.ckpt_key(ckpt_id)
            compares.append(compare(key, "MOD", revision))
            puts.append(put(key, _json({"oseq": values["oseq"], "seq": values["seq"],
                                        "bitmap": f"{values['bitmap']:x}",
                                        "node": self.cfg.node, "session": self.session,
                                        "at": now})))
        won, _, revision = self.store.txn(compares, puts)
        if won:
            t = self.clock()
            self.last_checkpoint = t
            self.counters["checkpoint_writes"] += 1
            self.counters["checkpoint_records"] += len(writes)
            self.recent_writes.append((t, len(writes)))
            while self.recent_writes and self.recent_writes[0][0] < t - 10:
                self.recent_writes.popleft()
        return won, revision

    def _checkpoint(self, items: list, answer: bool = True) -> tuple[dict, list]:
        written, conflicts = {}, []
        try:
            for chunk in _chunks([i for i in items if i["id"] in self.revisions]):
                writes = {i["id"]: (i, self.revisions[i["id"]]) for i in chunk}
                won, revision = self._write(writes)
                if not won:   # find which: one at a time
                    for ckpt_id, write in writes.items():
                        ok, rev = self._write({ckpt_id: write})
                        if not ok and self._adopt(ckpt_id):
                            ok, rev = self._write({ckpt_id: (write[0],
                                                             self.revisions[ckpt_id])})
                        if ok:
                            self.revisions[ckpt_id] = rev
                            written[ckpt_id] = write[0]
                        else:
                            conflicts.append(ckpt_id)
                            self.revisions.pop(ckpt_id, None)
                            self.counters["conflicts"] += 1
                    continue
                for ckpt_id, (values, _) in writes.items():
                    self.revisions[ckpt_id] = revision
                    written[ckpt_id] = values
        finally:
            if answer:
                self.post(("checkpointed", written, conflicts))
        return written, conflicts

    def _adopt(self, ckpt_id: str) -> bool:
        """After a failed compare: was the checkpoint last written by this very run
        (a write etcd applied but whose answer was lost, e.g. as etcd went down)?
        Then its revision is ours to go on from."""
        kvs, _, _ = self.store.range(self.ckpt_key(ckpt_id))
        if kvs and json.loads(kvs[0].value).get("session") == self.session:
            self.revisions[ckpt_id] = kvs[0].mod_revision
            return True
        return False

    def _finish_release(self, segment: int, items: list) -> None:
        """The loop stopped using ``segment``: last checkpoints, then the key goes."""
        if segment not in self.leaving:   # the lease was lost meanwhile: nothing is ours
            return
        self._pending_release[segment] = items
        self._checkpoint(items, answer=False)
        for item in items:
            self.revisions.pop(item["id"], None)
        key, value = self.seg_key(segment), self._my_value.get(segment, b"")
        self.store.txn([compare(key, "VALUE", value)],
                       [delete(key), put(self.key("history", f"{segment:02d}"), _json(
                           {"owner": self.cfg.node, "session": self.session,
                            "since": time.time(), "released": True}))])
        del self._pending_release[segment]
        self.owned.discard(segment)
        self.leaving.discard(segment)
        self.view = dict(self.view, owners={s: n for s, n in self.view["owners"].items()
                                            if s != segment})
        self.counters["releases"] += 1
        logger.info("cluster: segment %d given up", segment)

    def _leave(self, final: list) -> None:
        """A clean stop: last checkpoints, segments released, lease revoked."""
        if self.lease is None:
            return
        try:
            self._checkpoint(final, answer=False)
            ops = [put(self.key("history", f"{s:02d}"), _json(
                {"owner": self.cfg.node, "session": self.session, "since": time.time(),
                 "released": True})) for s in sorted(self.owned)]
            if ops:
                self.store.txn([], ops)
            self.store.revoke(self.lease)
            logger.info("cluster: left (lease revoked, segments free for the others)")
        except EtcdUnavailable as e:
            logger.warning("cluster: could not leave cleanly (%s): the lease will expire", e)
        self.lease = None

    # ------------------------------------------------------------ replication

    def _publish_pending(self) -> None:
        """Write the changes made through this node's control socket, in order
        (kept and retried while etcd does not answer)."""
        while self._unpublished:
            name, record = self._unpublished[0]
            key = self.key("state", name)
            record = dict(record, session=self.session, node=self.cfg.node)
            self.store.put(key, self.sealer.seal(_json(record), key))
            self._unpublished.popleft()

    def _replicate_in(self) -> None:
        kvs, _, revision = self.store.range(self.key("state") + "/", prefix=True,
                                            min_mod_revision=self._state_rev + 1)
        for kv in kvs:
            try:
                record = json.loads(self.sealer.open(kv.value, kv.key))
            except Exception as e:  # noqa: BLE001 - a bad record must not stop the others
                logger.warning("cluster: ignoring %s: %s", kv.key, e)
                continue
            if record.get("session") != self.session:
                self.post(("apply", record))
        self._state_rev = max(self._state_rev, revision)


def _chunks(items: list) -> list:
    return [items[i:i + TXN_ITEMS] for i in range(0, len(items), TXN_ITEMS)]

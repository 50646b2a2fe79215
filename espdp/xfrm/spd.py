"""The security policy database (SPD), with the semantics of Linux XFRM.

Sans-I/O: every call that needs the time takes ``now`` (float seconds).
The rules, read from ``net/xfrm/xfrm_policy.c`` and ``xfrm_user.c``:

* **Identity.**  A policy is identified by (dir, ptype, if_id, selector,
  mark value *and* mask) -- ``xfrm_policy_insert_list``.  ``add`` of an
  existing one is EEXIST; ``add(update=True)`` replaces it, and inserts when
  there is none (UPDPOLICY creates).
* **Index.**  ``xfrm_gen_index``: a shared generator stepping by 8, ORed
  with the dir code; a given index is honoured when free and otherwise
  silently replaced by a generated one (no error).  An update keeps the
  index of the policy it replaces, whatever index it gives.
* **Order.**  Lower priority wins; on equal priority the older policy wins
  (a new one goes after those with priority <= its own).  An update with
  the same priority keeps its place; with another priority it is the
  youngest of its new peers.  (In the kernel an updated policy keeps its
  place in its hash chain but gets a fresh ``pos`` against other chains;
  espdp keeps one consistent order.)
* **Lookup.**  ``xfrm_policy_lookup``: sub policies first, then main; a
  policy matches when its family and if_id are the flow's, ``(mark & m) ==
  v`` and the selector matches.
* **Get/delete** (``xfrm_get_policy``): by index when one is given (its low
  bits must be the dir, mark and if_id must be equal), else by selector;
  a miss is ENOENT, as the kernel answers.
* **Flush** (``xfrm_policy_flush``): one policy type, main unless asked;
  an empty result is not an error.
* **Lifetimes** (``xfrm_policy_timer``): add time counts from the add (or
  update); use time from the *last* use, or from the add while unused.  A
  hard limit removes the policy; a soft one is reported once (the kernel
  repeats it every 30 s while it lasts).

Lookups are not a scan: policies live in a tuple space, grouped by (dir,
ptype, if_id, family, src prefix length, dst prefix length); each group is a
dict keyed by the (src, dst) networks, each bucket sorted by (priority,
age).  A lookup probes each group once, so its cost grows with the number
of distinct prefix-length pairs, not with the number of policies.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Optional

from ..errors import ConfigError, XfrmError
from ..sa import Lifetime, Mark, Selector
from ._syntax import ICMP_PROTOS, LIMITS, PROTO_NAMES
from .policy import ACTIONS, DIR_CODE, DIRS, PTYPES, Flow, Policy, upper_matches

__all__ = ["NOT_FOUND", "SecurityPolicyDatabase", "policy_to_json"]

NOT_FOUND = "ENOENT"  # what xfrm_get_policy answers for GETPOLICY/DELPOLICY on a miss
_DEFAULT_LIFETIME = Lifetime()
_U32 = 0xFFFFFFFF


class _Entry:
    """A stored policy with its place in the order and its current lifetime."""

    __slots__ = ("policy", "order", "add_time", "use_time", "soft_done")

    def __init__(self, policy: Policy, pos: int, now: float) -> None:
        self.policy = policy
        self.order = (policy.priority, pos)
        self.add_time = now
        self.use_time: Optional[float] = None
        self.soft_done = False


class _Group:
    """Policies with one (src, dst) prefix-length pair, by masked addresses."""

    __slots__ = ("smask", "dmask", "buckets")

    def __init__(self, sel: Selector) -> None:
        self.smask, self.dmask = int(sel.src.netmask), int(sel.dst.netmask)
        self.buckets: dict[tuple[int, int], list[_Entry]] = {}


def _order(entry: _Entry) -> tuple[int, int]:
    return entry.order


def _dump_key(entry: _Entry) -> tuple[int, int, int]:
    return (DIR_CODE[entry.policy.dir], *entry.order)


def _mark_key(mark: Optional[Mark]) -> tuple[int, int]:
    return (0, 0) if mark is None else (mark.value, mark.mask)


def _identity(dir: str, ptype: str, if_id: int, mark: Optional[Mark], sel: Selector) -> tuple:
    return (dir, ptype, if_id, _mark_key(mark), sel)


def _policy_identity(policy: Policy) -> tuple:
    return _identity(policy.dir, policy.ptype, policy.if_id, policy.mark, policy.selector)


def _check_dir(dir: str) -> int:
    if dir not in DIR_CODE:
        raise XfrmError("EINVAL", f"dir {dir!r}: expected in, out or fwd")
    return DIR_CODE[dir]


def _check_ptype(ptype: str) -> None:
    if ptype not in PTYPES:
        raise XfrmError("EINVAL", f"ptype {ptype!r}: expected main or sub")


def _entry_matches(entry: _Entry, flow: Flow, mark: int) -> bool:
    pol_mark = entry.policy.mark
    if pol_mark is not None and (mark & pol_mark.mask) != pol_mark.value:
        return False
    return upper_matches(entry.policy.selector, flow)


def _expiry(entry: _Entry, now: float) -> Optional[bool]:
    """xfrm_policy_timer: True when a hard limit passed, False for a soft one."""
    lft = entry.policy.lifetime
    used = entry.use_time if entry.use_time is not None else entry.add_time
    if lft.hard_add_expires and entry.add_time + lft.hard_add_expires <= now:
        return True
    if lft.hard_use_expires and used + lft.hard_use_expires <= now:
        return True
    if ((lft.soft_add_expires and entry.add_time + lft.soft_add_expires <= now)
            or (lft.soft_use_expires and used + lft.soft_use_expires <= now)):
        return False
    return None


def _has_time_limit(policy: Policy) -> bool:
    lft = policy.lifetime
    return bool(lft.soft_add_expires or lft.hard_add_expires
                or lft.soft_use_expires or lft.hard_use_expires)


class SecurityPolicyDatabase:
    """The policies of one XFRM instance, with per-direction default verdicts."""

    def __init__(self, default: Optional[dict[str, str]] = None) -> None:
        self.default = dict.fromkeys(DIRS, "allow")
        for dir, action in (default or {}).items():
            self.set_default(dir, action)
        # (dir, ptype, if_id, family) -> (src plen, dst plen) -> group
        self._tables: dict[tuple, dict[tuple[int, int], _Group]] = {}
        self._by_index: dict[int, _Entry] = {}
        self._by_id: dict[tuple, _Entry] = {}
        self._timed: dict[int, _Entry] = {}  # entries with a time limit, by index
        self._idx_generator = 0
        self._pos = 0
        self.comparisons = 0  # candidate policies examined by lookups, for tests and stats

    # ------------------------------------------------------------ settings

    def set_default(self, dir: str, action: str) -> None:
        """XFRM_MSG_SETDEFAULT: the verdict for ``dir`` when no policy matches."""
        _check_dir(dir)
        if action not in ACTIONS:
            raise ConfigError(f"default {action!r}: expected allow or block")
        self.default[dir] = action

    # ------------------------------------------------------------ storage

    def _link(self, entry: _Entry) -> None:
        policy = entry.policy
        sel = policy.selector
        table = self._tables.setdefault(
            (policy.dir, policy.ptype, policy.if_id, sel.family), {})
        group = table.get((sel.src.prefixlen, sel.dst.prefixlen))
        if group is None:
            group = table[(sel.src.prefixlen, sel.dst.prefixlen)] = _Group(sel)
        bucket = group.buckets.setdefault(
            (int(sel.src.network_address), int(sel.dst.network_address)), [])
        bisect.insort(bucket, entry, key=_order)
        self._by_index[policy.index] = entry
        self._by_id[_policy_identity(policy)] = entry
        if _has_time_limit(policy):
            self._timed[policy.index] = entry

    def _unlink(self, entry: _Entry) -> None:
        policy = entry.policy
        sel = policy.selector
        table_key = (policy.dir, policy.ptype, policy.if_id, sel.family)
        table = self._tables[table_key]
        group_key = (sel.src.prefixlen, sel.dst.prefixlen)
        group = table[group_key]
        bucket_key = (int(sel.src.network_address), int(sel.dst.network_address))
        bucket = group.buckets[bucket_key]
        bucket.remove(entry)
        if not bucket:
            del group.buckets[bucket_key]
            if not group.buckets:
                del table[group_key]
                if not table:
                    del self._tables[table_key]
        del self._by_index[policy.index]
        del self._by_id[_policy_identity(policy)]
        self._timed.pop(policy.index, None)

    def _gen_index(self, dir_code: int, index: int) -> int:
        """xfrm_gen_index: the given index when free, else the next generated one."""
        while True:
            if index:
                idx, index = index, 0
            else:
                idx = (self._idx_generator | dir_code) & _U32
                self._idx_generator = (self._idx_generator + 8) & _U32
            if idx == 0:
                idx = 8
            if idx not in self._by_index:
                return idx

    def _next_pos(self) -> int:
        self._pos += 1
        return self._pos

    # ------------------------------------------------------------ operations

    def add(self, policy: Policy, now: float, update: bool = False) -> Policy:
        """NEWPOLICY (``update`` False) or UPDPOLICY; the stored policy, with its index."""
        try:
            policy.validate()
        except ConfigError as exc:
            raise XfrmError("EINVAL", str(exc)) from None
        old = self._by_id.get(_policy_identity(policy))
        if old is not None and not update:
            raise XfrmError("EEXIST", f"a dir {policy.dir} policy with this selector, mark "
                            f"and if_id exists (index {old.policy.index})")
        if old is not None:  # xfrm_policy_insert: the replacement takes delpol's index
            self._unlink(old)
            index = old.policy.index
            same_place = old.policy.priority == policy.priority
            pos = old.order[1] if same_place else self._next_pos()
        else:
            index = self._gen_index(policy.dir_code, policy.index)
            pos = self._next_pos()
        stored = policy if policy.index == index else policy.replace(index=index)
        self._link(_Entry(stored, pos, now))
        return stored

    def _find(self, dir: str, selector: Optional[Selector], index: Optional[int],
              mark: Optional[Mark], if_id: int, ptype: str) -> _Entry:
        dir_code = _check_dir(dir)
        _check_ptype(ptype)
        if index:  # xfrm_policy_byid
            entry = self._by_index.get(index)
            found = entry and entry.policy
            if (not found or index & 7 != dir_code
                    or (found.dir, found.ptype, found.if_id, _mark_key(found.mark))
                    != (dir, ptype, if_id, _mark_key(mark))):
                raise XfrmError(NOT_FOUND, f"no dir {dir} policy with index {index:#x} "
                                "(and this mark, if_id and ptype)")
            return entry
        if selector is None:
            raise XfrmError("EINVAL", "a policy is named by its selector or its index")
        entry = self._by_id.get(_identity(dir, ptype, if_id, mark, selector))
        if entry is None:  # xfrm_policy_bysel_ctx
            raise XfrmError(NOT_FOUND, f"no dir {dir} policy with selector src {selector.src} "
                            f"dst {selector.dst} (and this mark, if_id and ptype)")
        return entry

    def get(self, dir: str, selector: Optional[Selector] = None, index: Optional[int] = None,
            mark: Optional[Mark] = None, if_id: int = 0, ptype: str = "main") -> Policy:
        """GETPOLICY by index (when given and not 0) or by selector; ENOENT on a miss."""
        return self._find(dir, selector, index, mark, if_id, ptype).policy

    def delete(self, dir: str, selector: Optional[Selector] = None,
               index: Optional[int] = None, mark: Optional[Mark] = None, if_id: int = 0,
               ptype: str = "main") -> Policy:
        """DELPOLICY, named as for :meth:`get`; the deleted policy."""
        entry = self._find(dir, selector, index, mark, if_id, ptype)
        self._unlink(entry)
        return entry.policy

    def flush(self, dir: Optional[str] = None, ptype: str = "main") -> list[Policy]:
        """FLUSHPOLICY of one type (``ip xfrm policy flush``), optionally one dir."""
        if dir is not None:
            _check_dir(dir)
        _check_ptype(ptype)
        gone = [entry for entry in sorted(self._by_index.values(), key=_dump_key)
                if entry.policy.ptype == ptype and dir in (None, entry.policy.dir)]
        for entry in gone:
            self._unlink(entry)
        return [entry.policy for entry in gone]

    # ------------------------------------------------------------ lookups

    def _best(self, dir: str, ptype: str, flow: Flow, mark: int, if_id: int) -> Optional[_Entry]:
        table = self._tables.get((dir, ptype, if_id, flow.family))
        if not table:
            return None
        src, dst = int(flow.src), int(flow.dst)
        best: Optional[_Entry] = None
        for group in table.values():
            bucket = group.buckets.get((src & group.smask, dst & group.dmask))
            if bucket is None:
                continue
            for entry in bucket:
                if best is not None and entry.order >= best.order:
                    break  # sorted: nothing further in this bucket can win
                self.comparisons += 1
                if _entry_matches(entry, flow, mark):
                    best = entry
                    break
        return best

    def lookup(self, dir: str, flow: Flow, mark: int = 0, if_id: int = 0,
               now: Optional[float] = None) -> Optional[Policy]:
        """The policy for ``flow``: sub policies first, then main; lowest priority, oldest.

        With ``now`` a match counts as a use (the policy's use time).
        """
        _check_dir(dir)
        for ptype in ("sub", "main"):
            entry = self._best(dir, ptype, flow, mark, if_id)
            if entry is not None:
                if now is not None:
                    entry.use_time = now
                return entry.policy
        return None

    def verdict(self, dir: str, flow: Flow, mark: int = 0, if_id: int = 0,
                now: Optional[float] = None) -> tuple[str, Optional[Policy]]:
        """("allow" or "block", the policy) -- the dir's default when none matches."""
        policy = self.lookup(dir, flow, mark, if_id, now)
        if policy is None:
            return self.default[dir], None
        return policy.action, policy

    # ------------------------------------------------------------ listing

    def dump(self, dir: Optional[str] = None) -> list[Policy]:
        """Policies by dir (in, out, fwd), then priority, then age."""
        if dir is not None:
            _check_dir(dir)
        return [entry.policy for entry in sorted(self._by_index.values(), key=_dump_key)
                if dir in (None, entry.policy.dir)]

    def __iter__(self) -> Iterator[Policy]:
        return iter(self.dump())

    def __len__(self) -> int:
        return len(self._by_index)

    def counts(self) -> dict[str, int]:
        """``ip xfrm policy count``: policies per dir."""
        counts = dict.fromkeys(DIRS, 0)
        for entry in self._by_index.values():
            counts[entry.policy.dir] += 1
        return counts

    def current_lifetime(self, policy: Policy) -> tuple[float, Optional[float]]:
        """(add time, last use time or None) of the stored policy with this index."""
        entry = self._by_index.get(policy.index)
        if entry is None:
            raise XfrmError(NOT_FOUND, f"no policy with index {policy.index:#x}")
        return entry.add_time, entry.use_time

    # ------------------------------------------------------------ time

    def tick(self, now: float) -> list[tuple[Policy, bool]]:
        """(policy, hard) for each time limit that passed; hard ones are removed."""
        events = []
        for entry in sorted(self._timed.values(), key=_dump_key):
            hard = _expiry(entry, now)
            if hard:
                self._unlink(entry)
                events.append((entry.policy, True))
            elif hard is False and not entry.soft_done:
                entry.soft_done = True
                events.append((entry.policy, False))
        return events


# ---------------------------------------------------------------- JSON

def _selector_json(sel: Selector) -> dict:
    out: dict = {"src": str(sel.src), "dst": str(sel.dst)}
    if sel.proto:
        out["proto"] = PROTO_NAMES.get(sel.proto, sel.proto)
    words = ("type", "code") if sel.proto in ICMP_PROTOS else ("sport", "dport")
    for word, port, mask in ((words[0], sel.sport, sel.sport_mask),
                             (words[1], sel.dport, sel.dport_mask)):
        if mask:
            out[word] = port if mask == 0xFFFF else {"value": port, "mask": mask}
    if sel.ifindex:
        out["dev"] = sel.ifindex
    return out


def _template_json(tmpl) -> dict:
    return {"src": None if tmpl.src is None else str(tmpl.src),
            "dst": None if tmpl.dst is None else str(tmpl.dst),
            "proto": PROTO_NAMES.get(tmpl.proto, tmpl.proto), "spi": tmpl.spi,
            "mode": tmpl.mode, "reqid": tmpl.reqid, "level": tmpl.level}


def policy_to_json(policy: Policy) -> dict:
    """``policy`` as a JSON-ready dict whose keys are ``ip xfrm`` words.

    Selector ports appear when their mask is set (``type``/``code`` for
    ICMP); ``mark`` only when the policy has one; ``lifetime`` holds only
    the limits that differ from the defaults, by ``limit`` word.
    """
    out = _selector_json(policy.selector)
    out.update({"dir": policy.dir, "action": policy.action, "priority": policy.priority,
                "index": policy.index, "ptype": policy.ptype, "if_id": policy.if_id})
    if policy.mark is not None:
        out["mark"] = {"value": policy.mark.value, "mask": policy.mark.mask}
    out["flags"] = sorted(policy.flags)
    out["tmpl"] = [_template_json(tmpl) for tmpl in policy.templates]
    out["lifetime"] = {word: getattr(policy.lifetime, name) for word, name in LIMITS.items()
                       if getattr(policy.lifetime, name) != getattr(_DEFAULT_LIFETIME, name)}
    return out

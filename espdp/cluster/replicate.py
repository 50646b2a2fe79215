"""SAs and policies installed through any node's control socket reach every node.

On a cluster node the control socket talks to a :class:`ReplicatingXfrm`: a
change (``state add|update|delete|flush``, ``policy add|update|delete|flush``)
is applied here first, exactly as on a lone daemon, and when it succeeded it
is published as a record under ``state/`` in etcd: the ``ip xfrm`` line
itself, sealed with the cluster secret (:mod:`.seal`), so keys are never in
etcd or on the wire in the clear.  One record per SA identity (dst, SPI,
proto, mark) and per policy identity (dir, selector, mark, if_id, type); a
delete is a record too (a tombstone), so a node that reads the records in
the order etcd wrote them reaches the same SAD and SPD.  The other nodes
apply each record with :func:`apply_record` (an ``add`` of what exists
becomes an ``update``, an ``update`` of what is missing an ``add``).

Not replicated: ``allocspi`` (a larval SPI reservation is local; the
``update`` that completes it is replicated as an add), ``get``/``list``/
``count``, and SAs and policies from the configuration files (every node has
its own copy of those).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any, Optional

from ..errors import XfrmError
from ..sa import PROTO_ESP
from ..xfrm.parse import StateCommand
from ..xfrm.policy_parse import PolicyCommand, parse_xfrm_file


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def sa_name(dst: Any, spi: int, proto: Optional[int], mark: Any) -> str:
    return "sa/" + _digest(f"{dst}|{spi}|{proto or PROTO_ESP}|{mark!r}")


def policy_identity(dir: str, selector: Any, mark: Any, if_id: int, ptype: Optional[str]) -> str:
    return f"{dir}|{ptype or 'main'}|{selector!r}|{mark!r}|{if_id}"


def describe(command: Any, xfrm: Any, line: str) -> Optional[tuple[str, dict]]:
    """The record a successful ``command`` is published as (None: not replicated).
    Called before the command runs (a delete by index needs the policy)."""
    verb = command.verb
    if isinstance(command, StateCommand):
        if verb in ("add", "update"):
            info = command.info
            return sa_name(info.dst, info.spi, info.proto, info.mark), \
                {"op": "put", "line": line}
        if verb == "delete":
            return sa_name(command.dst, command.spi, command.proto, command.mark), \
                {"op": "delete", "line": line}
        if verb == "flush":
            return "flush/sa", {"op": "flush", "line": line}
        return None
    if isinstance(command, PolicyCommand):
        if verb in ("add", "update"):
            p = command.policy
            identity = policy_identity(p.dir, p.selector, p.mark, p.if_id, p.ptype)
            return "policy/" + _digest(identity), {"op": "put", "line": line}
        if verb == "delete":
            p = xfrm.getpolicy(command.dir, command.selector, command.index, command.mark,
                               command.if_id, command.ptype or "main")
            identity = policy_identity(p.dir, p.selector, p.mark, p.if_id, p.ptype)
            return "policy/" + _digest(identity), {"op": "delete", "policy": identity}
        if verb == "flush":
            return "flush/policy", {"op": "flush", "line": line}
    return None


def apply_record(xfrm: Any, record: dict, now: float) -> None:
    """Apply a record another node published (see the module docstring)."""
    if "policy" in record:   # a policy delete, by identity
        for p in xfrm.spd.dump():
            if policy_identity(p.dir, p.selector, p.mark, p.if_id, p.ptype) == record["policy"]:
                xfrm.delpolicy(p.dir, p.selector, mark=p.mark, if_id=p.if_id, ptype=p.ptype)
        return
    (command,) = parse_xfrm_file(record["line"], "<cluster>")
    try:
        xfrm.apply(command, now)
    except XfrmError as e:
        swap = {("add", "EEXIST"): "update", ("update", "ESRCH"): "add"}.get(
            (command.verb, e.errno))
        if swap is not None and record["op"] == "put":
            xfrm.apply(dataclasses.replace(command, verb=swap), now)
        elif not (e.errno == "ESRCH" and record["op"] in ("delete", "flush")):
            raise


class ReplicatingXfrm:
    """The XFRM model as the control socket of a cluster node sees it: every
    successful change is also handed to ``publish(name, record)``."""

    def __init__(self, xfrm: Any, publish: Callable[[str, dict], None]) -> None:
        self._xfrm = xfrm
        self._publish = publish

    def __getattr__(self, name: str) -> Any:
        return getattr(self._xfrm, name)

    def execute(self, line: str, now: float, show_keys: bool = False) -> dict:
        commands = parse_xfrm_file(line, "<xfrm>")
        if len(commands) != 1:
            return self._xfrm.execute(line, now, show_keys)
        record = describe(commands[0], self._xfrm, line)
        result = self._xfrm.apply(commands[0], now, show_keys)
        if record is not None:
            self._publish(*record)
        return result

"""The client side of the control socket, and the text the CLI prints.

:class:`ControlClient` sends one JSON request per line and reads the
answer; :meth:`ControlClient.events` follows a monitor subscription.  The
``format_*`` functions turn answers into the text ``espdp xfrm`` and
``espdp status`` print (``--json`` prints the answers as they are).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any, Optional

from .errors import ConfigError, XfrmError


class ControlClient:
    """A connection to a running daemon's control socket."""

    def __init__(self, path: str, timeout: Optional[float] = 10.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise ConfigError(f"cannot reach the daemon at {path}: {e.strerror} "
                              "(is `espdp run` running? see --control)") from None
        self._file = self._sock.makefile("rb")
        self._id = 0

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise ConfigError(f"the daemon at {self.path} closed the connection")
        return json.loads(line)

    def request(self, op: str, **fields: Any) -> Any:
        """Send ``op``; its result, or :class:`XfrmError`/:class:`ConfigError`."""
        self._id += 1
        self._sock.sendall(json.dumps({"id": self._id, "op": op, **fields}).encode() + b"\n")
        while True:
            answer = self._read()
            if "event" not in answer:
                break
        if not answer.get("ok"):
            if "errno" in answer:
                raise XfrmError(answer["errno"], answer.get("error", ""))
            raise ConfigError(answer.get("error", "refused"))
        return answer.get("result")

    def xfrm(self, line: str, show_keys: bool = False) -> dict:
        return self.request("xfrm", line=line, show_keys=show_keys)

    def events(self, groups: Optional[list] = None) -> Iterator[dict]:
        """Subscribe to ``groups`` (all when None) and yield events as they come."""
        self.request("monitor", groups=groups or [])
        self._sock.settimeout(None)
        while True:
            answer = self._read()
            if "event" in answer:
                yield answer["event"]


# ---------------------------------------------------------------- text output

def _words(obj: dict, keys: tuple) -> str:
    return " ".join(f"{k} {obj[k]}" for k in keys if obj.get(k) not in (None, "", [], {}))


def _mark(mark) -> str:
    """A mark as ip prints it, ``0x77/0xffffffff``, from the daemon's {value, mask}."""
    if isinstance(mark, dict):
        return f"{mark.get('value', 0):#x}/{mark.get('mask', 0xFFFFFFFF):#x}"
    return str(mark)


def format_state(sa: dict) -> str:
    """An SA of ``ip xfrm state list`` in ip's layout (keys only if the daemon sent them)."""
    lines = [_words(sa, ("src", "dst")),
             "\t" + _words(sa, ("proto", "spi", "reqid", "mode"))]
    flags = " ".join(sa.get("flag") or [])
    lines.append("\t" + _words(sa, ("replay-window",)) + (f" flag {flags}" if flags else ""))
    for kind in ("aead", "enc", "auth", "auth-trunc"):
        algo = sa.get(kind)
        if algo:
            bits = algo.get("icv_bits", algo.get("trunc_bits", ""))
            lines.append(f"\t{kind} {algo['name']} {algo.get('key', '0x<hidden>')} {bits}".rstrip())
    if sa.get("encap"):
        e = sa["encap"]
        lines.append(f"\tencap type {e['type']} sport {e['sport']} dport {e['dport']} "
                     f"addr {e.get('oa') or '0.0.0.0'}")
    for kind, word in (("mark", "mark"), ("set-mark", "output-mark")):
        if sa.get(kind):
            lines.append(f"\t{word} {_mark(sa[kind])}")
    if sa.get("sel"):
        lines.append("\tsel " + _words(sa["sel"], ("src", "dst", "proto", "sport", "dport")))
    if sa.get("current"):
        c = sa["current"]
        lines.append(f"\tcurrent {c.get('bytes', 0)}(bytes), {c.get('packets', 0)}(packets)")
    if sa.get("anti-replay"):
        lines.append("\tanti-replay " + _words(sa["anti-replay"], tuple(sa["anti-replay"])))
    if sa.get("state") and sa["state"] != "valid":
        lines.append(f"\tstate {sa['state']}")
    return "\n".join(lines)


def format_policy(policy: dict) -> str:
    """A policy of ``ip xfrm policy list`` in ip's layout."""
    lines = [_words(policy, ("src", "dst", "proto", "sport", "dport")),
             "\t" + _words(policy, ("dir", "action", "priority", "index", "ptype"))]
    if policy.get("mark"):
        lines.append(f"\tmark {_mark(policy['mark'])}")
    for t in policy.get("tmpl") or []:
        lines.append("\ttmpl " + _words(t, ("src", "dst")))
        lines.append("\t\t" + _words(t, ("proto", "spi", "reqid", "mode", "level")))
    return "\n".join(lines)


def format_answer(result: Any) -> str:
    """Text for an ``espdp xfrm`` answer."""
    if not result:
        return ""
    if "states" in result:
        return "\n".join(format_state(s) for s in result["states"])
    if "policies" in result:
        return "\n".join(format_policy(p) for p in result["policies"])
    if "count" in result:
        return str(result["count"])
    if "spi" in result:
        return format_state(result)
    if "dir" in result:
        return format_policy(result)
    return json.dumps(result)


def format_event(event: dict) -> str:
    rest = {k: v for k, v in event.items() if k != "type"}
    return f"{event.get('type', 'event')} {json.dumps(rest, separators=(',', ':'))}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_status(status: dict) -> str:
    """``espdp status``, in the manner of ``swanctl --list-sas``."""
    out = [f"{status['tun']}: up {status['uptime']:.0f}s, {len(status['sas'])} SAs, "
           f"{status['policies']} policies"]
    for sa in status["sas"]:
        encap = f", {sa['encap']}" if sa.get("encap") else ", raw ESP"
        out.append(f"  spi {sa['spi']} reqid {sa['reqid']} {sa['state']}: {sa['src']} -> "
                   f"{sa['dst']}, {sa['mode']}{encap}, {'/'.join(sa['algorithms'])}")
        drops = sum(sa["drops"].values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(sa["drops"].items()))
        out.append(f"    {sa['packets']} packets, {_size(sa['bytes'])}, {drops} drops"
                   f"{' (' + detail + ')' if detail else ''}, age {sa['age']:.0f}s")
    counters = status.get("counters")
    if counters:
        out.append(f"  tun: {counters['tun_in']} in, {counters['tun_out']} out; wire: "
                   f"{counters['sent']} sent, {counters['received']} received, "
                   f"{counters['injected']} marked to the kernel")
        for kind in ("policy_drops", "engine_drops"):
            if counters[kind]:
                out.append(f"  {kind.replace('_', ' ')}: " + ", ".join(
                    f"{k} {v}" for k, v in sorted(counters[kind].items())))
    cluster = status.get("cluster")
    if cluster:
        state = "forwarding" if cluster["forwarding"] else f"stopped ({cluster['reason']})"
        out.append(f"  cluster node {cluster['node']}: {state}, segments "
                   f"{cluster['owned'] or 'none'} (see `espdp cluster status`)")
    if status.get("no_sa_drops"):
        out.append("  dropped before an SA was found: " + ", ".join(
            f"{k} {v}" for k, v in sorted(status["no_sa_drops"].items())))
    return "\n".join(out)


def format_cluster(status: dict) -> str:
    """``espdp cluster status``: this node, the members, who owns which segment,
    checkpoints and takeovers."""
    state = "forwarding" if status["forwarding"] else f"NOT forwarding: {status['reason']}"
    etcd = status["etcd"]
    out = [f"cluster {status['cluster']}, node {status['node']}: {state}",
           f"  etcd {etcd['endpoint']}: " + ("ok" if etcd["ok"] else
                                             f"unreachable for {etcd['since']}s ({etcd['error']})")
           + (f", lease {status['lease']} (forwarding allowed for {status['fence_in']}s more)"
              if status["lease"] else ", no lease")]
    for node in status["nodes"]:
        mark = " (this node)" if node["self"] else ""
        member = "" if node["member"] else " [not a member]"
        out.append(f"  node {node['name']}{mark}{member}: segments "
                   f"{', '.join(map(str, node['segments'])) or 'none'}")
    owners = " ".join(f"{s['segment']}:{s['owner'] or '-'}" for s in status["segments"])
    out.append(f"  segments: {owners}")
    c = status["checkpoints"]
    age = "never" if c["age"] is None else f"{c['age']:.2f}s ago"
    out.append(f"  checkpoints: last {age}, every {c['interval']}s, jump {c['jump']}; "
               f"{c['writes']} writes ({c['writes_per_second']}/s), {c['records']} SA records "
               f"({c['records_per_second']}/s), {c['conflicts']} conflicts")
    out.append(f"  SAs: {status['sas']['armed']} armed here, {status['sas']['in_cluster']} "
               f"in the cluster's SAD")
    out.append(f"  takeovers so far: {status['takeovers']}")
    for t in status.get("takeover_log", [])[-5:]:
        out.append(f"    segment {t['segment']}: {t['from']} -> {t['to']}")
    drops = ", ".join(f"{k} {v}" for k, v in sorted(status["drops"].items()) if v)
    if drops:
        out.append(f"  not processed here: {drops}")
    return "\n".join(out)

"""Read ``ip xfrm policy`` command lines (iproute2 syntax) into plain data.

:func:`parse_policy` turns one line into a :class:`PolicyCommand`;
:func:`parse_xfrm_file` reads a script mixing ``ip xfrm state`` and ``ip xfrm
policy`` lines; :func:`format_policy` writes a :class:`~espdp.xfrm.policy.Policy`
back as an ``ip xfrm policy add`` line.  The splitter, value readers and
selector words are those of :mod:`espdp.xfrm.parse` (shared, not copied).

The words, their defaults and their quirks are those of iproute2
(``ip/xfrm_policy.c``, ``ip/ipxfrm.c``):

* the selector (``src``, ``dst``, ``dev``, ``proto``, ``sport``/``dport``,
  ``type``/``code``, ``key``) as in ``ip xfrm state ... sel``: a plain
  address is a host prefix, an absent side is the wildcard of the other
  side's family (IPv4 when both are absent, as iproute2 defaults);
* ``dir in|out|fwd`` is required;
* ``mark V [mask M]``: no mask means 0xffffffff; ``add``/``update`` send the
  mark when the mask is not 0, ``get``/``delete`` only when ``V & M`` is not
  0 (so a policy with mark 0 cannot be named by mark, as with iproute2);
* ``flag`` takes names (``localok``, ``icmp``) or a number;
* ``tmpl`` takes every template word that follows (``src``, ``dst``,
  ``proto``, ``spi``, ``mode``, ``reqid``, ``level``), so write the selector
  before the first ``tmpl``; a template needs ``proto esp`` (the kernel
  refuses a template without a protocol); ``level`` is ``required`` (the
  default) or ``use``; ``tmpl`` may repeat, up to 6 times;
* ``get``/``delete`` name a policy by its selector or by ``index``, not both;
  ``ptype`` defaults to main for them and for ``flush``.

Deliberate differences, all stricter or wider, never a different meaning:
selector words may come in any order and between other words (iproute2 wants
them in one run), each only once, but not right after a ``tmpl``, whose words
they would be; ``index``, ``priority``, ``if_id``, ``action`` and ``ptype``
only once; ``flush`` also takes ``dir``; only ESP
templates in transport or tunnel mode; no ``ctx``, ``deleteall``, ``set``.

Every error is a :class:`~espdp.errors.ConfigError` whose message starts
with ``FILE:LINE:`` and names the offending word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ..errors import ConfigError
from ..sa import Lifetime, Mark, Selector
from ._format import _format_selector
from ._syntax import (
    LIMITS,
    OBJECT_WORDS,
    Words,
    by_prefix,
    lex,
    logical_lines,
    read_address,
    show,
    skip_ip_xfrm,
)
from .parse import (
    _SEL_NEEDS,
    _SEL_VALUES,
    Handler,
    StateCommand,
    _build_selector,
    _h_flags,
    _h_limit,
    _h_mark,
    _h_mode,
    _lookup_mark,
    _once,
    _set_number,
    _unsupported,
    _xfrm_proto,
    parse_command,
    parse_state,
)
from .policy import DIRS, LEVELS, POLICY_FLAGS, PTYPES, Policy, Template

__all__ = ["PolicyCommand", "format_policy", "parse_policy", "parse_xfrm_file"]


@dataclass(frozen=True)
class PolicyCommand:
    """One ``ip xfrm policy`` command.

    * ``verb``: add, update, get, delete, list, flush or count
      (``show``/``lst`` are list).
    * ``policy``: add/update: the policy, validated; the fields below then
      repeat its dir, selector, index (None for 0), mark, if_id and ptype.
    * ``dir``, ``selector``, ``index``, ``mark``, ``if_id``, ``ptype``:
      get/delete: which policy (by ``index`` when given, else by
      ``selector``); ``ptype`` is "main" unless given.  list: filters
      (see :meth:`matches`), ``ptype`` None for any.  flush: ``ptype``
      ("main" unless given) and ``dir`` (None for all).
    * ``action``, ``priority``, ``flags``: list filters (iproute2's).
    * ``where``: ``FILE:LINE`` of the command, for messages; not compared.
    """

    verb: str
    policy: Optional[Policy] = None
    dir: Optional[str] = None
    selector: Optional[Selector] = None
    index: Optional[int] = None
    mark: Optional[Mark] = None
    if_id: int = 0
    ptype: Optional[str] = None
    where: str = field(default="", compare=False)
    action: Optional[str] = None
    priority: Optional[int] = None
    flags: frozenset = frozenset()

    def matches(self, policy: Policy) -> bool:
        """Whether ``policy`` passes this list's filters (xfrm_policy_filter_match)."""
        for name in ("dir", "ptype", "index", "action", "priority"):
            wanted = getattr(self, name)
            if wanted is not None and getattr(policy, name) != wanted:
                return False
        if self.flags and not self.flags & policy.flags:
            return False
        return self.selector is None or _selector_filter(self.selector, policy.selector)


def _selector_filter(want: Selector, have: Selector) -> bool:
    for prefix, sel_prefix in ((want.src, have.src), (want.dst, have.dst)):
        if prefix.prefixlen and (sel_prefix.version != prefix.version
                                 or sel_prefix.network_address not in prefix):
            return False
    if want.ifindex and want.ifindex != have.ifindex:
        return False
    if want.proto and want.proto != have.proto:
        return False
    return (not (want.sport ^ have.sport) & want.sport_mask
            and not (want.dport ^ have.dport) & want.dport_mask)


# ---------------------------------------------------------------- command words

# (word, meaning) in iproute2's order of trial (ip/xfrm.c, ip/xfrm_policy.c)
_VERB_WORDS = (
    ("add", "add"), ("update", "update"), ("delete", "delete"), ("deleteall", None),
    ("delall", None), ("list", "list"), ("show", "list"), ("lst", "list"), ("get", "get"),
    ("flush", "flush"), ("count", "count"), ("set", None), ("help", None),
)


# ---------------------------------------------------------------- word handlers

def _h_sel_word(words: Words, keyword: str, f: dict) -> None:
    """A selector word at the top level: collected, each only once."""
    sel = f.setdefault("_sel", {})
    if keyword in sel:
        raise words.error(f"'{keyword}' is given twice")
    sel[keyword] = _SEL_VALUES[keyword](words, keyword)


def _alternatives(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def _choice(name: str, choices: tuple[str, ...]) -> Handler:
    def handler(words: Words, keyword: str, f: dict) -> None:
        _once(words, keyword, f)
        word = words.value(keyword, _alternatives(choices))
        if word not in choices:
            raise words.error(f"'{keyword}': expected {_alternatives(choices)}, "
                              f"got {show(word)}")
        f[name] = str(word)
    return handler


def _h_level(words: Words, keyword: str, t: dict) -> None:
    word = words.value(keyword, "required or use")
    if word not in LEVELS:
        raise words.error(f"'{keyword}': expected required or use, got {show(word)}")
    t["level"] = str(word)


def _h_tmpl_address(words: Words, keyword: str, t: dict) -> None:
    t[keyword] = read_address(words, keyword)


def _h_tmpl_proto(words: Words, keyword: str, t: dict) -> None:
    t["proto"] = _xfrm_proto(words, keyword)


_TMPL_WORDS = {
    "src": _h_tmpl_address, "dst": _h_tmpl_address, "proto": _h_tmpl_proto,
    "spi": _set_number("spi"), "mode": _h_mode, "reqid": _set_number("reqid"),
    "level": _h_level,
}


def _h_tmpl(words: Words, keyword: str, f: dict) -> None:
    """``tmpl`` and every template word after it (iproute2's xfrm_tmpl_parse)."""
    t: dict = {}
    while words.peek() in _TMPL_WORDS:
        word = str(words.take())
        if word in t:
            raise words.error(f"'{keyword}': '{word}' is given twice in one template "
                              "(write the selector before the first 'tmpl')")
        _TMPL_WORDS[word](words, word, t)
    if not t:
        raise words.error(f"'{keyword}': missing template (src, dst, proto esp, mode ...)")
    if "proto" not in t:
        raise words.error(f"'{keyword}': 'proto' is required (proto esp)")
    f.setdefault("_tmpls", []).append(Template(
        dst=t.get("dst"), src=t.get("src"), proto=t["proto"], spi=t.get("spi", 0),
        mode=t.get("mode", "transport"), reqid=t.get("reqid", 0),
        level=t.get("level", "required")))


_SEL_WORDS = dict.fromkeys(_SEL_VALUES, _h_sel_word)
_FLAG_HANDLER = _h_flags("flags", POLICY_FLAGS, 8)
_NO_CTX = _unsupported("a security context is")

_ADD_WORDS = {
    **_SEL_WORDS, "dir": _choice("dir", DIRS), "ctx": _NO_CTX, "mark": _h_mark,
    "index": _set_number("index", True), "ptype": _choice("ptype", PTYPES),
    "action": _choice("action", ("allow", "block")),
    "priority": _set_number("priority", True), "flag": _FLAG_HANDLER,
    "if_id": _set_number("if_id", True), "limit": _h_limit, "tmpl": _h_tmpl,
}
_GET_WORDS = {
    **_SEL_WORDS, "dir": _ADD_WORDS["dir"], "ctx": _NO_CTX, "mark": _h_mark,
    "index": _ADD_WORDS["index"], "ptype": _ADD_WORDS["ptype"], "if_id": _ADD_WORDS["if_id"],
}
_LIST_WORDS = {
    **_SEL_WORDS, "dir": _ADD_WORDS["dir"], "index": _ADD_WORDS["index"],
    "ptype": _ADD_WORDS["ptype"], "action": _ADD_WORDS["action"],
    "priority": _ADD_WORDS["priority"], "flag": _FLAG_HANDLER,
}
_FLUSH_WORDS = {"ptype": _ADD_WORDS["ptype"], "dir": _ADD_WORDS["dir"]}


# ---------------------------------------------------------------- building

def _selector(words: Words, f: dict) -> Selector:
    """The selector of the collected words, checked as ``ip xfrm state ... sel`` is."""
    sel = f.get("_sel", {})
    if "src" in sel and "dst" in sel and sel["src"].version != sel["dst"].version:
        raise words.error(f"'dst': {sel['dst']} is not of the same address family as "
                          f"'src' {sel['src']}")
    for names, protos, proto_names in _SEL_NEEDS:
        given = [name for name in names if name in sel]
        if given and sel.get("proto", 0) not in protos:
            raise words.error(f"'{given[0]}' needs proto {proto_names}")
    return _build_selector(sel, 4)


def _require_dir(words: Words, f: dict) -> str:
    if "dir" not in f:
        raise words.error("'dir' is required (dir in, out or fwd)")
    return f["dir"]


def _finish_add(words: Words, f: dict, verb: str) -> PolicyCommand:
    direction = _require_dir(words, f)
    value, mask = f.get("mark", (0, 0))
    policy = Policy(
        _selector(words, f), direction, action=f.get("action", "allow"),
        priority=f.get("priority", 0), index=f.get("index", 0),
        mark=Mark(value, mask) if mask else None, if_id=f.get("if_id", 0),
        templates=tuple(f.get("_tmpls", ())), lifetime=Lifetime(**f.get("_limits", {})),
        flags=f.get("flags", frozenset()), ptype=f.get("ptype", "main"))
    try:
        policy.validate()
    except ConfigError as exc:
        raise words.error(str(exc)) from None
    return PolicyCommand(verb, policy=policy, dir=direction, selector=policy.selector,
                         index=policy.index or None, mark=policy.mark, if_id=policy.if_id,
                         ptype=policy.ptype, where=words.where)


def _finish_get(words: Words, f: dict, verb: str) -> PolicyCommand:
    direction = _require_dir(words, f)
    if "_sel" in f and "index" in f:
        raise words.error("'index': give either a selector or an index, not both")
    if "_sel" not in f and "index" not in f:
        raise words.error("a selector (src, dst ...) or 'index' is required")
    if f.get("index") == 0:
        raise words.error("'index': 0 names no policy")
    return PolicyCommand(verb, dir=direction,
                         selector=_selector(words, f) if "_sel" in f else None,
                         index=f.get("index"), mark=_lookup_mark(f), if_id=f.get("if_id", 0),
                         ptype=f.get("ptype", "main"), where=words.where)


def _finish_list(words: Words, f: dict, verb: str) -> PolicyCommand:
    return PolicyCommand(verb, dir=f.get("dir"),
                         selector=_selector(words, f) if "_sel" in f else None,
                         index=f.get("index"), ptype=f.get("ptype"), where=words.where,
                         action=f.get("action"), priority=f.get("priority"),
                         flags=f.get("flags", frozenset()))


def _finish_flush(words: Words, f: dict, verb: str) -> PolicyCommand:
    return PolicyCommand(verb, dir=f.get("dir"), ptype=f.get("ptype", "main"),
                         where=words.where)


_VERBS = {  # verb -> (its words, how the command is built)
    "add": (_ADD_WORDS, _finish_add), "update": (_ADD_WORDS, _finish_add),
    "get": (_GET_WORDS, _finish_get), "delete": (_GET_WORDS, _finish_get),
    "list": (_LIST_WORDS, _finish_list), "flush": (_FLUSH_WORDS, _finish_flush),
    "count": ({}, lambda words, f, verb: PolicyCommand(verb, where=words.where)),
}


def parse_policy(line: str, filename: str = "<xfrm>", lineno: int = 1,
                where: Optional[str] = None) -> PolicyCommand:
    """Parse one ``[ip] [xfrm] [policy] VERB ...`` line.

    iproute2's abbreviations of ``xfrm``, ``policy`` and the verb are
    accepted (``ip x p a ...``); a bare ``ip xfrm policy`` is ``list``.
    ``filename`` and ``lineno`` (or ``where``, which replaces both) only go
    into error messages and the command's ``where``.
    """
    return parse_command(line, where or f"{filename}:{lineno}", "policy", _VERB_WORDS, _VERBS)


def _object_of(line: str, where: str) -> str:
    """"state" or "policy": the object word of an ``ip xfrm`` line."""
    words = Words(lex(line, where), where)
    if not words:
        raise words.error("empty command")
    skip_ip_xfrm(words)
    word = words.peek()
    found = by_prefix(word or "", OBJECT_WORDS)
    if found is None or found[1] is None:
        got = show(word) if word is not None else "nothing"
        raise words.error(f"expected 'state' or 'policy' (ip xfrm state|policy ...), got {got}")
    return found[1]


def parse_xfrm_file(text: str, filename: str = "<xfrm>") -> list[
        Union[StateCommand, PolicyCommand]]:
    """Parse a script of ``ip xfrm state`` and ``ip xfrm policy`` lines, in order.

    Comments, blank lines and continuations as :func:`parse_state_file`
    reads them.  Each command must name its object (``state``/``sa`` or
    ``policy``, abbreviations allowed); errors name the command's first line.
    """
    commands: list[Union[StateCommand, PolicyCommand]] = []
    for lineno, line in logical_lines(text):
        if not line.strip():
            continue
        if _object_of(line, f"{filename}:{lineno}") == "state":
            commands.append(parse_state(line, filename, lineno))
        else:
            commands.append(parse_policy(line, filename, lineno))
    return commands


# ---------------------------------------------------------------- writing

def _format_template(tmpl: Template) -> list[str]:
    out = ["tmpl"]
    for word, addr in (("src", tmpl.src), ("dst", tmpl.dst)):
        if addr is not None:
            out += [word, str(addr)]
    out += ["proto", "esp" if tmpl.proto == 50 else str(tmpl.proto)]
    if tmpl.spi:
        out += ["spi", f"{tmpl.spi:#010x}"]
    out += ["mode", tmpl.mode]
    if tmpl.reqid:
        out += ["reqid", str(tmpl.reqid)]
    if tmpl.level != "required":
        out += ["level", tmpl.level]
    return out


_DEFAULT_LIFETIME = Lifetime()


def format_policy(policy: Policy) -> str:
    """``policy`` as an ``ip xfrm policy add`` line that parses back to it.

    Not representable, because iproute2 has no words for them: a mark whose
    mask is 0 (iproute2 sends none; it reads back as no mark), a selector
    port 0 under a mask, and port masks other than 0xffff.
    """
    out = ["ip", "xfrm", "policy", "add", *_format_selector(policy.selector)[1:],
           "dir", policy.dir]
    if policy.ptype != "main":
        out += ["ptype", policy.ptype]
    if policy.action != "allow":
        out += ["action", policy.action]
    out += ["priority", str(policy.priority)]
    if policy.index:
        out += ["index", str(policy.index)]
    if policy.mark is not None and policy.mark.mask:
        out += ["mark", f"{policy.mark.value:#x}", "mask", f"{policy.mark.mask:#x}"]
    if policy.if_id:
        out += ["if_id", str(policy.if_id)]
    if policy.flags:
        out += ["flag", *(name for name in POLICY_FLAGS if name in policy.flags)]
    out += [w for word, name in LIMITS.items()
            if getattr(policy.lifetime, name) != getattr(_DEFAULT_LIFETIME, name)
            for w in ("limit", word, str(getattr(policy.lifetime, name)))]
    for tmpl in policy.templates:
        out += _format_template(tmpl)
    return " ".join(out)


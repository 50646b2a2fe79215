"""Read ``ip xfrm state`` command lines (iproute2 syntax) into plain data.

:func:`parse_state` turns one line into a :class:`StateCommand`;
:func:`parse_state_file` reads a script of them; :func:`format_state` writes
an :class:`~espdp.sa.SAInfo` back as an ``ip xfrm state add`` line.  The
splitter and value readers live in :mod:`._syntax`, the writer in
:mod:`._format`; this module holds the grammar.

The words, their defaults and their quirks are those of iproute2
(``ip/xfrm_state.c``, ``ip/ipxfrm.c``):

* numbers are read like ``strtoul(s, NULL, 0)``: decimal, ``0x`` hex, and a
  leading ``0`` means octal; no signs.  Each has iproute2's width (u32, u16
  for ports, u64 for limits);
* a key starting with ``0x`` is hex, anything else is the key's own bytes;
* ``auth NAME KEY`` takes the algorithm's default truncation (96 bits for
  hmac(sha256)); ``auth-trunc`` and ``aead`` name theirs;
* ``mark V`` without ``mask`` means mask 0xffffffff; ``add``/``update`` with
  mask 0 send no mark (the SA then matches every packet); ``allocspi``,
  ``get`` and ``delete`` send one only when ``V & M`` is not 0;
* ``output-mark V [mask M]`` (also spelled ``set-mark``): V 0 sends nothing
  (no set-mark), M 0 or absent means 0xffffffff (the kernel's default);
* ``sel``: a plain address is a /32 or /128; an absent side is the wildcard
  of the other side's family (of the SA's family when both are absent);
  ``sport``/``dport`` N set the mask 0xffff unless N is 0 (any);
  ICMP ``type``/``code`` ride in sport/dport with mask 0xffff; a GRE ``key``
  is split over both.  ``sel`` takes every selector word that follows, so it
  must come after the SA's own ``src``, ``dst`` and ``proto``;
* allocspi without ``min``/``max`` asks for 0x100..0x0fffffff.

Deliberate differences, all stricter or wider, never a different meaning:

* a hex key must have an even number of digits (iproute2 silently pads an
  odd one with a leading 0, which hides a lost digit);
* ``src``/``dst``/``proto``/``spi`` may appear anywhere, but only once, and
  a word given twice inside ``sel`` is refused (iproute2 keeps the last);
* one ``limit`` may introduce several pairs (iproute2: one per ``limit``);
* ``flag`` also takes a decimal number; ``proto`` also takes ``50``;
* ``allocspi`` takes ``limit`` (espdp gives the larval SA that lifetime);
* ``get``/``delete`` need ``src`` and ``spi``, as every SA here has both;
* only ESP, transport and tunnel mode (``beet`` parses, then
  :meth:`SAInfo.validate` refuses it), and no ``comp``, ``coa``, ``ctx``,
  ``offload`` or ``pcpu-num``.

Every error is a :class:`~espdp.errors.ConfigError` whose message starts with
``FILE:LINE:`` and names the offending word.  Messages never show key
material: a key is never echoed, nor is any quoted word, nor any word that
looks like one (a long run of hex digits), wherever it was misplaced.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .. import algorithms
from ..errors import ConfigError
from ..sa import (
    ENCAP_TYPES,
    PROTO_ESP,
    SA_EXTRA_FLAGS,
    SA_FLAGS,
    AlgoKey,
    Encap,
    IPAddress,
    IPNetwork,
    Lifetime,
    Mark,
    SAInfo,
    Selector,
)
from ._format import KEY_PLACEHOLDER, format_state
from ._syntax import (
    _ALGO_NAME_LIKE,
    GRE,
    ICMP_PROTOS,
    IP_PROTOS,
    LIMITS,
    PORT_PROTOS,
    SA_NUMBERS,
    Words,
    by_prefix,
    lex,
    logical_lines,
    parse_int,
    read_address,
    read_key,
    read_number,
    read_prefix,
    show,
    take_verb,
    tokenize,
)

__all__ = [
    "KEY_PLACEHOLDER", "SPI_MAX_DEFAULT", "SPI_MIN_DEFAULT", "StateCommand", "format_state",
    "parse_state", "parse_state_file", "tokenize",
]

SPI_MIN_DEFAULT = 0x100  # iproute2's allocspi range when min/max are absent (PF_KEY's)
SPI_MAX_DEFAULT = 0x0FFFFFFF
MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class StateCommand:
    """One ``ip xfrm state`` command.

    * ``verb``: add, update, allocspi, get, delete, list, flush or count
      (``show``/``lst`` are list).
    * ``info``: add/update: the SA, validated.  allocspi: what the larval SA
      is to be (spi 0, no algorithms, not validated).
    * ``spi_min``, ``spi_max``: allocspi's SPI range.
    * ``src``, ``dst``, ``proto``, ``spi``, ``mark``: get/delete: the SA's
      id (addresses).  list: filters, ``src``/``dst`` being prefixes.
      flush: ``proto``, None meaning every protocol.
    * ``mode``, ``reqid``, ``flags``, ``nokeys``: list filters; as in
      iproute2 a state passes ``flags`` when it has any of them.
    * ``where``: ``FILE:LINE`` of the command, for messages; not compared.
    """

    verb: str
    info: Optional[SAInfo] = None
    spi_min: int = SPI_MIN_DEFAULT
    spi_max: int = SPI_MAX_DEFAULT
    src: Optional[Union[IPAddress, IPNetwork]] = None
    dst: Optional[Union[IPAddress, IPNetwork]] = None
    proto: Optional[int] = None
    spi: Optional[int] = None
    mark: Optional[Mark] = None
    mode: Optional[str] = None
    reqid: Optional[int] = None
    flags: frozenset = frozenset()
    nokeys: bool = False
    where: str = field(default="", compare=False)


# ---------------------------------------------------------------- command words

# (word, meaning) in iproute2's order of trial; None: recognised, refused.
_VERB_WORDS = (
    ("add", "add"), ("update", "update"), ("allocspi", "allocspi"), ("delete", "delete"),
    ("deleteall", None), ("delall", None), ("list", "list"), ("show", "list"),
    ("lst", "list"), ("get", "get"), ("flush", "flush"), ("count", "count"), ("help", None),
)


# ---------------------------------------------------------------- word handlers

Handler = Callable[[Words, str, dict], None]


def _once(words: Words, keyword: str, f: dict) -> None:
    seen = f.setdefault("_seen", set())
    if keyword in seen:
        raise words.error(f"'{keyword}' is given twice")
    seen.add(keyword)


def _h_address(words: Words, keyword: str, f: dict) -> None:
    _once(words, keyword, f)
    f[keyword] = read_address(words, keyword)


def _h_prefix(words: Words, keyword: str, f: dict) -> None:
    _once(words, keyword, f)
    f[keyword] = read_prefix(words, keyword)


_XFRM_PROTOS = {"esp": PROTO_ESP, "50": PROTO_ESP}
_OTHER_XFRM_PROTOS = ("ah", "comp", "route2", "hao", "ipsec-any")


def _xfrm_proto(words: Words, keyword: str) -> int:
    word = words.value(keyword, "a protocol")
    if word in _XFRM_PROTOS:
        return _XFRM_PROTOS[word]
    if word in _OTHER_XFRM_PROTOS or parse_int(word) is not None:
        raise words.error(f"'{keyword}': only esp is supported, got {show(word)}")
    raise words.error(f"'{keyword}': expected esp, got {show(word)}")


def _h_proto(words: Words, keyword: str, f: dict) -> None:
    _once(words, keyword, f)
    f["proto"] = _xfrm_proto(words, keyword)


def _h_flush_proto(words: Words, keyword: str, f: dict) -> None:
    _once(words, keyword, f)
    if words.peek() == "ipsec-any":
        words.take()
        f["proto"] = None
    else:
        f["proto"] = _xfrm_proto(words, keyword)


def _set_number(name: str, once: bool = False) -> Handler:
    def handler(words: Words, keyword: str, f: dict) -> None:
        if once:
            _once(words, keyword, f)
        f[name] = read_number(words, keyword)
    return handler


# (word, mode) in iproute2's order of trial, abbreviations allowed; None: refused
_MODE_WORDS = (("transport", "transport"), ("tunnel", "tunnel"), ("ro", None),
               ("in_trigger", None), ("beet", "beet"))


def _h_mode(words: Words, keyword: str, f: dict) -> None:
    word = words.value(keyword, "a mode")
    found = by_prefix(word, _MODE_WORDS)
    if found is None:
        raise words.error(f"'{keyword}': expected transport, tunnel or beet, got {show(word)}")
    if found[1] is None:
        raise words.error(f"'{keyword}': mode {found[0]} (Mobile IPv6) is not supported")
    f["mode"] = found[1]


def _h_dir(words: Words, keyword: str, f: dict) -> None:
    word = words.value(keyword, "in or out")
    if word not in ("in", "out"):
        raise words.error(f"'{keyword}': expected in or out, got {show(word)}")
    f["dir"] = str(word)


def _mark_words(words: Words, keyword: str) -> tuple[int, int]:
    value, mask = read_number(words, keyword), MASK32
    if words.peek() == "mask":
        words.take()
        mask = read_number(words, "mask")
    return value, mask


def _h_mark(words: Words, keyword: str, f: dict) -> None:
    f["mark"] = _mark_words(words, keyword)  # the verb decides when it is sent


def _h_set_mark(words: Words, keyword: str, f: dict) -> None:
    value, mask = _mark_words(words, keyword)
    f["set_mark"] = Mark(value, mask or MASK32) if value else None


def _flag_set(words: Words, keyword: str, table: dict, bits: int) -> tuple[frozenset, bool]:
    """Flag names (as many as follow) or one number; True when it was a number."""
    first = words.value(keyword, "a flag")
    number = parse_int(first)
    if number is not None:
        unknown = number & ~sum(table.values())
        if number >> bits or unknown:
            raise words.error(f"'{keyword}': {show(first)} has unknown flag bits")
        return frozenset(name for name, bit in table.items() if number & bit), True
    if first not in table:
        raise words.error(f"'{keyword}': unknown flag {show(first)} "
                          f"(known: {', '.join(table)})")
    names = {str(first)}
    while words.peek() in table:
        names.add(str(words.take()))
    return frozenset(names), False


def _h_flags(name: str, table: dict, bits: int) -> Handler:
    def handler(words: Words, keyword: str, f: dict) -> None:
        flags, is_number = _flag_set(words, keyword, table, bits)
        # as in iproute2, a number replaces the flags given before, names add to them
        f[name] = flags if is_number else f.get(name, frozenset()) | flags
    return handler


def _h_nokeys(words: Words, keyword: str, f: dict) -> None:
    f["nokeys"] = True


# word -> (algorithm kind, what follows the key, kinds it cannot join)
_ALGO_WORDS = {
    "aead": ("aead", "an ICV length in bits", ("aead", "enc", "auth")),
    "enc": ("enc", None, ("enc", "aead")),
    "auth": ("auth", None, ("auth", "aead")),
    "auth-trunc": ("auth", "a truncation length in bits", ("auth", "aead")),
}


def _h_algo(words: Words, keyword: str, f: dict) -> None:
    kind, bits_what, conflicts = _ALGO_WORDS[keyword]
    taken = [k for k in conflicts if k in f]
    if taken:
        raise words.error(f"'{keyword}': an {taken[0]} algorithm is already given")
    name = words.value(keyword, "an algorithm name")
    try:
        alg = algorithms.lookup(kind, str(name))
    except ConfigError:
        known = ", ".join(a.name for a in algorithms.ALGORITHMS if a.kind == kind)
        raise words.error(f"'{keyword}': unknown algorithm {_show_name(name)} "
                          f"(known: {known})") from None
    key = read_key(words, keyword)
    bits = _read_bits(words, keyword, bits_what) if bits_what else alg.default_icv_bits
    f[kind] = AlgoKey(alg.name, key, bits)


_SHORT_NAME = re.compile(r"[a-z0-9_-]{1,15}")


def _show_name(word: str) -> str:
    """An unknown algorithm name for a message, unless it may be a key: with the
    name left out, the key comes first, and a text key looks like a long word.
    Names with parentheses and short ones (iproute2's aliases: aes, sha256,
    des3_ede ...) are shown."""
    if _ALGO_NAME_LIKE.fullmatch(str(word)) or _SHORT_NAME.fullmatch(str(word)):
        return show(word)
    return "<a word that may be a key, not shown>"


def _read_bits(words: Words, keyword: str, what: str) -> int:
    """The ICV or truncation length after a key.  The word is never shown: when it
    is not a number, key and length were most likely swapped and it is the key
    (a text key is not key-like enough for :func:`show` to hide it)."""
    word = words.value(keyword, what)
    value = parse_int(word)
    if value is None or value >> 32:
        raise words.error(f"'{keyword}': expected {what} after the key, got something "
                          "else (not shown: it may be a key)")
    return value


def _unsupported(reason: str) -> Handler:
    def handler(words: Words, keyword: str, f: dict) -> None:
        raise words.error(f"'{keyword}': {reason} not supported")
    return handler


def _h_limit(words: Words, keyword: str, f: dict) -> None:
    word = words.value(keyword, "a limit")
    if word not in LIMITS:
        raise words.error(f"'{keyword}': unknown limit {show(word)} "
                          f"(known: {', '.join(LIMITS)})")
    limits = f.setdefault("_limits", {})
    while True:
        limits[LIMITS[word]] = read_number(words, word, bits=64)
        if words.peek() not in LIMITS:
            return
        word = words.take()


def _h_encap(words: Words, keyword: str, f: dict) -> None:
    kind = words.value(keyword, "an encapsulation type")
    if kind not in ENCAP_TYPES:
        raise words.error(f"'{keyword}': expected {', '.join(ENCAP_TYPES)}, got {show(kind)}")
    sport = read_number(words, keyword, 16, "a source port")
    dport = read_number(words, keyword, 16, "a destination port")
    oa = read_address(words, keyword, "an original address")
    f["encap"] = Encap(str(kind), sport, dport, None if oa.is_unspecified else oa)


# ---------------------------------------------------------------- sel

def _ip_proto(words: Words, keyword: str) -> int:
    word = words.value(keyword, "a protocol")
    number = IP_PROTOS.get(word.lower(), parse_int(word))
    if number is None or number > 255:
        raise words.error(f"'{keyword}': expected a protocol name or number 0..255, "
                          f"got {show(word)}")
    return number


def _ifindex(words: Words, keyword: str) -> int:
    word = words.value(keyword, "a device")
    if word == "none":
        return 0
    if word.isascii() and word.isdigit() and int(word) < 2**31:
        return int(word)
    try:
        return socket.if_nametoindex(str(word))
    except (OSError, ValueError):
        raise words.error(f"'{keyword}': no device {show(word)}") from None


def _gre_key(words: Words, keyword: str) -> int:
    """A GRE key: a number or, as iproute2 also allows, a dotted quad."""
    if "." not in (words.peek() or ""):
        return read_number(words, keyword, what="a GRE key")
    word = words.peek()
    key = read_address(words, keyword, "a GRE key")
    if key.version != 4:
        raise words.error(f"'{keyword}': expected a number or a dotted quad, got {show(word)}")
    return int(key)


_SEL_VALUES: dict[str, Callable[[Words, str], object]] = {
    "src": read_prefix, "dst": read_prefix, "dev": _ifindex, "proto": _ip_proto,
    "sport": lambda words, kw: read_number(words, kw, 16, "a port"),
    "dport": lambda words, kw: read_number(words, kw, 16, "a port"),
    "type": lambda words, kw: read_number(words, kw, 8, "an ICMP type"),
    "code": lambda words, kw: read_number(words, kw, 8, "an ICMP code"),
    "key": _gre_key,
}
_SEL_NEEDS = (  # words, the protocols they need, and their names
    (("sport", "dport"), PORT_PROTOS, "tcp, udp, sctp, dccp or any"),
    (("type", "code"), ICMP_PROTOS, "icmp, ipv6-icmp or mobility-header"),
    (("key",), (GRE,), "gre"),
)


def _h_selector(words: Words, keyword: str, f: dict) -> None:
    _once(words, keyword, f)
    sel: dict = {}
    while words.peek() in _SEL_VALUES:
        word = str(words.take())
        if word in sel:
            raise words.error(f"'{keyword}': '{word}' is given twice (write 'sel' after "
                              "the SA's own src, dst and proto)")
        sel[word] = _SEL_VALUES[word](words, word)
    if not sel:
        raise words.error(f"'{keyword}': missing selector (src, dst, proto ...)")
    if "src" in sel and "dst" in sel and sel["src"].version != sel["dst"].version:
        raise words.error(f"'{keyword}': 'src' and 'dst' are of different address families")
    for names, protos, proto_names in _SEL_NEEDS:
        given = [name for name in names if name in sel]
        if given and sel.get("proto", 0) not in protos:
            raise words.error(f"'{keyword}': '{given[0]}' needs proto {proto_names}")
    f["_sel"] = sel


def _wildcard(family: int) -> IPNetwork:
    return ipaddress.ip_network("0.0.0.0/0" if family == 4 else "::/0")


def _build_selector(sel: dict, family: int) -> Selector:
    src, dst = sel.get("src"), sel.get("dst")
    if src is None:
        src = _wildcard(family if dst is None else dst.version)
    if dst is None:
        dst = _wildcard(src.version)
    ports = {"sport": 0, "sport_mask": 0, "dport": 0, "dport_mask": 0}
    for word, port in (("sport", "sport"), ("dport", "dport"), ("type", "sport"),
                       ("code", "dport")):
        if word in sel:
            ports[port] = sel[word]
            ports[port + "_mask"] = 0xFFFF if sel[word] or word in ("type", "code") else 0
    if "key" in sel:
        ports = {"sport": sel["key"] >> 16, "sport_mask": 0xFFFF,
                 "dport": sel["key"] & 0xFFFF, "dport_mask": 0xFFFF}
    return Selector(src, dst, sel.get("proto", 0), ifindex=sel.get("dev", 0), **ports)


# ---------------------------------------------------------------- verbs

_ID_WORDS: dict[str, Handler] = {
    "src": _h_address, "dst": _h_address, "proto": _h_proto, "spi": _set_number("spi", True),
}
_SA_WORDS: dict[str, Handler] = {
    **_ID_WORDS,
    **{word: _set_number(name) for word, name in SA_NUMBERS.items()},
    **dict.fromkeys(_ALGO_WORDS, _h_algo),
    "mode": _h_mode, "dir": _h_dir, "mark": _h_mark,
    "output-mark": _h_set_mark, "set-mark": _h_set_mark,
    "flag": _h_flags("flags", SA_FLAGS, 8),
    "extra-flag": _h_flags("extra_flags", SA_EXTRA_FLAGS, 32),
    "sel": _h_selector, "limit": _h_limit, "encap": _h_encap,
    "comp": _unsupported("IPComp is"), "coa": _unsupported("Mobile IPv6 is"),
    "ctx": _unsupported("a security context is"), "offload": _unsupported("offload is"),
    "pcpu-num": _unsupported("a per-CPU SA is"),
}
_ALLOCSPI_WORDS: dict[str, Handler] = {
    **_ID_WORDS, "mode": _h_mode, "mark": _h_mark, "reqid": _SA_WORDS["reqid"],
    "seq": _SA_WORDS["seq"], "dir": _h_dir, "limit": _h_limit,
    "min": _set_number("spi_min", True), "max": _set_number("spi_max", True),
}
_GET_WORDS: dict[str, Handler] = {**_ID_WORDS, "mark": _h_mark}
_LIST_WORDS: dict[str, Handler] = {
    **_ID_WORDS, "src": _h_prefix, "dst": _h_prefix, "mode": _h_mode,
    "reqid": _SA_WORDS["reqid"], "flag": _SA_WORDS["flag"], "nokeys": _h_nokeys,
}
_FLUSH_WORDS: dict[str, Handler] = {"proto": _h_flush_proto}


def parse_command(line: str, where: str, obj: str, verb_words: tuple, verbs: dict) -> Any:
    """The grammar shared by ``ip xfrm state`` and ``ip xfrm policy`` lines:
    the verb (see take_verb), then its words (``verbs[verb] = (handlers,
    finish)``), then ``finish(words, collected, verb)`` builds the command."""
    words = Words(lex(line, where), where)
    if not words:
        raise words.error("empty command")
    verb = take_verb(words, obj, verb_words)
    table, finish = verbs[verb]
    return finish(words, _collect(words, table), verb)


def _collect(words: Words, table: dict[str, Handler]) -> dict:
    f: dict = {}
    while words:
        word = words.take()
        handler = table.get(word)
        if handler is None:
            raise words.error(f"unknown word {show(word)}")
        handler(words, str(word), f)
    return f


def _require(words: Words, f: dict, names: tuple[str, ...]) -> None:
    for name in names:
        if name not in f:
            hint = " (proto esp)" if name == "proto" else ""
            raise words.error(f"'{name}' is required{hint}")
    if "src" in f and "dst" in f and f["src"].version != f["dst"].version:
        raise words.error(f"'dst': {f['dst']} is not of the same address family "
                          f"as 'src' {f['src']}")


def _lookup_mark(f: dict) -> Optional[Mark]:
    """allocspi/get/delete: iproute2 sends the mark only when ``v & m``."""
    value, mask = f.get("mark", (0, 0))
    return Mark(value, mask) if value & mask else None


def _finish_sa(words: Words, f: dict, verb: str) -> StateCommand:
    _require(words, f, ("src", "dst", "proto", "spi"))
    fields = {name: value for name, value in f.items() if not name.startswith("_")}
    value, mask = f.get("mark", (0, 0))
    fields["mark"] = Mark(value, mask) if mask else None  # add/update: sent when the mask is
    if "_sel" in f:
        fields["selector"] = _build_selector(f["_sel"], f["dst"].version)
    if "_limits" in f:
        fields["lifetime"] = Lifetime(**f["_limits"])
    info = SAInfo(**fields)
    try:
        info.validate()
    except ConfigError as exc:
        raise words.error(str(exc)) from None
    return StateCommand(verb, info=info, where=words.where)


def _finish_allocspi(words: Words, f: dict, verb: str) -> StateCommand:
    _require(words, f, ("src", "dst", "proto"))
    if f.get("spi"):
        raise words.error("'spi': allocspi chooses the SPI (give min and max instead)")
    if ("spi_min" in f) != ("spi_max" in f):
        given, missing = ("min", "max") if "spi_min" in f else ("max", "min")
        raise words.error(f"'{given}' needs '{missing}'")
    spi_min = f.get("spi_min", SPI_MIN_DEFAULT)
    spi_max = f.get("spi_max", SPI_MAX_DEFAULT)
    if spi_min > spi_max:
        raise words.error(f"'min' {spi_min:#x} is larger than 'max' {spi_max:#x}")
    info = SAInfo(f["src"], f["dst"], 0, f["proto"], mode=f.get("mode", "transport"),
                  reqid=f.get("reqid", 0), dir=f.get("dir"), seq=f.get("seq", 0),
                  mark=_lookup_mark(f), lifetime=Lifetime(**f.get("_limits", {})))
    return StateCommand(verb, info=info, spi_min=spi_min, spi_max=spi_max, where=words.where)


def _finish_get(words: Words, f: dict, verb: str) -> StateCommand:
    _require(words, f, ("src", "dst", "proto", "spi"))
    return StateCommand(verb, src=f["src"], dst=f["dst"], proto=f["proto"], spi=f["spi"],
                        mark=_lookup_mark(f), where=words.where)


def _finish_list(words: Words, f: dict, verb: str) -> StateCommand:
    _require(words, f, ())
    return StateCommand(verb, src=f.get("src"), dst=f.get("dst"), proto=f.get("proto"),
                        spi=f.get("spi"), mode=f.get("mode"), reqid=f.get("reqid"),
                        flags=f.get("flags", frozenset()), nokeys=f.get("nokeys", False),
                        where=words.where)


def _finish_other(words: Words, f: dict, verb: str) -> StateCommand:
    return StateCommand(verb, proto=f.get("proto"), where=words.where)


_VERBS = {  # verb -> (its words, how the command is built)
    "add": (_SA_WORDS, _finish_sa), "update": (_SA_WORDS, _finish_sa),
    "allocspi": (_ALLOCSPI_WORDS, _finish_allocspi),
    "get": (_GET_WORDS, _finish_get), "delete": (_GET_WORDS, _finish_get),
    "list": (_LIST_WORDS, _finish_list), "flush": (_FLUSH_WORDS, _finish_other),
    "count": ({}, _finish_other),
}


def parse_state(line: str, filename: str = "<xfrm>", lineno: int = 1,
                where: Optional[str] = None) -> StateCommand:
    """Parse one ``[ip] [xfrm] [state] VERB ...`` line.

    iproute2's abbreviations of ``xfrm``, ``state`` and the verb are
    accepted (``ip x s a ...``); a bare ``ip xfrm state`` is ``list``.
    ``filename`` and ``lineno`` (or ``where``, which replaces both) only go
    into error messages and the command's ``where``.
    """
    return parse_command(line, where or f"{filename}:{lineno}", "state", _VERB_WORDS, _VERBS)


def parse_state_file(text: str, filename: str = "<xfrm>") -> list[StateCommand]:
    """Parse a script of ``ip xfrm state`` lines.

    Blank lines and lines whose first non-blank character is ``#`` are
    skipped; a line ending in a backslash continues on the next one (errors
    name the first).  Any other command, ``ip xfrm policy`` included, is a
    :class:`ConfigError`.
    """
    return [parse_state(line, filename, lineno)
            for lineno, line in logical_lines(text) if line.strip()]



"""The vocabulary of ``ip xfrm`` lines: words, numbers, addresses, keys.

Private to :mod:`espdp.xfrm`: the shell-like splitter, a cursor over the
words of one command that builds located errors, the readers of values
(numbers like ``strtoul(s, NULL, 0)``, addresses, prefixes, keys) and the
tables :mod:`~espdp.xfrm.parse` and :mod:`~espdp.xfrm._format` share.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import Optional

from ..errors import ConfigError
from ..sa import IPAddress, IPNetwork


class Word(str):
    """A word of a line; ``quoted`` when any part of it was quoted or escaped."""

    quoted = False


def _word(text: str, quoted: bool) -> Word:
    word = Word(text)
    if quoted:
        word.quoted = True
    return word


_SPACE = " \t\n\r\f\v"
_PLAIN = re.compile(r"[^ \t\n\r\f\v'\"\\]+")   # no blank, quote or backslash
_TOKEN = re.compile(r"(?:[^ \t\n\r\f\v'\"\\]+|'[^']*')+")   # plain runs and '...'
_DQUOTE_ESCAPES = '"\\$`\n'


def _double_quoted(line: str, i: int, buf: list[str], where: str) -> int:
    """Read a "..." body starting at ``i`` into ``buf``; return the index after it."""
    while i < len(line):
        c = line[i]
        if c == '"':
            return i + 1
        if c == "\\" and line[i + 1:i + 2] and line[i + 1] in _DQUOTE_ESCAPES:
            if line[i + 1] != "\n":
                buf.append(line[i + 1])
            i += 2
            continue
        buf.append(c)
        i += 1
    raise ConfigError(f'{where}: unterminated " quote')


def lex(line: str, where: str) -> list[Word]:
    """Split like a POSIX shell: blanks separate, quotes and backslashes escape."""
    if '"' not in line and "\\" not in line and not line.count("'") % 2:
        # The usual line (at most '...' quotes, all closed): a regex does it.
        return [_word(token.replace("'", ""), "'" in token) for token in _TOKEN.findall(line)]
    words: list[Word] = []
    buf: list[str] = []
    in_word = quoted = False
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\" and line[i + 1:i + 2] in ("", "\n"):
            i += 2  # a backslash-newline (or a final backslash) joins lines
            continue
        if c in _SPACE:
            if in_word:
                words.append(_word("".join(buf), quoted))
                buf, in_word, quoted = [], False, False
            i += 1
            continue
        in_word = True
        if c == "'":
            end = line.find("'", i + 1)
            if end < 0:
                raise ConfigError(f"{where}: unterminated ' quote")
            buf.append(line[i + 1:end])
            quoted, i = True, end + 1
        elif c == '"':
            quoted, i = True, _double_quoted(line, i + 1, buf, where)
        elif c == "\\":
            buf.append(line[i + 1])
            quoted, i = True, i + 2
        else:   # a run of plain characters at once (a char at a time was the parse's cost)
            end = _PLAIN.match(line, i).end()
            buf.append(line[i:end])
            i = end
    if in_word:
        words.append(_word("".join(buf), quoted))
    return words


def tokenize(line: str) -> list[str]:
    """Split ``line`` into words as a shell would ("..." and '...' quote).

    ``#`` is not special inside a line.  Raises :class:`ConfigError` on an
    unterminated quote.
    """
    return [str(word) for word in lex(line, "<xfrm>:1")]


_KEYLIKE = re.compile(r"(0[xX])?[0-9a-fA-F]{17,}")
_ALGO_NAME_LIKE = re.compile(r"[a-z0-9_,-]*\([a-z0-9_,()-]*\)")


def show(word: str) -> str:
    """``word`` quoted for a message, or a placeholder when it could be a key."""
    text = str(word)
    if _KEYLIKE.fullmatch(text) or (
            getattr(word, "quoted", False) and not _ALGO_NAME_LIKE.fullmatch(text)):
        return "<a quoted or key-like word, not shown>"
    if len(text) > 40:
        text = text[:37] + "..."
    return f"'{text}'"


class Words:
    """The words of one command with a read position and its location."""

    def __init__(self, words: list[Word], where: str) -> None:
        self._words, self._pos, self.where = words, 0, where

    def __bool__(self) -> bool:
        return self._pos < len(self._words)

    def peek(self) -> Optional[Word]:
        return self._words[self._pos] if self else None

    def take(self) -> Word:
        self._pos += 1
        return self._words[self._pos - 1]

    def value(self, keyword: str, what: str = "a value") -> Word:
        """The word after ``keyword``; an error naming it when there is none."""
        if not self:
            raise self.error(f"'{keyword}': missing {what}")
        return self.take()

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {message}")


_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|[1-9][0-9]*|0[0-7]*")


def parse_int(text: str) -> Optional[int]:
    """``strtoul(text, 0)`` without its leniency (no blanks, no sign)."""
    if not _NUMBER.fullmatch(text):
        return None
    if text[:2] in ("0x", "0X"):
        return int(text[2:], 16)
    return int(text, 8) if text.startswith("0") else int(text)


def read_number(words: Words, keyword: str, bits: int = 32, what: str = "a number") -> int:
    word = words.value(keyword, what)
    value = parse_int(word)
    if value is None:
        raise words.error(f"'{keyword}': expected {what}, got {show(word)}")
    if value >> bits:
        raise words.error(f"'{keyword}': {show(word)} is out of range "
                          f"(at most {(1 << bits) - 1:#x})")
    return value


def read_address(words: Words, keyword: str, what: str = "an address") -> IPAddress:
    word = words.value(keyword, what)
    try:
        return ipaddress.ip_address(str(word))
    except ValueError:
        raise words.error(f"'{keyword}': expected an IPv4 or IPv6 address, "
                          f"got {show(word)}") from None


def read_prefix(words: Words, keyword: str) -> IPNetwork:
    word = words.value(keyword, "a prefix")
    try:
        return ipaddress.ip_network(str(word), strict=False)
    except ValueError:
        raise words.error(f"'{keyword}': expected an address or ADDRESS/LENGTH, "
                          f"got {show(word)}") from None


_HEX = re.compile(r"[0-9a-fA-F]*")


def read_key(words: Words, keyword: str) -> bytes:
    """iproute2's ALGO-KEYMAT: ``0x`` and hex digits, else the word's bytes."""
    word = words.value(keyword, "a key")
    if len(word) > 2 and word.startswith("0x"):
        digits = word[2:]
        if len(digits) % 2 or not _HEX.fullmatch(digits):
            raise words.error(f"'{keyword}': key is not valid hex "
                              "(0x and an even number of hex digits)")
        return bytes.fromhex(digits)
    try:
        return word.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise words.error(f"'{keyword}': key is not valid text") from None


def matches(word: str, full: str) -> bool:
    """iproute2's ``matches()``: ``word`` is a non-empty prefix of ``full``."""
    return bool(word) and full.startswith(word)


def by_prefix(word: str, table: tuple) -> Optional[tuple]:
    """The first ``(full, value)`` of ``table`` that ``word`` abbreviates."""
    return next((entry for entry in table if matches(word, entry[0])), None)


def _continues(line: str) -> bool:
    return (len(line) - len(line.rstrip("\\"))) % 2 == 1


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each command; comment lines are dropped."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        lineno, line = i + 1, lines[i]
        i += 1
        if line.lstrip().startswith("#"):
            continue
        parts = []
        while _continues(line) and i < len(lines):
            parts.append(line[:-1])
            line = lines[i]
            i += 1
        parts.append(line[:-1] if _continues(line) else line)
        yield lineno, "".join(parts)


# ---------------------------------------------------------------- shared tables

# iproute2 word -> SAInfo field, for the plain u32 settings
SA_NUMBERS = {
    "reqid": "reqid", "seq": "seq", "if_id": "if_id", "replay-window": "replay_window",
    "replay-seq": "replay_seq", "replay-oseq": "replay_oseq",
    "replay-seq-hi": "replay_seq_hi", "replay-oseq-hi": "replay_oseq_hi", "tfcpad": "tfcpad",
}

LIMITS = {  # iproute2 word -> Lifetime field
    "time-soft": "soft_add_expires", "time-hard": "hard_add_expires",
    "time-use-soft": "soft_use_expires", "time-use-hard": "hard_use_expires",
    "byte-soft": "soft_bytes", "byte-hard": "hard_bytes",
    "packet-soft": "soft_packets", "packet-hard": "hard_packets",
}

IP_PROTOS = {  # /etc/protocols names iproute2 finds with getprotobyname()
    "any": 0, "ip": 0, "icmp": 1, "igmp": 2, "ipencap": 4, "tcp": 6, "udp": 17, "dccp": 33,
    "ipv6": 41, "gre": 47, "esp": 50, "ah": 51, "ipv6-icmp": 58, "icmpv6": 58, "sctp": 132,
    "mobility-header": 135, "ipv6-mh": 135, "udplite": 136,
}
PROTO_NAMES = {number: name for name, number in reversed(IP_PROTOS.items()) if number}
PORT_PROTOS = (0, 6, 17, 33, 132)
ICMP_PROTOS = (1, 58, 135)
GRE = 47


# (word, meaning) in iproute2's order of trial (ip/xfrm.c).
OBJECT_WORDS = (("state", "state"), ("sa", "state"), ("policy", "policy"), ("monitor", None))


def skip_ip_xfrm(words: Words, obj: str = "") -> Optional[str]:
    """Skip ``[ip] [xfrm]`` (``xfrm`` abbreviated as iproute2 allows); the last skipped."""
    after = None
    if words.peek() == "ip":
        after = words.take()
        if not words or not matches(words.peek(), "xfrm"):
            expected = f"only 'ip xfrm {obj}' commands are supported here" if obj else \
                "expected 'xfrm' after 'ip'"
            raise words.error(f"{show(words.peek() or 'ip')}: {expected}")
    if words and matches(words.peek(), "xfrm"):
        after = words.take()
    return after


def take_verb(words: Words, obj: str, verb_words: tuple) -> str:
    """Skip ``[ip] [xfrm] [OBJ]`` and return the verb (``list`` when none),
    with prefix abbreviations as iproute2 takes them; ``verb_words`` is
    ((word, verb or None for recognised-but-refused), ...) in trial order."""
    only = f"only 'ip xfrm {obj}' commands are supported here"
    after = skip_ip_xfrm(words, obj)
    found = by_prefix(words.peek() or "", OBJECT_WORDS)
    if found is not None:
        word = words.take()
        if found[1] != obj:
            raise words.error(f"'{word}': {only}")
    elif after is not None:
        raise words.error(f"'{after}': expected '{obj}' after it, got "
                          f"{show(words.peek()) if words else 'nothing'}")
    if not words:
        return "list"  # `ip xfrm state` / `ip xfrm policy` list
    word = words.take()
    found = by_prefix(word, verb_words)
    if found is None:
        raise words.error(f"unknown command {show(word)}")
    if found[1] is None:
        full = "" if word == found[0] else f" ({found[0]})"
        raise words.error(f"'{word}'{full}: this command is not supported")
    return found[1]

"""Write an :class:`~espdp.sa.SAInfo` as an ``ip xfrm state add`` line."""

from __future__ import annotations

import shlex
from typing import Optional

from ..sa import PROTO_ESP, SA_EXTRA_FLAGS, SA_FLAGS, Lifetime, Mark, SAInfo, Selector
from ._syntax import GRE, ICMP_PROTOS, LIMITS, PROTO_NAMES, SA_NUMBERS

KEY_PLACEHOLDER = "0x<redacted>"

_DEFAULT_LIFETIME = Lifetime()


def _format_key(key: bytes, show_keys: bool) -> str:
    if not key:
        return "''"
    return "0x" + key.hex() if show_keys else KEY_PLACEHOLDER


def _format_algos(info: SAInfo, show_keys: bool) -> list[str]:
    out = []
    for word, alg in (("aead", info.aead), ("enc", info.enc), ("auth-trunc", info.auth)):
        if alg is not None:
            out += [word, shlex.quote(alg.name), _format_key(alg.key, show_keys)]
            if word != "enc":
                out.append(str(alg.bits))
    return out


def _format_selector(sel: Selector) -> list[str]:
    out = ["sel", "src", str(sel.src), "dst", str(sel.dst)]
    if sel.proto:
        out += ["proto", PROTO_NAMES.get(sel.proto, str(sel.proto))]
    if sel.proto == GRE and (sel.sport_mask or sel.dport_mask):
        out += ["key", str(sel.sport << 16 | sel.dport)]
    else:
        words = ("type", "code") if sel.proto in ICMP_PROTOS else ("sport", "dport")
        for word, port, mask in zip(words, (sel.sport, sel.dport),
                                    (sel.sport_mask, sel.dport_mask), strict=True):
            if mask:
                out += [word, str(port)]
    if sel.ifindex:
        out += ["dev", str(sel.ifindex)]
    return out


def _format_mark(word: str, mark: Optional[Mark]) -> list[str]:
    if mark is None or not mark.mask or (word == "output-mark" and not mark.value):
        return []  # what iproute2 would not send (see format_state)
    return [word, f"{mark.value:#x}", "mask", f"{mark.mask:#x}"]


def format_state(info: SAInfo, show_keys: bool = False) -> str:
    """``info`` as an ``ip xfrm state add`` line (valid shell).

    With ``show_keys`` the keys are written in hex and :func:`parse_state`
    gives back an equal :class:`SAInfo`.  Without it each key is replaced by
    ``0x<redacted>``: the line is for display and does not parse.  Not
    written, because ``ip xfrm`` has no word for them: ``ttl``, a mark whose
    mask is 0 and a set-mark whose value is 0 (both read back as none).
    """
    out = ["ip", "xfrm", "state", "add", "src", str(info.src), "dst", str(info.dst),
           "proto", "esp" if info.proto == PROTO_ESP else str(info.proto),
           "spi", f"{info.spi:#010x}", "mode", info.mode]
    out += [w for word, name in SA_NUMBERS.items() if getattr(info, name)
            for w in (word, str(getattr(info, name)))]
    if info.dir:
        out += ["dir", info.dir]
    out += _format_mark("mark", info.mark)
    for word, flags, table in (("flag", info.flags, SA_FLAGS),
                               ("extra-flag", info.extra_flags, SA_EXTRA_FLAGS)):
        if flags:
            out += [word, *(name for name in table if name in flags)]
    out += _format_algos(info, show_keys)
    out += [w for word, name in LIMITS.items()
            if getattr(info.lifetime, name) != getattr(_DEFAULT_LIFETIME, name)
            for w in ("limit", word, str(getattr(info.lifetime, name)))]
    if info.encap is not None:
        oa = info.encap.oa or ("0.0.0.0" if info.family == 4 else "::")
        out += ["encap", info.encap.type, str(info.encap.sport), str(info.encap.dport), str(oa)]
    out += _format_mark("output-mark", info.set_mark)
    if info.selector is not None:
        out += _format_selector(info.selector)
    return " ".join(out)

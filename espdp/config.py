"""The tunnel's TOML configuration, with keys named after ``ip xfrm`` words.

Each ``[[sa]]`` and ``[[policy]]`` table is turned into the words of an
``ip xfrm state add`` / ``ip xfrm policy add`` line and read by the same
parser as those lines, so a TOML file and an ``ip xfrm`` script mean exactly
the same thing (``replay_window`` is ``replay-window``, ``aead = {name, key,
icv_bits}`` is ``aead NAME KEY BITS``, ...).  ``xfrm = "file"`` adds the
lines of an ``ip xfrm`` script.  Everything is read and checked before
anything is applied: a bad key or value is a :class:`ConfigError` naming the
file, the table and the key, and nothing starts half-configured.

>>> cfg = loads('''
... [tunnel]
... tun = "esp0"
... address = ["10.9.1.1/32"]
... [[sa]]
... src = "192.0.2.1"
... dst = "192.0.2.2"
... spi = 0xc0ffee01
... mode = "tunnel"
... [sa.aead]
... name = "rfc4106(gcm(aes))"
... key = "0x00112233445566778899aabbccddeeff00112233"
... icv_bits = 128
... ''')
>>> cfg.tunnel.tun, cfg.commands[0].info.spi == 0xc0ffee01
('esp0', True)
"""

from __future__ import annotations

import ipaddress
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ConfigError
from .xfrm.parse import StateCommand, parse_state
from .xfrm.policy_parse import PolicyCommand, parse_policy, parse_xfrm_file

Command = Union[StateCommand, PolicyCommand]

_SA_SCALARS = ("src", "dst", "proto", "spi", "reqid", "mode", "dir", "seq", "if_id",
               "replay_window", "replay_seq", "replay_oseq", "replay_seq_hi",
               "replay_oseq_hi", "tfcpad")
_POLICY_SCALARS = ("src", "dst", "proto", "sport", "dport", "type", "code", "dev", "dir",
                   "index", "ptype", "action", "priority", "if_id")
_SEL_KEYS = ("src", "dst", "proto", "sport", "dport", "type", "code", "dev")
_TMPL_KEYS = ("src", "dst", "proto", "spi", "mode", "reqid", "level")
_MARK_KEYS = ("value", "mask")


@dataclass(frozen=True)
class TunnelConfig:
    """The ``[tunnel]`` table."""

    tun: Optional[str] = None
    fd: Optional[int] = None
    address: tuple = ()
    route: tuple = ()
    udp_port: int = 4500
    mtu: Optional[int] = None
    control: Optional[str] = None
    metrics: Optional[str] = None            # HOST:PORT for Prometheus
    path_mtu: int = 1500                     # MTU of the path to the peers
    nat_keepalive: float = 20.0              # seconds; 0: none
    raw_esp: bool = False                    # also raw ESP (protocol 50) sockets
    offload: bool = True                     # TUN with TSO in / coalesced TCP out
    workers: int = 1                         # dataplane threads (espdp.workers)
    inject_marks: bool = True                # marked decrypted packets to the kernel
    address_mode: str = "deprecated"         # IPv6 virtual IPs: deprecated, label, plain
    state_dir: Optional[str] = None          # what was installed, for cleanup after a crash
    ike_forward: Optional[str] = None        # HOST:PORT of a local IKE daemon (espdp.ike)


@dataclass(frozen=True)
class Config:
    tunnel: TunnelConfig = TunnelConfig()
    commands: list = field(default_factory=list)  # StateCommand | PolicyCommand, in order
    cluster: Any = None                           # espdp.cluster.config.ClusterConfig


def _word(value: Any, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{where}: '{key}': expected a string or a number")
    return str(value)


def _table(value: Any, where: str, key: str, allowed: tuple) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}': expected a table")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: '{key}': unknown key '{unknown[0]}' "
                          f"(known: {', '.join(allowed)})")
    return value


def _mark(words: list, name: str, value: Any, where: str) -> None:
    if isinstance(value, dict):
        value = _table(value, where, name, _MARK_KEYS)
        words += [name, _word(value.get("value", 0), where, f"{name}.value")]
        if "mask" in value:
            words += ["mask", _word(value["mask"], where, f"{name}.mask")]
    else:
        words += [name, _word(value, where, name)]


def _flags(words: list, name: str, value: Any, where: str) -> None:
    items = value if isinstance(value, list) else [value]
    words += [name, *(_word(v, where, name) for v in items)]


def _limit(words: list, value: Any, where: str) -> None:
    for k, v in _table(value, where, "limit", tuple(value) if isinstance(value, dict)
                       else ()).items():
        words += ["limit", k.replace("_", "-"), _word(v, where, f"limit.{k}")]


def _algo(words: list, name: str, value: Any, where: str) -> None:
    bits_key = {"aead": "icv_bits", "auth": "trunc_bits"}.get(name)
    v = _table(value, where, name, ("name", "key") + ((bits_key,) if bits_key else ()))
    if "name" not in v or "key" not in v:
        raise ConfigError(f"{where}: '{name}': needs name and key")
    if name == "aead" and bits_key not in v:
        raise ConfigError(f"{where}: 'aead': needs icv_bits")
    word = "auth-trunc" if name == "auth" and bits_key in v else name
    words += [word, _word(v["name"], where, f"{name}.name"), _word(v["key"], where, "key")]
    if bits_key in v:
        words.append(_word(v[bits_key], where, f"{name}.{bits_key}"))


def _sa_words(sa: dict, where: str) -> list:
    # ``sel`` takes every selector word after it, so it goes last.
    words = ["add"] + ([] if "proto" in sa else ["proto", "esp"])
    for key, value in sorted(sa.items(), key=lambda item: item[0] == "sel"):
        if key in _SA_SCALARS:
            words += [key.replace("_", "-") if key != "if_id" else key,
                      _word(value, where, key)]
        elif key in ("mark", "set_mark", "output_mark"):
            _mark(words, key.replace("_", "-"), value, where)
        elif key in ("flag", "flags", "extra_flag", "extra_flags"):
            _flags(words, "extra-flag" if key.startswith("extra") else "flag", value, where)
        elif key in ("aead", "enc", "auth"):
            _algo(words, key, value, where)
        elif key == "sel":
            words.append("sel")
            for k, v in _table(value, where, "sel", _SEL_KEYS).items():
                words += [k, _word(v, where, f"sel.{k}")]
        elif key == "limit":
            _limit(words, value, where)
        elif key == "encap":
            v = _table(value, where, "encap", ("type", "sport", "dport", "oa"))
            words += ["encap", *(_word(v.get(k, d), where, f"encap.{k}") for k, d in
                                 (("type", "espinudp"), ("sport", 4500), ("dport", 4500),
                                  ("oa", "0.0.0.0")))]
        else:
            raise ConfigError(f"{where}: unknown key '{key}'")
    return words


def _policy_words(pol: dict, where: str) -> list:
    words = ["add"]
    for key, value in pol.items():
        if key in _POLICY_SCALARS:
            words += [key, _word(value, where, key)]
        elif key == "mark":
            _mark(words, "mark", value, where)
        elif key in ("flag", "flags"):
            _flags(words, "flag", value, where)
        elif key == "limit":
            _limit(words, value, where)
        elif key != "tmpl":
            raise ConfigError(f"{where}: unknown key '{key}'")
    tmpls = pol.get("tmpl", [])
    for i, tmpl in enumerate(tmpls if isinstance(tmpls, list) else [tmpls]):
        words.append("tmpl")
        t = _table(tmpl, where, f"tmpl[{i + 1}]", _TMPL_KEYS)
        for k, v in {"proto": "esp", **t}.items():
            words += [k, _word(v, where, f"tmpl[{i + 1}].{k}")]
    return words


def _tunnel(table: Any, where: str) -> TunnelConfig:
    t = _table(table, where, "tunnel", tuple(TunnelConfig.__dataclass_fields__) + ("xfrm",))
    t = {k: v for k, v in t.items() if k != "xfrm"}
    for key in ("address", "route"):
        nets = t.get(key, [])
        if not isinstance(nets, list):
            nets = [nets]
        try:
            if not all(isinstance(n, str) for n in nets):
                raise TypeError(key)
            t[key] = tuple(ipaddress.ip_interface(n) for n in nets)
        except (ValueError, TypeError):
            raise ConfigError(f"{where}: '{key}': expected addresses with a prefix, "
                              f"e.g. \"10.9.1.1/32\"") from None
    if t.get("tun") is None and t.get("fd") is None:
        raise ConfigError(f"{where}: needs 'tun' (a device name) or 'fd' (an open TUN fd)")
    for key, check, expected in _TUNNEL_CHECKS:
        if key in t and t[key] is not None and not check(t[key]):
            raise ConfigError(f"{where}: '{key}': expected {expected}")
    return TunnelConfig(**t)


def _integer(lo: int, hi: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


_TUNNEL_CHECKS = (
    ("tun", lambda v: isinstance(v, str) and 0 < len(v) < 16 and "/" not in v,
     "an interface name of at most 15 characters"),
    ("fd", _integer(0, 1 << 20), "an open file descriptor number"),
    ("udp_port", _integer(0, 65535), "a port number 0..65535 (0: any free port)"),
    ("mtu", _integer(576, 65535), "an MTU 576..65535"),
    ("path_mtu", _integer(576, 65535), "an MTU 576..65535"),
    ("nat_keepalive", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
     and 0 <= v <= 86400, "seconds 0..86400 (0: no keepalives)"),
    ("raw_esp", lambda v: isinstance(v, bool), "true or false"),
    ("offload", lambda v: isinstance(v, bool), "true or false"),
    ("workers", _integer(1, 64), "a number of threads 1..64"),
    ("inject_marks", lambda v: isinstance(v, bool), "true or false"),
    ("address_mode", lambda v: v in ("deprecated", "label", "plain"),
     "deprecated, label or plain"),
    ("control", lambda v: isinstance(v, str) and v != "", "a socket path"),
    ("state_dir", lambda v: isinstance(v, str) and v != "", "a directory"),
    ("ike_forward", lambda v: isinstance(v, str) and host_port(v) is not None,
     "HOST:PORT of the local IKE daemon"),
    ("metrics", lambda v: isinstance(v, str) and host_port(v) is not None,
     "HOST:PORT, e.g. \"127.0.0.1:9450\""),
)


def host_port(text: str) -> Optional[tuple[str, int]]:
    """``HOST:PORT`` or ``[V6]:PORT`` as (host, port); None when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return (host or "0.0.0.0", int(port))


def loads(text: str, filename: str = "<config>", base: Optional[Path] = None) -> Config:
    """Read a configuration from TOML text (``base``: where ``xfrm`` paths start)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{filename}: {e}") from None
    except RecursionError:  # tomllib recurses once per level of [[...]] or {{...}}
        raise ConfigError(f"{filename}: arrays or tables nested too deeply") from None
    unknown = sorted(set(doc) - {"tunnel", "sa", "policy", "xfrm", "cluster"})
    if unknown:
        raise ConfigError(f"{filename}: unknown table or key '{unknown[0]}'")
    tunnel = _tunnel(doc["tunnel"], f"{filename}: [tunnel]") if "tunnel" in doc \
        else TunnelConfig()
    commands: list[Command] = []
    xfrm = doc.get("xfrm", doc.get("tunnel", {}).get("xfrm"))
    if xfrm is not None:
        path = (base or Path(".")) / str(xfrm)
        try:
            text = read_text(path)
        except ConfigError as e:
            raise ConfigError(f"{filename}: xfrm = {str(xfrm)!r}: {e}") from None
        commands += parse_xfrm_file(text, str(path))
    for kind, make, parse in (("sa", _sa_words, parse_state),
                              ("policy", _policy_words, parse_policy)):
        entries = doc.get(kind, [])
        if not isinstance(entries, list):
            raise ConfigError(f"{filename}: '{kind}' must be an array of tables [[{kind}]]")
        for i, entry in enumerate(entries):
            where = f"{filename}: [[{kind}]] {i + 1}"
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: expected a table")
            line = shlex.join(make(entry, where))
            commands.append(parse(line, where=where))
    cluster = None
    if "cluster" in doc:
        from .cluster.config import parse_cluster

        cluster = parse_cluster(doc["cluster"], f"{filename}: [cluster]")
    return Config(tunnel, commands, cluster)


def read_text(path: Union[str, Path]) -> str:
    """The text of a configuration file (TOML, ``ip xfrm``), which must be UTF-8;
    a :class:`ConfigError` naming the file (and the line) otherwise.  The
    offending bytes are not shown: the file may hold keys."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text") from None


def load(path: Union[str, Path]) -> Config:
    path = Path(path)
    return loads(read_text(path), str(path), path.parent)


def override(cfg: Config, xfrm: Optional[Union[str, Path]] = None, **flags: Any) -> Config:
    """``cfg`` with command-line flags applied: ``address``/``route`` lists are
    added to the file's, other ``[tunnel]`` keys replace it when not None, and
    the lines of the ``ip xfrm`` script ``xfrm`` are added to its commands."""
    table = {k: getattr(cfg.tunnel, k) for k in TunnelConfig.__dataclass_fields__}
    for key in ("address", "route"):
        table[key] = [str(n) for n in table[key]] + [str(n) for n in flags.pop(key, None) or ()]
    table.update({k: v for k, v in flags.items() if v is not None})
    commands = list(cfg.commands)
    if xfrm is not None:
        commands += parse_xfrm_file(read_text(xfrm), str(xfrm))
    table = {k: v for k, v in table.items() if v is not None}
    return Config(_tunnel(table, "command line"), commands, cfg.cluster)

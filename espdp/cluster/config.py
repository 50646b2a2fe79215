"""The ``[cluster]`` table of the tunnel's TOML configuration.

>>> cfg = parse_cluster({"node": "gw1", "endpoints": ["http://127.0.0.1:2379"],
...                      "addresses": ["192.0.2.1"], "secret_file": "/etc/espdp/c.key",
...                      "segments": 6, "max_rate": 100000, "checkpoint_interval": 0.5},
...                     "tunnel.toml: [cluster]")
>>> cfg.jump, cfg.fence_margin
(100000, 1.25)
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError
from .hash import MAX_SEGMENTS

HASH_MODES = ("addr", "addr+port")
INBOUND_MODES = ("window", "strict")


@dataclass(frozen=True)
class ClusterConfig:
    """One node's view of the cluster (see docs/cluster.md)."""

    node: str                                 # this node's name, unique in the cluster
    endpoints: tuple                          # etcd client URLs, tried in turn
    addresses: tuple                          # the shared outer addresses (v4 and/or v6)
    secret_file: str                          # 32-byte cluster key (hex): seals SAs in etcd
    name: str = "espdp"                       # key prefix in etcd: /espdp/NAME/...
    segments: int = 16
    seed: int = 0
    hash: str = "addr"                        # or "addr+port"
    ipv6_words: int = 1                       # 1: as the kernel's xt_cluster; 4: whole address
    checkpoint_interval: float = 1.0          # seconds between checkpoint batches
    max_rate: int = 1_000_000                 # packets/s one SA may carry, each way
    inbound: str = "window"                   # or "strict"
    lease_ttl: int = 5                        # seconds (etcd leases are whole seconds)
    fence_margin: Optional[float] = None      # default: a quarter of lease_ttl, >= 0.5 s
    timeout: Optional[float] = None           # etcd request timeout; default ttl / 5
    ca_cert: Optional[str] = None             # TLS to etcd (https:// endpoints)
    cert: Optional[str] = None
    key: Optional[str] = None

    def __post_init__(self) -> None:
        if self.fence_margin is None:
            object.__setattr__(self, "fence_margin", max(0.5, self.lease_ttl / 4))
        if self.timeout is None:
            object.__setattr__(self, "timeout", max(0.2, self.lease_ttl / 5))

    @property
    def jump(self) -> int:
        """How far a new owner starts past a checkpoint, and how far the owner may
        run past its last acknowledged one: two intervals at the maximum rate."""
        return max(1024, math.ceil(2 * self.max_rate * self.checkpoint_interval))

    @property
    def keepalive_interval(self) -> float:
        return self.lease_ttl / 4

    @property
    def prefix(self) -> str:
        return f"/espdp/{self.name}/"


def _number(lo: float, hi: float, integer: bool = False):
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int,) if integer else (int, float)):
            return False
        return lo <= v <= hi
    return check


def _strings(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(s, str) and s for s in v)


_CHECKS = {
    "node": (lambda v: isinstance(v, str) and 0 < len(v) <= 64 and "/" not in v,
             "a node name (no '/')"),
    "name": (lambda v: isinstance(v, str) and 0 < len(v) <= 64 and "/" not in v,
             "a cluster name (no '/')"),
    "endpoints": (_strings, "a list of etcd URLs, e.g. [\"http://127.0.0.1:2379\"]"),
    "addresses": (_strings, "the cluster's shared outer addresses, e.g. [\"192.0.2.1\"]"),
    "secret_file": (lambda v: isinstance(v, str) and v != "", "a file path"),
    "segments": (_number(1, MAX_SEGMENTS, True), f"1..{MAX_SEGMENTS} (xt_cluster's limit)"),
    "seed": (_number(0, 0xFFFFFFFF, True), "a 32-bit hash seed"),
    "hash": (lambda v: v in HASH_MODES, " or ".join(HASH_MODES)),
    "ipv6_words": (lambda v: v in (1, 4) and not isinstance(v, bool),
                   "1 (as the kernel's xt_cluster: the first 32 bits) or 4 (the whole address)"),
    "checkpoint_interval": (_number(0.05, 60), "seconds 0.05..60"),
    "max_rate": (_number(1, 1 << 30, True), "packets per second, 1..2^30"),
    "inbound": (lambda v: v in INBOUND_MODES, " or ".join(INBOUND_MODES)),
    "lease_ttl": (_number(2, 600, True), "whole seconds 2..600"),
    "fence_margin": (_number(0.1, 300), "seconds"),
    "timeout": (_number(0.05, 60), "seconds"),
    "ca_cert": (lambda v: isinstance(v, str) and v != "", "a file path"),
    "cert": (lambda v: isinstance(v, str) and v != "", "a file path"),
    "key": (lambda v: isinstance(v, str) and v != "", "a file path"),
}
_REQUIRED = ("node", "endpoints", "addresses", "secret_file")


def parse_cluster(table: Any, where: str) -> ClusterConfig:
    """A :class:`ClusterConfig` from the ``[cluster]`` TOML table; ConfigError naming
    ``where`` and the key when something is wrong."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(table) - set(_CHECKS))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(_CHECKS)})")
    for key in _REQUIRED:
        if key not in table:
            raise ConfigError(f"{where}: needs '{key}'")
    for key, value in table.items():
        check, expected = _CHECKS[key]
        if not check(value):
            raise ConfigError(f"{where}: '{key}': expected {expected}")
    values = dict(table)
    try:
        values["addresses"] = tuple(ipaddress.ip_address(a) for a in table["addresses"])
    except ValueError:
        raise ConfigError(f"{where}: 'addresses': expected IP addresses") from None
    values["endpoints"] = tuple(e.rstrip("/") for e in table["endpoints"])
    for e in values["endpoints"]:
        if not e.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: 'endpoints': {e!r} is not an http:// or https:// URL")
    cfg = ClusterConfig(**values)
    if cfg.fence_margin >= cfg.lease_ttl - cfg.keepalive_interval:
        raise ConfigError(f"{where}: 'fence_margin' must leave room for a renewal "
                          f"(below {cfg.lease_ttl - cfg.keepalive_interval:g} s)")
    return cfg

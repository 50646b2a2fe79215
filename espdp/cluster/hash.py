"""Segments: which cluster node handles a peer, computed as Linux xt_cluster does.

Every node sees every packet for the cluster address; each handles only the
*segments* it owns.  A packet's segment is a hash of the peer's outer address,
exactly the hash of ``iptables -m cluster`` (``net/netfilter/xt_cluster.c``),
so an operator can split other traffic (IKE, say) the same way::

    segment = reciprocal_scale(jhash(address), total)     # (hash * total) >> 32

* IPv4: ``jhash_1word(saddr, seed)`` where ``saddr`` is the 32-bit word *as
  read from the packet* (the CPU's byte order: on x86 the address bytes read
  little-endian);
* IPv6: ``jhash2(saddr, NF_CT_TUPLE_L3SIZE / sizeof(__u32), seed)``.  Read
  carefully, that is **one** word, the first 32 bits of the address:
  ``NF_CT_TUPLE_L3SIZE`` is ``ARRAY_SIZE(nf_inet_addr.all)``, already a count
  of words (4), not of bytes.  The running kernel does so (the namespace test
  checks it against ``-m cluster``), so ``ipv6_words = 1`` is the default.
  ``ipv6_words = 4`` hashes the whole address with ``jhash2(..., 4, seed)``,
  what the code meant and what issue 7 describes: better spread when many
  peers share a /32, but then ``-m cluster`` splits IPv6 otherwise;
* jhash is Bob Jenkins' lookup3 with the initial values of Linux 4.1 and
  later (``JHASH_INITVAL + (words << 2) + seed``).

Segments are 0-based; ``-m cluster --cluster-local-node`` is 1-based, so
segment ``s`` is ``--cluster-local-node s+1`` (or bit ``s`` of
``--cluster-local-nodemask``) with ``--cluster-total-nodes total
--cluster-hash-seed seed``.  xt_cluster matches on at most 32 nodes, hence
at most 32 segments.

``hash = "addr+port"`` (many peers behind one NAT) is an espdp extension
with no xt_cluster equivalent: ``jhash2`` over the address words followed by
the UDP source port as one more word (0 for raw ESP).

>>> import ipaddress
>>> segment_of(ipaddress.ip_address("192.0.2.7"), 6, 0) in range(6)
True
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Optional, Union

__all__ = ["MAX_SEGMENTS", "PeerSegments", "address_words", "jhash2", "jhash_1word",
           "reciprocal_scale", "segment_of"]

JHASH_INITVAL = 0xDEADBEEF
MAX_SEGMENTS = 32      # XT_CLUSTER_NODES_MAX
_M = 0xFFFFFFFF
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _M; a ^= _rol(c, 4); c = (c + b) & _M      # noqa: E702
    b = (b - a) & _M; b ^= _rol(a, 6); a = (a + c) & _M      # noqa: E702
    c = (c - b) & _M; c ^= _rol(b, 8); b = (b + a) & _M      # noqa: E702
    a = (a - c) & _M; a ^= _rol(c, 16); c = (c + b) & _M     # noqa: E702
    b = (b - a) & _M; b ^= _rol(a, 19); a = (a + c) & _M     # noqa: E702
    c = (c - b) & _M; c ^= _rol(b, 4); b = (b + a) & _M      # noqa: E702
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b; c = (c - _rol(b, 14)) & _M     # noqa: E702
    a ^= c; a = (a - _rol(c, 11)) & _M     # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & _M     # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & _M     # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & _M      # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & _M     # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & _M     # noqa: E702
    return c


def jhash2(words: tuple[int, ...], initval: int) -> int:
    """The kernel's ``jhash2(k, length, initval)`` over 32-bit words."""
    length = len(words)
    a = b = c = (JHASH_INITVAL + (length << 2) + initval) & _M
    k = 0
    while length > 3:
        a = (a + words[k]) & _M
        b = (b + words[k + 1]) & _M
        c = (c + words[k + 2]) & _M
        a, b, c = _mix(a, b, c)
        length -= 3
        k += 3
    if length == 0:
        return c
    if length == 3:
        c = (c + words[k + 2]) & _M
    if length >= 2:
        b = (b + words[k + 1]) & _M
    a = (a + words[k]) & _M
    return _final(a, b, c)


def jhash_1word(a: int, initval: int) -> int:
    """The kernel's ``jhash_1word`` (4.1+: ``initval + JHASH_INITVAL + (1 << 2)``)."""
    init = (initval + JHASH_INITVAL + 4) & _M
    return _final((a + init) & _M, init, init)


def reciprocal_scale(value: int, total: int) -> int:
    """``(value * total) >> 32``: a 32-bit hash scaled into ``range(total)``."""
    return (value * total) >> 32


def address_words(raw: bytes) -> tuple[int, ...]:
    """The 32-bit words of an address as the kernel reads them from the packet."""
    return tuple(int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, len(raw), 4))


def segment_of(address: IPAddress, total: int, seed: int, port: Optional[int] = None,
               ipv6_words: int = 1) -> int:
    """The segment of a peer at ``address`` (and UDP ``port`` in addr+port mode)."""
    words = address_words(address.packed)[:ipv6_words]
    if port is not None:
        words += (port & 0xFFFF,)
    h = jhash_1word(words[0], seed) if len(words) == 1 else jhash2(words, seed)
    return reciprocal_scale(h, total)


class PeerSegments:
    """Segment per peer, cached by the raw address bytes (and port) of packets.

    ``with_port``: addr+port mode; ``ipv6_words``: 1 (as the kernel) or 4.  The
    cache is bounded; when full it starts afresh (a hash is a few microseconds).
    """

    def __init__(self, total: int, seed: int, with_port: bool = False,
                 ipv6_words: int = 1, limit: int = 65536) -> None:
        self.total, self.seed, self.with_port = total, seed & _M, with_port
        self.ipv6_words = ipv6_words
        self._cache: dict[bytes, int] = {}
        self._limit = limit

    def of_raw(self, raw: bytes, port: int = 0) -> int:
        """Segment of the address bytes ``raw`` (4 or 16) and ``port``."""
        key = raw + port.to_bytes(2, "big") if self.with_port else raw
        seg = self._cache.get(key)
        if seg is None:
            if len(self._cache) >= self._limit:
                self._cache.clear()
            words = address_words(raw)[:self.ipv6_words]
            if self.with_port:
                words += (port,)
            h = jhash_1word(words[0], self.seed) if len(words) == 1 \
                else jhash2(words, self.seed)
            seg = self._cache[key] = reciprocal_scale(h, self.total)
        return seg

    def of(self, address: IPAddress, port: int = 0) -> int:
        return self.of_raw(address.packed, port)

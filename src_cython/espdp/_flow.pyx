# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Flow decision caches: the policy decisions of the dataplane, kept in C
across batches.

A *key* is the exact set of bytes of a packet that decides its flow, the same
bytes :func:`espdp.xfrm.policy.flow_key` returns (:func:`key_of` is the C
function made callable from Python, for the tests): for IPv4 the protocol and
both addresses (with an ``f`` prefix for a later fragment, which has no
ports), then the ports or the ICMP type and code; for IPv6 without extension
headers the next header, both addresses, then the ports or type and code.
Packets with no key (IPv6 extension headers 0/43/60, packets too short) are
never cached: they always go the slow way.  Two packets with the same key
have the same flow, so they get the same policy decision.

:class:`FlowCache` keeps outbound decisions: key -> (engine SA index, the
longest packet the decision holds for).  :class:`InboundCache` keeps inbound
policy checks that passed: key = (engine SA index, mark, flow key).

Invalidation is by *generation*, and it is exact: every entry carries the
generation it was made in and a lookup only takes an entry of the caller's
current generation.  The owner of the SAD/SPD bumps its generation on every
change of either (an SA added, removed, updated, killed; a policy added,
removed, changed), so no decision made under an older SAD/SPD is ever used.
A :class:`FlowCache` hit is also checked against the SA table (the SA index
must name a live SA: present and not killed) and against the packet length
(``length <= max_len``).

Each cache is a fixed-size open-addressing table (capacity a power of two)
with a probe window of 8 slots from the key's hash; nothing is allocated per
packet.  Entries are never deleted one by one, so a lookup stops at the first
empty slot.  An insert reuses the key's own slot, or the first empty slot of
the window, or else overwrites an entry of an older generation, or else the
entry inserted longest ago (an eviction).  A full key comparison follows every
hash match: a collision costs a miss or an eviction, never a wrong decision.

The hash is SipHash-1-3 keyed with a random 128-bit secret drawn from
``os.urandom`` when the cache is made: a remote sender, who chooses the
addresses and ports of what it sends, cannot compute which keys share a probe
window and so cannot aim collisions to thrash the cache.

The caches are not thread-safe: like the engine's objects, their owner uses
them from one thread, between or around batches.
"""

import os

from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, memset

from cpython.bytes cimport PyBytes_FromStringAndSize

from espdp._atomic cimport pthread_rwlock_rdlock, pthread_rwlock_unlock
from espdp._engine cimport PacketBatch, SATable
from espdp._esp cimport V_OK, sa_core

from espdp.errors import ConfigError

cdef enum:
    KEY_MAX = 48             # longest key: 8 (SA index, mark) + 37 (IPv6 with ports)
    PROBES = 8               # the probe window
    F_ACCEPTED = 0x80        # flags bit; 1 and 2 are F_MAPPING and F_SOFT_EXPIRED

FLAG_ACCEPTED = F_ACCEPTED
KEY_MAX_LEN = KEY_MAX
PROBE_WINDOW = PROBES


cdef struct entry:
    uint64_t hash
    uint64_t generation
    uint64_t stamp           # insert order, for the eviction choice
    int32_t sa_index
    uint32_t max_len
    uint8_t used
    uint8_t klen
    uint8_t key[KEY_MAX]


# ---------------------------------------------------------------- the key

cdef inline bint _port_proto(uint8_t proto) noexcept nogil:
    return proto == 0 or proto == 6 or proto == 17 or proto == 33 or proto == 132


cdef inline bint _icmp_proto(uint8_t proto) noexcept nogil:
    return proto == 1 or proto == 58 or proto == 135


cdef int flow_key_c(const uint8_t *p, uint32_t n, uint8_t *out) noexcept nogil:
    """Write the flow key of the packet p[0:n] to out (KEY_MAX bytes); return
    its length, or -1 when the packet has none.  Mirrors policy.flow_key."""
    cdef uint32_t off
    cdef uint8_t proto
    cdef int k
    if n == 0:
        return -1
    if p[0] >> 4 == 4 and n >= 20:
        off = (p[0] & 0x0F) * 4
        proto = p[9]
        if (p[6] & 0x1F) or p[7]:        # a later fragment: no ports
            out[0] = 0x66                # b"f"
            out[1] = proto
            memcpy(out + 2, p + 12, 8)
            return 10
        out[0] = proto
        memcpy(out + 1, p + 12, 8)
        k = 9
    elif p[0] >> 4 == 6 and n >= 40:
        off = 40
        proto = p[6]
        if proto == 0 or proto == 43 or proto == 60:
            return -1
        out[0] = proto
        memcpy(out + 1, p + 8, 32)
        k = 33
    else:
        return -1
    if _port_proto(proto):
        if off + 4 > n:
            return -1
        memcpy(out + k, p + off, 4)
        return k + 4
    if _icmp_proto(proto):
        if off + 2 > n:
            return -1
        memcpy(out + k, p + off, 2)
        return k + 2
    return k


def key_of(const uint8_t[::1] packet):
    """The C flow key of a packet (bytes), or None: equal to policy.flow_key."""
    cdef uint8_t out[KEY_MAX]
    cdef uint32_t n = packet.shape[0]
    cdef int k = flow_key_c(&packet[0] if n else NULL, n, out)
    if k < 0:
        return None
    return PyBytes_FromStringAndSize(<char *> out, k)


# ---------------------------------------------------------------- the hash

cdef inline uint64_t _rotl(uint64_t x, int b) noexcept nogil:
    return (x << b) | (x >> (64 - b))


cdef inline uint64_t _ld64(const uint8_t *p) noexcept nogil:
    return (<uint64_t> p[0] | (<uint64_t> p[1] << 8) | (<uint64_t> p[2] << 16)
            | (<uint64_t> p[3] << 24) | (<uint64_t> p[4] << 32) | (<uint64_t> p[5] << 40)
            | (<uint64_t> p[6] << 48) | (<uint64_t> p[7] << 56))


cdef inline void _sipround(uint64_t *v) noexcept nogil:
    v[0] += v[1]
    v[1] = _rotl(v[1], 13)
    v[1] ^= v[0]
    v[0] = _rotl(v[0], 32)
    v[2] += v[3]
    v[3] = _rotl(v[3], 16)
    v[3] ^= v[2]
    v[0] += v[3]
    v[3] = _rotl(v[3], 21)
    v[3] ^= v[0]
    v[2] += v[1]
    v[1] = _rotl(v[1], 17)
    v[1] ^= v[2]
    v[2] = _rotl(v[2], 32)


cdef uint64_t siphash13(uint64_t k0, uint64_t k1, const uint8_t *p,
                        int n) noexcept nogil:
    """SipHash-1-3 of p[0:n] under the key (k0, k1)."""
    cdef uint64_t v[4]
    cdef uint64_t m, b
    cdef int i, left
    v[0] = k0 ^ 0x736f6d6570736575ULL
    v[1] = k1 ^ 0x646f72616e646f6dULL
    v[2] = k0 ^ 0x6c7967656e657261ULL
    v[3] = k1 ^ 0x7465646279746573ULL
    i = 0
    while i + 8 <= n:
        m = _ld64(p + i)
        v[3] ^= m
        _sipround(v)
        v[0] ^= m
        i += 8
    b = (<uint64_t> n) << 56
    left = n - i
    while left > 0:
        left -= 1
        b |= (<uint64_t> p[i + left]) << (8 * left)
    v[3] ^= b
    _sipround(v)
    v[0] ^= b
    v[2] ^= 0xFF
    _sipround(v)
    _sipround(v)
    _sipround(v)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


# ---------------------------------------------------------------- the table

cdef class _Cache:
    """The open-addressing table both caches share."""

    cdef entry *entries
    cdef uint32_t mask
    cdef uint64_t k0, k1
    cdef uint64_t stamp
    cdef Py_ssize_t used
    cdef uint64_t hits, misses, inserts, evictions
    cdef int32_t *miss_buf           # miss slot indexes of the last batch
    cdef int miss_cap

    def __cinit__(self, uint32_t capacity=4096):
        if capacity < PROBES or capacity & (capacity - 1) or capacity > (1 << 24):
            raise ConfigError(f"{type(self).__name__}: capacity must be a power of two "
                              f"between {PROBES} and {1 << 24}, not {capacity}")
        self.entries = <entry *> calloc(capacity, sizeof(entry))
        if self.entries == NULL:
            raise MemoryError()
        self.mask = capacity - 1
        seed = os.urandom(16)
        self.k0 = int.from_bytes(seed[:8], "little")
        self.k1 = int.from_bytes(seed[8:], "little")

    def __dealloc__(self):
        free(self.entries)
        free(self.miss_buf)

    @property
    def capacity(self):
        return self.mask + 1

    def __len__(self):
        return self.used

    def clear(self):
        """Forget every entry (the counters stay)."""
        memset(self.entries, 0, (<size_t> self.mask + 1) * sizeof(entry))
        self.used = 0

    def stats(self):
        return {"hits": self.hits, "misses": self.misses, "inserts": self.inserts,
                "evictions": self.evictions, "entries": self.used,
                "capacity": self.mask + 1}

    cdef int _reserve(self, int n) except -1:
        cdef int32_t *p
        n = max(n, 1)
        if n > self.miss_cap:
            p = <int32_t *> realloc(self.miss_buf, <size_t> n * sizeof(int32_t))
            if p == NULL:
                raise MemoryError()
            self.miss_buf, self.miss_cap = p, n
        return 0

    cdef list _misses(self, int n):
        cdef int j
        return [self.miss_buf[j] for j in range(n)]

    cdef entry *find(self, const uint8_t *key, int klen, uint64_t h) noexcept nogil:
        cdef int j
        cdef uint32_t s
        cdef entry *e
        for j in range(PROBES):
            s = (<uint32_t> h + j) & self.mask
            e = &self.entries[s]
            if not e.used:
                return NULL              # entries are never removed one by one
            if e.hash == h and e.klen == klen and memcmp(e.key, key, klen) == 0:
                return e
        return NULL

    cdef entry *store(self, const uint8_t *key, int klen, uint64_t h,
                      uint64_t generation) noexcept nogil:
        """The entry for key (its old one, or a free or evicted slot), filled
        with the key, hash and generation; the caller writes the payload."""
        cdef int j
        cdef uint32_t s
        cdef entry *e
        cdef entry *victim = NULL
        cdef entry *stale = NULL
        for j in range(PROBES):
            s = (<uint32_t> h + j) & self.mask
            e = &self.entries[s]
            if not e.used:
                self.used += 1
                break
            if e.hash == h and e.klen == klen and memcmp(e.key, key, klen) == 0:
                break
            if e.generation != generation:
                if stale == NULL:
                    stale = e
            elif victim == NULL or e.stamp < victim.stamp:
                victim = e
        else:
            e = stale if stale != NULL else victim
            self.evictions += 1
        self.inserts += 1
        self.stamp += 1
        e.used = 1
        e.hash = h
        e.generation = generation
        e.stamp = self.stamp
        e.klen = klen
        memcpy(e.key, key, klen)
        return e


cdef class FlowCache(_Cache):
    """Outbound decisions: flow key -> (engine SA index, max packet length)."""

    cdef int lookup_batch(self, PacketBatch batch, SATable table,
                          uint64_t generation) noexcept nogil:
        cdef int i, klen, nmiss = 0
        cdef int32_t idx
        cdef uint8_t key[KEY_MAX]
        cdef uint64_t h
        cdef entry *e
        cdef sa_core *core
        for i in range(batch.count):
            klen = flow_key_c(batch.buf + <size_t> i * batch.slot_size + batch.off_p[i],
                              batch.len_p[i], key)
            if klen >= 0:
                h = siphash13(self.k0, self.k1, key, klen)
                e = self.find(key, klen, h)
                if e != NULL and e.generation == generation and batch.len_p[i] <= e.max_len:
                    idx = e.sa_index
                    if 0 <= idx < table.ncores:
                        core = table.cores[idx]
                        if core != NULL and not core.dead:
                            batch.sa_p[i] = idx
                            self.hits += 1
                            continue
            batch.sa_p[i] = -1
            self.misses += 1
            self.miss_buf[nmiss] = i
            nmiss += 1
        return nmiss

    def classify(self, PacketBatch batch, SATable table, uint64_t generation):
        """Set ``batch.sa[i]`` for every packet whose flow has a valid entry
        (this generation, a live SA, the packet no longer than ``max_len``),
        -1 for the others; return the indexes of the others (the misses)."""
        cdef int nmiss
        self._reserve(batch.count)
        with nogil:
            pthread_rwlock_rdlock(&table.lock)   # the SA array may move under add()
            nmiss = self.lookup_batch(batch, table, generation)
            pthread_rwlock_unlock(&table.lock)
        return self._misses(nmiss)

    def insert(self, PacketBatch batch, int i, int32_t sa_index, uint32_t max_len,
               uint64_t generation):
        """Remember that the flow of slot i goes to ``sa_index`` for packets up
        to ``max_len`` bytes, in ``generation``; False when it has no key."""
        cdef uint8_t key[KEY_MAX]
        cdef int klen
        cdef entry *e
        if not 0 <= i < batch.count:
            raise IndexError(i)
        klen = flow_key_c(batch.buf + <size_t> i * batch.slot_size + batch.off_p[i],
                          batch.len_p[i], key)
        if klen < 0:
            return False
        e = self.store(key, klen, siphash13(self.k0, self.k1, key, klen), generation)
        e.sa_index = sa_index
        e.max_len = max_len
        return True


cdef inline int _inbound_key(PacketBatch batch, int i, uint8_t *key) noexcept nogil:
    """(SA index, mark, flow key) of slot i, or -1."""
    cdef int32_t idx = batch.sa_p[i]
    cdef uint32_t mark = batch.mark_p[i]
    cdef int klen
    if idx < 0:
        return -1
    klen = flow_key_c(batch.buf + <size_t> i * batch.slot_size + batch.off_p[i],
                      batch.len_p[i], key + 8)
    if klen < 0:
        return -1
    memcpy(key, &idx, 4)
    memcpy(key + 4, &mark, 4)
    return klen + 8


cdef class InboundCache(_Cache):
    """Inbound policy checks that passed: (engine SA index, mark, flow key)."""

    cdef int check_batch(self, PacketBatch batch, uint64_t generation) noexcept nogil:
        cdef int i, klen, nmiss = 0
        cdef uint8_t key[KEY_MAX]
        cdef entry *e
        for i in range(batch.count):
            batch.flags_p[i] &= ~F_ACCEPTED
            if batch.verdict_p[i] != V_OK:
                continue
            klen = _inbound_key(batch, i, key)
            if klen >= 0:
                e = self.find(key, klen, siphash13(self.k0, self.k1, key, klen))
                if e != NULL and e.generation == generation:
                    batch.flags_p[i] |= F_ACCEPTED
                    self.hits += 1
                    continue
            self.misses += 1
            self.miss_buf[nmiss] = i
            nmiss += 1
        return nmiss

    def check(self, PacketBatch batch, uint64_t generation):
        """For every decrypted packet (verdict ok) whose (SA, mark, flow) was
        accepted in this generation, set :data:`FLAG_ACCEPTED` in
        ``batch.flags[i]``; return the indexes of the other decrypted packets
        (the ones the policy must check).  Slots not ok are in neither set."""
        cdef int nmiss
        self._reserve(batch.count)
        with nogil:
            nmiss = self.check_batch(batch, generation)
        return self._misses(nmiss)

    def insert(self, PacketBatch batch, int i, uint64_t generation):
        """Remember that slot i's (SA, mark, flow) passed the inbound policy
        check in ``generation``; False when it has no key (or no SA)."""
        cdef uint8_t key[KEY_MAX]
        cdef int klen
        cdef entry *e
        if not 0 <= i < batch.count:
            raise IndexError(i)
        klen = _inbound_key(batch, i, key)
        if klen < 0:
            return False
        e = self.store(key, klen, siphash13(self.k0, self.k1, key, klen), generation)
        e.sa_index = batch.sa_p[i]
        e.max_len = 0
        return True

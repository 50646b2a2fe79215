# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The engine's objects: an SA with its crypto contexts, a table of SAs with
an SPI hash for inbound lookup, and a batch of packet slots.

Batches are processed with the GIL released and no Python object created
per packet: per-packet results land in the batch's arrays (numpy views of
C-contiguous buffers).  The objects are not thread-safe: whoever owns a
table changes it between batches, not during one.
"""

import ipaddress

import numpy as np

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, memset

from espdp._atomic cimport (PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP, espdp_add64,
                            espdp_load64, espdp_lock, espdp_store64, espdp_unlock,
                            pthread_rwlock_destroy, pthread_rwlock_init, pthread_rwlock_rdlock,
                            pthread_rwlock_unlock, pthread_rwlock_wrlock, pthread_rwlockattr_destroy,
                            pthread_rwlockattr_init, pthread_rwlockattr_setkind_np,
                            pthread_rwlockattr_t)
from espdp._crypto cimport AUTH_NONE, transform, transform_clone, transform_free, transform_init
from espdp._esp cimport *
from espdp._inet cimport rd32
from espdp._replay cimport replay_export, replay_free, replay_import, replay_init

from espdp import algorithms
from espdp.errors import ConfigError

VERDICTS = (
    "ok", "dummy", "keepalive", "non_esp", "not_esp", "malformed", "fragment",
    "no_sa", "encap_mismatch", "limit", "seq_zero", "replay", "replay_window",
    "integrity", "bad_padding", "bad_inner", "ecn_drop", "seq_overflow", "too_big",
    "crypto_error", "wrong_dir",
)
assert len(VERDICTS) == N_VERDICTS
FLAG_MAPPING = F_MAPPING
FLAG_SOFT_EXPIRED = F_SOFT_EXPIRED

cdef enum:
    EMPTY = -1
    GONE = -2


cdef void _address(uint8_t *out, object address):
    cdef bytes packed = address.packed
    memset(out, 0, 16)
    memcpy(out, <const char *> packed, len(packed))


cdef int _init_crypto(sa_core *core, object info) except -1:
    if info.aead is not None:
        alg = algorithms.lookup("aead", info.aead.name)
        transform_init(&core.xf, alg.engine_id, info.aead.key, info.aead.bits // 8,
                       AUTH_NONE, b"")
    else:
        enc = algorithms.lookup("enc", info.enc.name)
        auth = algorithms.lookup("auth", info.auth.name)
        transform_init(&core.xf, enc.engine_id, info.enc.key, info.auth.bits // 8,
                       auth.engine_id, info.auth.key)
    return 0


cdef class SA:
    """One SA of the engine, built from an :class:`espdp.sa.SAInfo`.

    >>> sa = SA(info)                          # doctest: +SKIP
    >>> result = sa.encrypt_packet(ip_packet)  # doctest: +SKIP
    """

    def __cinit__(self, info):
        info.validate()
        self.info = info
        self.index = -1
        cdef sa_core *c = &self.core
        memset(c, 0, sizeof(sa_core))
        c.spi = info.spi
        c.family = info.family
        _address(c.src, info.src)
        _address(c.dst, info.dst)
        c.tunnel = info.mode == "tunnel"
        c.dir = {None: DIR_ANY, "in": DIR_IN, "out": DIR_OUT}[info.dir]
        from espdp.sa import SA_EXTRA_FLAGS, SA_FLAGS
        c.flags = sum(SA_FLAGS[f] for f in info.flags)
        c.extra_flags = sum(SA_EXTRA_FLAGS[f] for f in info.extra_flags)
        c.esn = info.esn
        if info.encap is not None:
            c.encap = True
            c.sport = info.encap.sport
            c.dport = info.encap.dport
        if info.mark is not None:
            c.has_mark = True
            c.mark_v = info.mark.value
            c.mark_m = info.mark.mask
        if info.set_mark is not None:
            c.has_set_mark = True
            c.set_mark_v = info.set_mark.value
            c.set_mark_m = info.set_mark.mask
        c.tfcpad = info.tfcpad
        c.ttl = info.ttl
        c.oseq = (<uint64_t> info.replay_oseq_hi << 32 if info.esn else 0) | info.replay_oseq
        top = ((<uint64_t> info.replay_seq_hi << 32) if info.esn else 0) | info.replay_seq
        replay_init(&c.replay, info.replay_window, info.esn, top)
        _init_crypto(c, info)
        self._set_mutable(info)

    cdef _set_mutable(self, info):
        # What UPDSA and MIGRATE may change on a valid SA: addresses, encap,
        # set-mark and lifetimes -- never keys, algorithms or replay state.
        cdef sa_core *c = &self.core
        _address(c.src, info.src)
        _address(c.dst, info.dst)
        c.encap = info.encap is not None
        c.sport = info.encap.sport if c.encap else 0
        c.dport = info.encap.dport if c.encap else 0
        c.has_set_mark = info.set_mark is not None
        c.set_mark_v = info.set_mark.value if c.has_set_mark else 0
        c.set_mark_m = info.set_mark.mask if c.has_set_mark else 0
        lft = info.lifetime
        c.soft_bytes, c.hard_bytes = lft.soft_bytes, lft.hard_bytes
        c.soft_packets, c.hard_packets = lft.soft_packets, lft.hard_packets

    cdef int _set_workers(self, int n) except -1:
        """Crypto contexts for workers 1..n-1 (worker 0 has ``core.xf``); never
        fewer than before, since a worker may be using them."""
        cdef transform *w
        cdef int k, have = self.core.nwxf
        if n - 1 <= have:
            return 0
        w = <transform *> realloc(self.core.wxf, (n - 1) * sizeof(transform))
        if w == NULL:
            raise MemoryError()
        self.core.wxf = w
        for k in range(have, n - 1):
            transform_clone(&w[k], &self.core.xf)
            self.core.nwxf = k + 1
        return 0

    def __dealloc__(self):
        cdef int k
        transform_free(&self.core.xf)
        for k in range(self.core.nwxf):
            transform_free(&self.core.wxf[k])
        free(self.core.wxf)
        replay_free(&self.core.replay)

    def __repr__(self):
        return (f"<SA spi={self.core.spi:#010x} {self.info.src}->{self.info.dst} "
                f"{self.info.mode}>")

    @property
    def spi(self):
        return self.core.spi

    @property
    def oseq(self):
        """The last outbound sequence number used (64 bits with ESN)."""
        return espdp_load64(&self.core.oseq)

    @oseq.setter
    def oseq(self, uint64_t value):
        espdp_store64(&self.core.oseq, value)

    @property
    def replay_top(self):
        """The highest inbound sequence number accepted (64 bits with ESN)."""
        return self.core.replay.top

    @property
    def soft_expired(self):
        return bool(self.core.soft_fired)

    def update(self, info):
        """Take the fields XFRM lets change on a valid SA (UPDSA, MIGRATE):
        addresses, encap (MIGRATE may add or drop it: MOBIKE behind a NAT),
        set-mark, lifetimes.  Keys, algorithms, SPI, mode and replay state
        must be the same; a soft limit can fire again."""
        info.validate()
        old = self.info
        for name in ("spi", "mode", "aead", "enc", "auth", "flags", "replay_window"):
            if getattr(info, name) != getattr(old, name):
                raise ConfigError(f"{name} of a valid SA cannot change")
        if info.family != old.family:
            raise ConfigError("the address family of a valid SA cannot change")
        self._set_mutable(info)
        if info.lifetime != old.lifetime:
            self.core.soft_fired = False
        self.info = info

    def replay_state(self):
        """XFRM GETAE: ``{"seq", "seq_hi", "oseq", "oseq_hi", "bitmap", "window"}``
        (``seq`` is the inbound top; ``bitmap`` bit i means top - i was seen)."""
        cdef uint64_t top, oseq = espdp_load64(&self.core.oseq)
        espdp_lock(&self.core.replay_lock)    # workers may be moving the window
        try:
            top = self.core.replay.top
            bitmap = replay_export(&self.core.replay)
        finally:
            espdp_unlock(&self.core.replay_lock)
        return {"seq": top & 0xFFFFFFFF, "seq_hi": top >> 32,
                "oseq": oseq & 0xFFFFFFFF, "oseq_hi": oseq >> 32,
                "bitmap": bitmap, "window": self.core.replay.window}

    def set_replay_state(self, uint64_t seq, uint64_t oseq, bitmap=0):
        """XFRM NEWAE: replace the inbound top and window bits and the outbound
        sequence number (64-bit values: with ESN the high halves included)."""
        espdp_lock(&self.core.replay_lock)
        try:
            replay_import(&self.core.replay, seq, bitmap)
        finally:
            espdp_unlock(&self.core.replay_lock)
        espdp_store64(&self.core.oseq, oseq)

    def set_counters(self, uint64_t packets, uint64_t nbytes):
        """XFRM NEWAE's current lifetime: replace the packet and byte counts."""
        self.core.stats.packets = packets
        self.core.stats.bytes = nbytes

    def kill(self):
        """The SA left the SAD: whoever still holds this object can send nothing
        with it (verdict no_sa), whatever its sequence number."""
        self.core.dead = True

    @property
    def dead(self):
        return bool(self.core.dead)

    def stats(self):
        """Counters: packets, bytes, the XFRM stats and a drop count per verdict."""
        cdef sa_stats *s = &self.core.stats
        out = {"packets": s.packets, "bytes": s.bytes,
               "replay_window": s.drops[<int> V_REPLAY_WINDOW], "replay": s.drops[<int> V_REPLAY],
               "integrity_failed": s.drops[<int> V_INTEGRITY]}
        out["drops"] = {VERDICTS[v]: s.drops[<int> v]
                        for v in range(1, N_VERDICTS) if s.drops[<int> v]}
        return out

    def encrypt(self, PacketBatch batch):
        """Encrypt every packet of the batch with this SA; the number that passed."""
        cdef int i, ok = 0
        cdef sa_core *c = &self.core
        with nogil:
            for i in range(batch.count):
                batch.flags_p[i] = 0
                batch.verdict_p[i] = esp_output(
                    c, 0, batch.buf + <size_t> i * batch.slot_size, batch.slot_size,
                    &batch.off_p[i], &batch.len_p[i], &batch.mark_p[i], &batch.flags_p[i])
                batch.sa_p[i] = self.index
                ok += batch.verdict_p[i] == V_OK
        return ok

    def encrypt_packet(self, bytes packet, uint32_t mark=0):
        """One packet: ``(verdict, encrypted packet or None, mark)``."""
        if self._one is None:
            self._one = PacketBatch(1)
        cdef PacketBatch one = self._one
        one.clear()
        one.add(packet, mark)
        self.encrypt(one)
        return one.result(0)


cdef class PacketBatch:
    """Slots of ``slot_size`` bytes; each packet starts ``headroom`` bytes in.

    ``offset``, ``length``, ``mark``, ``verdict``, ``sa`` and ``flags`` are
    numpy arrays indexed by slot; ``data`` is the (capacity, slot_size) buffer.
    """

    def __cinit__(self, int capacity=64, int slot_size=2048, int headroom=128):
        if capacity <= 0 or headroom < 0 or slot_size <= headroom:
            raise ConfigError("PacketBatch: need capacity > 0 and slot_size > headroom >= 0")
        self.capacity, self.slot_size, self.headroom = capacity, slot_size, headroom
        self.count = 0
        self.data = np.zeros((capacity, slot_size), np.uint8)
        self.offset = np.zeros(capacity, np.uint32)
        self.length = np.zeros(capacity, np.uint32)
        self.mark = np.zeros(capacity, np.uint32)
        self.verdict = np.zeros(capacity, np.uint8)
        self.sa = np.full(capacity, -1, np.int32)
        self.flags = np.zeros(capacity, np.uint8)
        cdef uint8_t[:, ::1] d = self.data
        cdef uint32_t[::1] o = self.offset, n = self.length, m = self.mark
        cdef uint8_t[::1] v = self.verdict, f = self.flags
        cdef int32_t[::1] s = self.sa
        self.buf, self.off_p, self.len_p, self.mark_p = &d[0, 0], &o[0], &n[0], &m[0]
        self.verdict_p, self.sa_p, self.flags_p = &v[0], &s[0], &f[0]

    def __len__(self):
        return self.count

    def clear(self):
        self.count = 0

    def add(self, const uint8_t[::1] packet, uint32_t mark=0, int32_t sa=-1):
        """Copy a packet into the next slot; returns its index."""
        cdef int i = self.count
        cdef Py_ssize_t n = packet.shape[0]
        if i >= self.capacity:
            raise ConfigError(f"PacketBatch is full ({self.capacity} packets)")
        if n > self.slot_size - self.headroom:
            raise ConfigError(f"packet of {n} bytes does not fit a slot "
                              f"({self.slot_size - self.headroom} bytes after headroom)")
        if n:
            memcpy(self.buf + <size_t> i * self.slot_size + self.headroom, &packet[0], n)
        self.off_p[i], self.len_p[i], self.mark_p[i] = self.headroom, n, mark
        self.sa_p[i], self.verdict_p[i], self.flags_p[i] = sa, 0, 0
        self.count = i + 1
        return i

    def copy_from(self, PacketBatch other, uint32_t head=0xFFFFFFFF):
        """Make this batch a copy of ``other`` (same geometry), without the GIL:
        how a benchmark refills a batch with the same packets.  With ``head``,
        only the first ``head`` bytes of each packet are copied (its headers);
        the rest of each slot keeps what it held."""
        cdef int i
        if other.slot_size != self.slot_size or other.capacity > self.capacity:
            raise ConfigError("copy_from needs batches of the same geometry")
        with nogil:
            for i in range(other.count):
                memcpy(self.buf + <size_t> i * self.slot_size + other.off_p[i],
                       other.buf + <size_t> i * other.slot_size + other.off_p[i],
                       min(other.len_p[i], head))
                self.off_p[i], self.len_p[i] = other.off_p[i], other.len_p[i]
                self.mark_p[i], self.sa_p[i] = other.mark_p[i], other.sa_p[i]
            self.count = other.count

    def packet(self, int i):
        """The bytes of slot i as they are now."""
        if not 0 <= i < self.count:
            raise IndexError(i)
        return PyBytes_FromStringAndSize(
            <char *> self.buf + <size_t> i * self.slot_size + self.off_p[i], self.len_p[i])

    def result(self, int i):
        """``(verdict name, packet bytes or None, mark)`` of slot i."""
        v = VERDICTS[self.verdict_p[i]]
        return v, (self.packet(i) if v == "ok" else None), self.mark_p[i]

    # What the dataplane does with a batch after the engine, sorted in one pass in
    # C: numpy did it in a dozen whole-array operations per batch.

    def sent_groups(self):
        """After :meth:`SATable.encrypt`: ``(failed, groups)``, the verdicts of the
        slots with an SA that failed, and the slots encrypted in four lists by
        outer packet: IPv4 UDP, IPv4 ESP, IPv6 UDP, IPv6 ESP."""
        cdef list failed = []
        cdef list groups = [[], [], [], []]
        cdef int i, g
        cdef const uint8_t *p
        for i in range(self.count):
            if self.sa_p[i] < 0:
                continue
            if self.verdict_p[i]:
                failed.append(self.verdict_p[i])
                continue
            p = self.buf + <size_t> i * self.slot_size + self.off_p[i]
            if p[0] >> 4 == 4:
                g = 0 if p[9] == 17 else 1     # IPPROTO_UDP
            else:
                g = 2 if p[6] == 17 else 3
            (<list> groups[g]).append(i)
        return failed, groups

    def received_verdicts(self, uint8_t mapping_flag):
        """After :meth:`SATable.decrypt`: ``(failed, mapped)``, the verdicts of the
        slots that failed, and the slots decrypted that carry ``mapping_flag``."""
        cdef list failed = [], mapped = []
        cdef int i
        for i in range(self.count):
            if self.verdict_p[i]:
                failed.append(self.verdict_p[i])
            elif self.flags_p[i] & mapping_flag:
                mapped.append(i)
        return failed, mapped

    def accepted_slots(self, uint8_t accepted_flag, bint split_marked):
        """``(plain, marked)``: the slots decrypted that carry ``accepted_flag``,
        those with a mark apart when ``split_marked`` (else all in ``plain``)."""
        cdef list plain = [], marked = []
        cdef int i
        for i in range(self.count):
            if self.verdict_p[i] == 0 and self.flags_p[i] & accepted_flag:
                if split_marked and self.mark_p[i]:
                    marked.append(i)
                else:
                    plain.append(i)
        return plain, marked


cdef inline uint32_t _hash(uint32_t spi, uint32_t nslots) noexcept nogil:
    return ((spi * <uint32_t> 0x9E3779B1) ^ (spi >> 16)) & (nslots - 1)


cdef class OseqSweep:
    """Slots of engine SAs whose outbound counters are read again and again (the
    sequence guard's check): an SA is type-checked once, when :meth:`put` in its
    slot, and each :meth:`read` is one loop over the slots in C, about a
    millisecond per 100,000 SAs.  An empty slot reads as counter 0, not dead."""
    cdef list _sas                  # slot -> SA or None; keeps the cores alive
    cdef sa_core **_cores           # slot -> its core, NULL when empty
    cdef Py_ssize_t _n

    def __cinit__(self, list sas=None):
        self._sas = []
        self._n = 0
        self._cores = NULL
        if sas:
            self.resize(len(sas))
            for i, sa in enumerate(sas):
                self.put(i, sa)

    def __dealloc__(self):
        free(self._cores)

    def __len__(self):
        return self._n

    def resize(self, Py_ssize_t n):
        """Grow to ``n`` slots (the new ones empty); never shrinks."""
        if n <= self._n:
            return
        cdef sa_core **cores = <sa_core **> realloc(self._cores, n * sizeof(sa_core *))
        if cores == NULL:
            raise MemoryError()
        memset(cores + self._n, 0, (n - self._n) * sizeof(sa_core *))
        self._cores = cores
        self._sas.extend([None] * (n - self._n))
        self._n = n

    def put(self, Py_ssize_t i, sa):
        """``sa`` (an engine SA, else TypeError) in slot ``i``."""
        if not 0 <= i < self._n:
            raise IndexError(i)
        cdef SA checked = <SA?> sa
        self._sas[i] = checked
        self._cores[i] = &checked.core

    def clear(self, Py_ssize_t i):
        if not 0 <= i < self._n:
            raise IndexError(i)
        self._sas[i] = None
        self._cores[i] = NULL

    def read(self):
        """(counters as uint64, dead as bool), two numpy arrays by slot."""
        out = np.zeros(self._n, np.uint64)
        dead = np.zeros(self._n, np.uint8)
        cdef uint64_t[::1] o = out
        cdef uint8_t[::1] d = dead
        cdef Py_ssize_t i
        for i in range(self._n):
            if self._cores[i] != NULL:
                o[i] = espdp_load64(&self._cores[i].oseq)
                d[i] = self._cores[i].dead
        return out, dead.view(np.bool_)


def oseq_array(list sas):
    """The outbound counters of engine ``sas`` and whether each is dead, as two
    numpy arrays (once; :class:`OseqSweep` for reading SAs repeatedly)."""
    return OseqSweep(sas).read()


cdef class SATable:
    """The SAs the engine knows, with inbound lookup by (dst, SPI, mark) as
    XFRM does it: ``(packet mark & SA mask) == SA value``."""

    def __cinit__(self, int workers=1):
        cdef pthread_rwlockattr_t attr
        if not 1 <= workers <= 256:
            raise ConfigError(f"workers: {workers} (1..256)")
        self.workers = workers
        pthread_rwlockattr_init(&attr)
        # a writer (add, remove) must not starve behind workers' batches
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        pthread_rwlock_init(&self.lock, &attr)
        pthread_rwlockattr_destroy(&attr)
        self._sas, self._free = [], []
        self.nslots = 16
        self.slots = <int32_t *> calloc(self.nslots, sizeof(int32_t))
        if self.slots == NULL:
            raise MemoryError()
        for k in range(self.nslots):
            self.slots[k] = EMPTY

    def __dealloc__(self):
        free(self.slots)
        free(self.cores)
        pthread_rwlock_destroy(&self.lock)

    def __len__(self):
        return len(self._sas) - len(self._free)

    def __iter__(self):
        return iter([sa for sa in self._sas if sa is not None])

    def __getitem__(self, int index):
        sa = self._sas[index] if 0 <= index < len(self._sas) else None
        if sa is None:
            raise KeyError(index)
        return sa

    def get(self, int index, default=None):
        """The SA at ``index``, or ``default`` when there is none (any more)."""
        sa = self._sas[index] if 0 <= index < len(self._sas) else None
        return default if sa is None else sa

    cdef void _insert(self, int32_t index):
        cdef uint32_t h = _hash(self.cores[index].spi, self.nslots)
        while self.slots[h] >= 0:
            h = (h + 1) & (self.nslots - 1)
        if self.slots[h] == EMPTY:
            self.used += 1
        self.slots[h] = index

    cdef int _rehash(self, uint32_t nslots) except -1:
        cdef uint32_t k
        cdef int32_t *slots = <int32_t *> calloc(nslots, sizeof(int32_t))
        if slots == NULL:
            raise MemoryError()
        free(self.slots)
        self.slots, self.nslots, self.used = slots, nslots, 0
        for k in range(nslots):
            slots[k] = EMPTY
        cdef int32_t index
        for index in range(self.ncores):
            if self.cores[index] != NULL:
                self._insert(index)
        return 0

    def add(self, SA sa):
        """Add an SA; returns its index (what ``PacketBatch.sa`` refers to)."""
        if sa.index >= 0:
            raise ConfigError(f"{sa!r} is already in a table")
        sa._set_workers(self.workers)
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
        try:
            return self._add(sa)
        finally:
            pthread_rwlock_unlock(&self.lock)

    def set_workers(self, int workers):
        """Let ``workers`` threads call encrypt/decrypt at once (each its own
        ``worker`` index): every SA gets crypto contexts for each.  Only grows."""
        if not 1 <= workers <= 256:
            raise ConfigError(f"workers: {workers} (1..256)")
        with nogil:
            pthread_rwlock_wrlock(&self.lock)   # no batch in flight while contexts move
        try:
            for sa in self:
                (<SA> sa)._set_workers(workers)
            self.workers = max(self.workers, workers)
        finally:
            pthread_rwlock_unlock(&self.lock)

    cdef int32_t _add(self, SA sa) except -1:
        if self._free:
            index = self._free.pop()
            self._sas[index] = sa
        else:
            index = len(self._sas)
            self._sas.append(sa)
            cores = <sa_core **> realloc(self.cores, len(self._sas) * sizeof(sa_core *))
            if cores == NULL:
                self._sas.pop()
                raise MemoryError()
            self.cores = cores
            self.ncores = len(self._sas)
        self.cores[index] = &sa.core
        sa.index = index
        if (self.used + 1) * 2 > self.nslots:
            self._rehash(self.nslots * 2 if len(self) * 4 > self.nslots else self.nslots)
        else:
            self._insert(index)
        return index

    def remove(self, SA sa):
        """Remove an SA from the table; its counters stay readable."""
        cdef int32_t index = sa.index
        if index < 0 or index >= len(self._sas) or self._sas[index] is not sa:
            raise ConfigError(f"{sa!r} is not in this table")
        cdef uint32_t h = _hash(sa.core.spi, self.nslots)
        while self.slots[h] != index:
            h = (h + 1) & (self.nslots - 1)
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
        self.slots[h] = GONE
        self.cores[index] = NULL
        pthread_rwlock_unlock(&self.lock)
        self._sas[index] = None
        self._free.append(index)
        sa.index = -1

    cdef int32_t find(self, uint32_t spi, int family, const uint8_t *dst,
                      uint32_t mark) noexcept nogil:
        cdef uint32_t h = _hash(spi, self.nslots)
        cdef int32_t index
        cdef sa_core *c
        while True:
            index = self.slots[h]
            if index == EMPTY:
                return -1
            if index >= 0:
                c = self.cores[index]
                if (c.spi == spi and c.family == family and
                        memcmp(c.dst, dst, 4 if family == 4 else 16) == 0 and
                        (not c.has_mark or (mark & c.mark_m) == c.mark_v)):
                    return index
            h = (h + 1) & (self.nslots - 1)

    def lookup(self, dst, uint32_t spi, uint32_t mark=0):
        """The SA that an inbound packet to ``dst`` with ``spi`` and ``mark`` finds."""
        cdef uint8_t packed[16]
        address = ipaddress.ip_address(dst)
        _address(packed, address)
        cdef int32_t index = self.find(spi, address.version, packed, mark)
        return None if index < 0 else self._sas[index]

    def encrypt(self, PacketBatch batch, int worker=0):
        """Encrypt each packet with the SA its ``batch.sa`` entry names.  A slot
        whose entry is -1 (the caller chose no SA) is skipped: verdict no_sa, not
        counted; an entry naming an SA that is gone is counted as no_sa.

        Up to ``workers`` threads may call this (and :meth:`decrypt`) at once,
        each with its own ``worker`` index and batches: an SA's sequence
        numbers, counters and replay window are shared and updated atomically;
        each worker has crypto contexts of its own."""
        cdef int i, ok = 0
        cdef int32_t index
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} of a table for {self.workers}")
        with nogil:
            pthread_rwlock_rdlock(&self.lock)
            for i in range(batch.count):
                batch.flags_p[i] = 0
                index = batch.sa_p[i]
                if index < 0 or index >= self.ncores or self.cores[index] == NULL:
                    batch.verdict_p[i] = V_NO_SA
                    if index != -1:
                        espdp_add64(&self.drops[<int> V_NO_SA], 1)
                    continue
                batch.verdict_p[i] = esp_output(
                    self.cores[index], worker, batch.buf + <size_t> i * batch.slot_size,
                    batch.slot_size, &batch.off_p[i], &batch.len_p[i], &batch.mark_p[i],
                    &batch.flags_p[i])
                ok += batch.verdict_p[i] == V_OK
            pthread_rwlock_unlock(&self.lock)
        return ok

    def decrypt(self, PacketBatch batch, int worker=0):
        """Parse, look up, check and decrypt each packet (a whole IP packet);
        ``worker`` as for :meth:`encrypt`."""
        cdef int i, ok = 0
        cdef outer_info o
        cdef uint8_t *slot
        cdef uint8_t *packet
        cdef Verdict v
        cdef int32_t index
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} of a table for {self.workers}")
        with nogil:
            pthread_rwlock_rdlock(&self.lock)
            for i in range(batch.count):
                batch.flags_p[i] = 0
                batch.sa_p[i] = -1
                slot = batch.buf + <size_t> i * batch.slot_size
                packet = slot + batch.off_p[i]
                v = parse_outer(packet, batch.len_p[i], &o)
                if v == V_OK:
                    index = self.find(rd32(packet + o.esp), o.family, packet + o.dst,
                                      batch.mark_p[i])
                    if index < 0:
                        v = V_NO_SA
                    else:
                        batch.sa_p[i] = index
                        v = esp_input(self.cores[index], worker, &o, slot,
                                      &batch.off_p[i], &batch.len_p[i], &batch.mark_p[i],
                                      &batch.flags_p[i])
                        batch.verdict_p[i] = v
                        ok += v == V_OK
                        continue
                espdp_add64(&self.drops[<int> v], 1)
                batch.verdict_p[i] = v
            pthread_rwlock_unlock(&self.lock)
        return ok

    def decrypt_packet(self, bytes packet, uint32_t mark=0):
        """One packet: ``(verdict, decrypted packet or None, mark)``."""
        if self._one is None:
            self._one = PacketBatch(1, 65536 + 256, 128)
        cdef PacketBatch one = self._one
        one.clear()
        one.add(packet, mark)
        self.decrypt(one)
        return one.result(0)

    def stats(self):
        """Drops counted before an SA was found, by verdict."""
        return {VERDICTS[v]: self.drops[<int> v]
                for v in range(1, N_VERDICTS) if self.drops[<int> v]}

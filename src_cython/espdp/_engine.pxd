# The engine's Python-facing objects: SA, SATable, PacketBatch.
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from espdp._atomic cimport pthread_rwlock_t
from espdp._esp cimport N_VERDICTS, sa_core

cdef class SA:
    cdef sa_core core
    cdef readonly object info
    cdef readonly int index          # position in its SATable, -1 when in none
    cdef object _one                 # a one-slot PacketBatch for encrypt_packet
    cdef _set_mutable(self, info)
    cdef int _set_workers(self, int n) except -1

cdef class PacketBatch:
    cdef readonly int capacity
    cdef readonly int slot_size
    cdef readonly int headroom
    cdef public int count
    cdef readonly object data, offset, length, mark, verdict, sa, flags
    cdef uint8_t *buf
    cdef uint32_t *off_p
    cdef uint32_t *len_p
    cdef uint32_t *mark_p
    cdef uint8_t *verdict_p
    cdef int32_t *sa_p
    cdef uint8_t *flags_p

cdef class SATable:
    cdef list _sas                   # index -> SA or None
    cdef list _free                  # free indexes
    cdef sa_core **cores             # index -> core, NULL when free
    cdef int ncores
    cdef int32_t *slots              # open addressing on the SPI: index, EMPTY or GONE
    cdef uint32_t nslots
    cdef uint32_t used               # slots not EMPTY (entries and tombstones)
    cdef uint64_t drops[N_VERDICTS]  # drops before an SA was found
    cdef object _one
    cdef readonly int workers        # threads that may call encrypt/decrypt at once
    cdef pthread_rwlock_t lock       # read: a batch in flight; write: add, remove
    cdef int32_t _add(self, SA sa) except -1
    cdef void _insert(self, int32_t index)
    cdef int _rehash(self, uint32_t nslots) except -1
    cdef int32_t find(self, uint32_t spi, int family, const uint8_t *dst,
                      uint32_t mark) noexcept nogil

# Anti-replay window (RFC 4303 section 3.4.3, Appendix A; RFC 6479 ring).
from libc.stdint cimport uint32_t, uint64_t

cdef enum ReplayResult:
    REPLAY_OK = 0
    REPLAY_DUPLICATE = 1     # bit already set: stats.replay
    REPLAY_TOO_OLD = 2       # below the window: stats.replay_window
    REPLAY_SEQ_ZERO = 3      # sequence number 0 is never sent

cdef struct replay_state:
    uint64_t top             # highest sequence number accepted (64 bits with ESN)
    uint32_t window          # packets; 0 = no checking at all (as in XFRM)
    uint32_t nblocks         # ring size in 64-bit blocks, a power of two
    bint esn
    uint64_t *ring

cdef int replay_init(replay_state *r, uint32_t window, bint esn, uint64_t top) except -1
cdef void replay_free(replay_state *r) noexcept nogil
cdef ReplayResult replay_check(const replay_state *r, uint32_t seq_lo,
                               uint64_t *seq) noexcept nogil
cdef void replay_advance(replay_state *r, uint64_t seq) noexcept nogil
cdef bint replay_seen(const replay_state *r, uint64_t seq) noexcept nogil
cdef object replay_export(const replay_state *r)
cdef void replay_import(replay_state *r, uint64_t top, object bitmap)

cdef class ReplayWindow:
    cdef replay_state state

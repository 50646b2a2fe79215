# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Anti-replay window with ESN inference, as a ring of 64-bit blocks (RFC 6479).

The window never shifts: sequence number ``s`` lives in bit ``s % 64`` of
block ``(s / 64) % nblocks``.  When ``top`` moves forward, the blocks it
passes over are cleared.  The ring has one block more than the window needs,
so the block holding ``top`` and the oldest block in the window never
collide::

     nblocks = 4, window = 128         top = 300 (block 4 -> ring slot 0)
     ring slot:   0        1        2        3
               [256..319][64..127][128..191][192..255]
                   ^top                 ^ oldest in window = 300-128+1 = 173

Order of use by the decoder (XFRM's): ``replay_check`` before decrypting,
verify the ICV, ``replay_check`` again (another packet may have advanced the
window meanwhile once workers share it), then ``replay_advance``.
"""

from libc.stdlib cimport calloc, free
from libc.stdint cimport uint32_t, uint64_t

cdef enum:
    BLOCK_BITS = 64

# The largest window XFRM can carry (its replay_esn bitmap attribute holds
# 4096 bytes); espdp takes the same limit.
MAX_WINDOW = 32768


cdef int replay_init(replay_state *r, uint32_t window, bint esn, uint64_t top) except -1:
    cdef uint64_t needed = (<uint64_t> window + BLOCK_BITS - 1) // BLOCK_BITS + 1
    cdef uint32_t n = 1
    if window > MAX_WINDOW:
        raise ValueError(f"replay window {window} is larger than {MAX_WINDOW}")
    while n < needed:
        n <<= 1
    r.top = top
    r.window = window
    r.esn = esn
    r.nblocks = n
    r.ring = <uint64_t *> calloc(n, sizeof(uint64_t))
    if r.ring == NULL:
        raise MemoryError()
    return 0


cdef void replay_free(replay_state *r) noexcept nogil:
    free(r.ring)
    r.ring = NULL


cdef inline uint64_t _infer_esn(const replay_state *r, uint32_t seq_lo,
                                bint *too_old) noexcept nogil:
    # RFC 4303 Appendix A2.2: the high half is the one that places seq_lo
    # closest to the window.  Tl, Th: halves of top; W: window; bottom = Tl - W + 1.
    cdef uint32_t tl = <uint32_t> r.top
    cdef uint32_t th = <uint32_t> (r.top >> 32)
    cdef uint32_t w = r.window
    cdef uint32_t bottom = tl - w + 1          # wraps modulo 2^32 in case B
    too_old[0] = False
    if tl >= w - 1:                            # case A: window within one subspace
        if seq_lo >= bottom:
            return (<uint64_t> th << 32) | seq_lo
        return (<uint64_t> (th + 1) << 32) | seq_lo   # th + 1 wraps only at 2^64
    # case B: the window spans two subspaces
    if seq_lo >= bottom:
        if th == 0:                            # before the first subspace: nothing there
            too_old[0] = True
            return seq_lo
        return (<uint64_t> (th - 1) << 32) | seq_lo
    return (<uint64_t> th << 32) | seq_lo


cdef ReplayResult replay_check(const replay_state *r, uint32_t seq_lo,
                               uint64_t *seq) noexcept nogil:
    cdef bint too_old = False
    cdef uint64_t s, diff
    if r.esn and r.window > 0:
        s = _infer_esn(r, seq_lo, &too_old)
    else:
        s = seq_lo
    seq[0] = s
    if r.window == 0:
        return REPLAY_OK
    if too_old:
        return REPLAY_TOO_OLD
    if s == 0:
        return REPLAY_SEQ_ZERO
    if s > r.top:
        return REPLAY_OK
    diff = r.top - s
    if diff >= r.window:
        return REPLAY_TOO_OLD
    if replay_seen(r, s):
        return REPLAY_DUPLICATE
    return REPLAY_OK


cdef bint replay_seen(const replay_state *r, uint64_t seq) noexcept nogil:
    cdef uint64_t block = (seq // BLOCK_BITS) & (r.nblocks - 1)
    return (r.ring[block] >> (seq % BLOCK_BITS)) & 1


cdef void replay_advance(replay_state *r, uint64_t seq) noexcept nogil:
    cdef uint64_t top_block, new_block, i, steps
    if r.window == 0:
        if seq > r.top:
            r.top = seq                        # still tracked, for GETAE
        return
    if seq > r.top:
        top_block = r.top // BLOCK_BITS
        new_block = seq // BLOCK_BITS
        steps = new_block - top_block
        if steps > r.nblocks:
            steps = r.nblocks
        i = 1
        while i <= steps:
            r.ring[(top_block + i) & (r.nblocks - 1)] = 0
            i += 1
        r.top = seq
    r.ring[(seq // BLOCK_BITS) & (r.nblocks - 1)] |= (<uint64_t> 1) << (seq % BLOCK_BITS)


cdef class ReplayWindow:
    """A replay window on its own, for tests and for the control plane's
    replay-state export (XFRM GETAE/NEWAE).

    >>> w = ReplayWindow(32)
    >>> w.accept(5), w.accept(5), w.accept(3)
    (True, False, True)
    """

    def __cinit__(self, uint32_t window, bint esn=False, uint64_t top=0):
        replay_init(&self.state, window, esn, top)

    def __dealloc__(self):
        replay_free(&self.state)

    @property
    def top(self):
        return self.state.top

    @property
    def window(self):
        return self.state.window

    def check(self, uint32_t seq_lo):
        """``(result, seq64)``: result 0 ok, 1 duplicate, 2 too old, 3 zero."""
        cdef uint64_t s = 0
        cdef ReplayResult res = replay_check(&self.state, seq_lo, &s)
        return int(res), s

    def advance(self, uint64_t seq):
        replay_advance(&self.state, seq)

    def accept(self, uint32_t seq_lo):
        """Check and, when fresh, advance; True when the packet is accepted."""
        cdef uint64_t s = 0
        if replay_check(&self.state, seq_lo, &s) != REPLAY_OK:
            return False
        replay_advance(&self.state, s)
        return True

    def export_bitmap(self):
        """Bits of the window as an int: bit i set when ``top - i`` was seen."""
        return replay_export(&self.state)

    def import_state(self, uint64_t top, bitmap):
        """Replace the window with ``top`` and a bitmap as export_bitmap gives it."""
        replay_import(&self.state, top, bitmap)


cdef object replay_export(const replay_state *r):
    """The window as a Python int: bit i set when ``top - i`` was seen (GETAE)."""
    cdef uint64_t i
    bits = 0
    if r.window == 0:
        return 0
    for i in range(min(<uint64_t> r.window, r.top)):
        if replay_seen(r, r.top - i):
            bits |= (<object> 1) << i      # a Python int: windows exceed 64 bits
    return bits


cdef void replay_import(replay_state *r, uint64_t top, object bitmap):
    """Replace the window with ``top`` and a bitmap as replay_export gives it (NEWAE)."""
    cdef uint64_t i, s
    cdef uint32_t k
    for k in range(r.nblocks):
        r.ring[k] = 0
    r.top = top
    if r.window == 0:
        return
    for i in range(min(<uint64_t> r.window, top)):
        if (bitmap >> i) & 1:
            s = top - i
            r.ring[(s // BLOCK_BITS) & (r.nblocks - 1)] |= (<uint64_t> 1) << (s % BLOCK_BITS)

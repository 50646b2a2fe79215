# Byte-order helpers and the Internet checksum (RFC 1071), inline for the engine.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    return (<uint16_t> p[0] << 8) | p[1]


cdef inline uint32_t rd32(const uint8_t *p) noexcept nogil:
    return (<uint32_t> p[0] << 24) | (<uint32_t> p[1] << 16) | (<uint32_t> p[2] << 8) | p[3]


cdef inline void wr16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF


cdef inline void wr32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline void wr64(uint8_t *p, uint64_t v) noexcept nogil:
    wr32(p, <uint32_t> (v >> 32))
    wr32(p + 4, <uint32_t> v)


cdef extern from *:
    """
    #include <string.h>
    /* RFC 1071: the sum of p[0:n] as big-endian 16-bit words (an odd tail padded
     * with 0), folded to 16 bits, added to acc.  32-bit native loads summed in 64
     * bits, folded, then swapped to big-endian order on a little-endian host. */
    static inline uint64_t espdp_csum_add(const uint8_t *p, size_t n, uint64_t acc) {
        uint64_t s = 0; uint32_t w; uint16_t h; size_t i = 0;
        for (; i + 4 <= n; i += 4) { memcpy(&w, p + i, 4); s += w; }
        if (i + 2 <= n) { memcpy(&h, p + i, 2); s += h; i += 2; }
    #if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        if (i < n) s += p[i];
    #else
        if (i < n) s += (uint64_t) p[i] << 8;
    #endif
        while (s >> 16) s = (s & 0xFFFF) + (s >> 16);
    #if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        s = ((s & 0xFF) << 8) | (s >> 8);
    #endif
        return acc + s;
    }
    """
    uint64_t espdp_csum_add(const uint8_t *p, size_t n, uint64_t acc) nogil


cdef inline uint64_t csum_partial(const uint8_t *p, size_t n, uint64_t acc) noexcept nogil:
    """Add the 16-bit big-endian words of p[0:n] to acc (an odd tail is padded with
    0), in ones' complement: the result is congruent, not always equal, to the
    plain sum; fold it with :func:`csum_fold`."""
    return espdp_csum_add(p, n, acc)


cdef inline uint16_t csum_fold(uint64_t acc) noexcept nogil:
    """Fold to 16 bits and complement: the value to store in a header."""
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return <uint16_t> (~acc & 0xFFFF)

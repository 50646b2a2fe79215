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


cdef inline uint64_t csum_partial(const uint8_t *p, size_t n, uint64_t acc) noexcept nogil:
    """Add 16-bit big-endian words of p[0:n] to acc (an odd tail is padded with 0)."""
    cdef size_t i = 0
    while i + 1 < n:
        acc += (<uint32_t> p[i] << 8) | p[i + 1]
        i += 2
    if i < n:
        acc += <uint32_t> p[i] << 8
    return acc


cdef inline uint16_t csum_fold(uint64_t acc) noexcept nogil:
    """Fold to 16 bits and complement: the value to store in a header."""
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return <uint16_t> (~acc & 0xFFFF)

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""TUN offloads (``IFF_VNET_HDR``): large TCP segments in, coalesced TCP out.

With ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4 |
TUN_F_TSO6)`` every packet crossing the TUN is preceded by a 10-byte
``struct virtio_net_hdr`` (little-endian here), and the kernel hands over
TCP segments of up to 64 KiB whose checksum it left to us.

:class:`VnetTun` reads them into a private 64 KiB buffer and cuts each into
the packets it stands for, straight into the free slots of a batch, as the
kernel's own TSO would: the same IP and TCP header on every segment, the
IPv4 total length, identification (+1 a segment) and header checksum, the
IPv6 payload length, the TCP sequence number advanced by the payload before
it, FIN and PSH kept on the last segment only and CWR on the first only,
and a complete TCP checksum.  A packet that only asks for its checksum
(``NEEDS_CSUM`` without GSO, e.g. UDP) gets it completed.  A large packet
that does not fit in the batch's free slots stays in the buffer and goes on
in the next call: nothing is lost between batches.

Its ``write_batch`` writes decrypted packets back with a header of its own.
Runs of slots (in the order given) that are consecutive segments of one TCP
flow -- the same addresses, ports, header bytes but for length, IPv4 id and
checksums, sequence numbers that follow on, payloads of one size but a last
shorter or equal one, no flag but ACK and a PSH on the last -- are written
as one packet of up to 64 KiB with ``gso_type`` TCPV4/TCPV6, ``gso_size``
the payload size and ``NEEDS_CSUM`` (the TCP checksum field holds the
pseudo-header sum), which the kernel takes as GRO would have made it: one
trip through its stack instead of one a segment.  Everything else is
written as it is with a zero header (the kernel checks its checksums).

Counters go to the caller's ``stats`` dict: ``received`` (packets into the
batch, segments counted one by one), ``gso_in`` (large packets cut),
``sent`` (packets written, each coalesced segment counted), ``gso_out``
(coalesced writes), ``dropped`` (EAGAIN), ``send_errors``, ``truncated``
and ``bad_offload`` (a header the kernel should never send: counted, dropped).
"""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset, strerror
from posix.unistd cimport read, write

from espdp._engine cimport PacketBatch
from espdp._inet cimport csum_fold, csum_partial, rd16, rd32, wr16, wr32

cdef extern from "<errno.h>" nogil:
    int EWOULDBLOCK

DEF VNET_HDR = 10
DEF BIG = 65536 + 256

cdef enum:
    F_NEEDS_CSUM = 1
    GSO_NONE = 0
    GSO_TCPV4 = 1
    GSO_TCPV6 = 4
    GSO_ECN = 0x80
    TCP_FIN = 0x01
    TCP_PSH = 0x08
    TCP_ACK = 0x10
    TCP_CWR = 0x80
    IPPROTO_TCP = 6
    MAX_RUN = 64

# the ioctls and flags for the Python side (espdp.io.tun)
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
HEADER_SIZE = VNET_HDR


cdef inline uint16_t le16(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint16_t> p[1] << 8)


cdef inline void wle16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef uint64_t pseudo_sum(const uint8_t *ip, uint32_t l4_len) noexcept nogil:
    """The TCP/UDP pseudo-header sum of the packet at ``ip`` (not folded)."""
    if ip[0] >> 4 == 4:
        return csum_partial(ip + 12, 8, 0) + ip[9] + l4_len
    return csum_partial(ip + 8, 32, 0) + (l4_len >> 16) + (l4_len & 0xFFFF) + ip[6]


cdef inline void ipv4_checksum(uint8_t *ip) noexcept nogil:
    cdef uint32_t ihl = (ip[0] & 0x0F) * 4
    ip[10] = 0
    ip[11] = 0
    wr16(ip + 10, csum_fold(csum_partial(ip, ihl, 0)))


cdef int finish_csum(uint8_t *p, uint32_t n, uint32_t start, uint32_t off) noexcept nogil:
    """Complete a checksum the kernel left partial: the field already holds the
    pseudo-header sum, so the Internet checksum of p[start:n] is the answer."""
    if start + off + 2 > n:
        return -1
    wr16(p + start + off, csum_fold(csum_partial(p + start, n - start, 0)))
    return 0


cdef class VnetTun:
    """The offload half of a TUN fd opened with ``IFF_VNET_HDR``: see the module."""
    cdef uint8_t *buf        # the last read, header included
    cdef uint8_t *out        # a coalesced write, header included
    cdef uint32_t have       # bytes in buf (0: nothing pending)
    cdef uint32_t next_seg   # the next segment of buf to cut
    cdef readonly int fd

    def __cinit__(self, int fd):
        self.fd = fd
        self.buf = <uint8_t *> malloc(BIG)
        self.out = <uint8_t *> malloc(BIG)
        if self.buf == NULL or self.out == NULL:
            raise MemoryError()
        self.have = 0
        self.next_seg = 0

    def __dealloc__(self):
        free(self.buf)
        free(self.out)

    @property
    def pending(self):
        """Whether part of a large packet waits for the next batch."""
        return self.have != 0

    # ------------------------------------------------------------ read

    cdef int _cut(self, PacketBatch batch, uint64_t *added, uint64_t *bad,
                  uint64_t *trunc) noexcept nogil:
        """Move the packet in ``buf`` into free slots; 1 when it is all moved, 0
        when the batch filled first (the rest stays pending)."""
        cdef const uint8_t *h = self.buf
        cdef const uint8_t *p = self.buf + VNET_HDR
        cdef uint32_t n = self.have - VNET_HDR
        cdef uint8_t gso = h[1] & ~GSO_ECN
        cdef uint32_t mss = le16(h + 4), start = le16(h + 6), csum_off = le16(h + 8)
        cdef size_t room = batch.slot_size - batch.headroom
        cdef uint32_t ihl, thl, hdr, payload, nseg, k, seg, total
        cdef uint32_t seq, ip_id
        cdef uint8_t *q
        cdef uint8_t *t
        cdef int i
        cdef bint v4 = n > 0 and p[0] >> 4 == 4
        if gso == GSO_NONE:
            if batch.count >= batch.capacity:
                return 0
            if n > room:
                trunc[0] += 1
                return 1
            i = batch.count
            q = batch.buf + <size_t> i * batch.slot_size + batch.headroom
            memcpy(q, p, n)
            if h[0] & F_NEEDS_CSUM and finish_csum(q, n, start, csum_off) < 0:
                bad[0] += 1
                return 1
            self._slot(batch, i, n)
            added[0] += 1
            return 1
        if gso != GSO_TCPV4 and gso != GSO_TCPV6:
            bad[0] += 1
            return 1
        # a TCP segment to cut: the TCP header starts at csum_start
        if (mss == 0 or n < 40 or (gso == GSO_TCPV4) != v4
                or start < ((p[0] & 0x0F) * 4 if v4 else 40) or start + 20 > n):
            bad[0] += 1
            return 1
        thl = (p[start + 12] >> 4) * 4
        hdr = start + thl
        if thl < 20 or hdr > n or hdr + mss > room:
            bad[0] += 1
            return 1
        payload = n - hdr
        nseg = (payload + mss - 1) // mss if payload else 1
        seq = rd32(p + start + 4)
        ip_id = rd16(p + 4) if v4 else 0
        k = self.next_seg
        while k < nseg:
            if batch.count >= batch.capacity:
                self.next_seg = k
                return 0
            seg = mss if (k + 1) * mss <= payload else payload - k * mss
            total = hdr + seg
            i = batch.count
            q = batch.buf + <size_t> i * batch.slot_size + batch.headroom
            memcpy(q, p, hdr)
            memcpy(q + hdr, p + hdr + k * mss, seg)
            if v4:
                wr16(q + 2, <uint16_t> total)
                wr16(q + 4, <uint16_t> (ip_id + k))
                ipv4_checksum(q)
            else:
                wr16(q + 4, <uint16_t> (total - 40))
            t = q + start
            wr32(t + 4, seq + k * mss)
            if k + 1 < nseg:
                t[13] &= ~(TCP_FIN | TCP_PSH)
            if k > 0:
                t[13] &= ~TCP_CWR
            t[16] = 0
            t[17] = 0
            wr16(t + 16, csum_fold(csum_partial(t, total - start,
                                                pseudo_sum(q, total - start))))
            self._slot(batch, i, total)
            added[0] += 1
            k += 1
        return 1

    cdef inline void _slot(self, PacketBatch batch, int i, uint32_t n) noexcept nogil:
        batch.off_p[i] = batch.headroom
        batch.len_p[i] = n
        batch.mark_p[i] = 0
        batch.sa_p[i] = -1
        batch.count = i + 1

    def read_batch(self, PacketBatch batch not None, dict stats not None) -> int:
        """Read (and cut) packets into slots ``batch.count..`` until EAGAIN or the
        batch is full, the GIL released; the number of packets added.  An error
        other than EAGAIN/EINTR is raised only when nothing was added."""
        cdef int err = 0
        cdef ssize_t n
        cdef uint64_t added = 0, bad = 0, trunc = 0, cut = 0
        with nogil:
            while True:
                if self.have:
                    if self._cut(batch, &added, &bad, &trunc) == 0:
                        break
                    if self.buf[1] & ~GSO_ECN:
                        cut += 1
                    self.have = 0
                    self.next_seg = 0
                if batch.count >= batch.capacity:
                    break
                n = read(self.fd, self.buf, BIG)
                if n < 0:
                    err = errno
                    if err == EINTR:
                        err = 0
                        continue
                    if err == EAGAIN or err == EWOULDBLOCK:
                        err = 0
                    break
                if n == 0:
                    break
                if n <= VNET_HDR or n >= BIG:
                    trunc += 1
                    continue
                self.have = <uint32_t> n
        stats["received"] += added
        stats["gso_in"] = stats.get("gso_in", 0) + cut
        if trunc:
            stats["truncated"] = stats.get("truncated", 0) + trunc
        if bad:
            stats["bad_offload"] = stats.get("bad_offload", 0) + bad
        if err and not added:
            raise OSError(err, strerror(err).decode())
        return added

    # ------------------------------------------------------------ write

    def write_batch(self, PacketBatch batch not None, indexes, dict stats not None) -> int:
        """Write the given slots (all when ``indexes`` is None) in order, runs of one
        TCP flow coalesced (see the module); the number of packets written.
        EAGAIN counts the rest ``dropped``; a packet the kernel refuses counts in
        ``send_errors`` and the rest are written."""
        cdef int idx[64]
        cdef int m, j, k, i, err
        cdef uint64_t sent = 0, dropped = 0, errors = 0, gso = 0
        cdef size_t size = batch.slot_size
        cdef object it = range(batch.count) if indexes is None else indexes
        chunk = []
        for value in it:
            i = value
            if not 0 <= i < batch.count:
                raise IndexError(f"slot {i} of a batch of {batch.count}")
            if <size_t> batch.off_p[i] + batch.len_p[i] > size or batch.off_p[i] < VNET_HDR:
                errors += 1
                continue
            chunk.append(i)
        k = 0
        while k < len(chunk) and not dropped:
            m = 0
            while m < 64 and k + m < len(chunk):
                idx[m] = chunk[k + m]
                m += 1
            with nogil:
                self._write_run(batch, idx, m, &sent, &dropped, &errors, &gso)
            k += m
        if dropped:
            dropped += len(chunk) - k
        stats["sent"] += sent
        stats["dropped"] += dropped
        stats["send_errors"] += errors
        stats["gso_out"] = stats.get("gso_out", 0) + gso
        return sent

    cdef void _write_run(self, PacketBatch batch, int *idx, int m, uint64_t *sent,
                         uint64_t *dropped, uint64_t *errors, uint64_t *gso) noexcept nogil:
        cdef int j = 0, r, err
        cdef ssize_t n
        cdef uint8_t *p
        while j < m:
            r = self._run_length(batch, idx + j, m - j)
            if r > 1:
                n = self._write_coalesced(batch, idx + j, r)
            else:
                p = batch.buf + <size_t> idx[j] * batch.slot_size + batch.off_p[idx[j]]
                memset(p - VNET_HDR, 0, VNET_HDR)   # the headroom before the packet
                n = write(self.fd, p - VNET_HDR, batch.len_p[idx[j]] + VNET_HDR)
            if n < 0:
                err = errno
                if err == EINTR:
                    continue
                if err == EAGAIN or err == EWOULDBLOCK:
                    dropped[0] += m - j
                    return
                errors[0] += r
            else:
                sent[0] += r
                if r > 1:
                    gso[0] += 1
            j += r

    cdef int _run_length(self, PacketBatch batch, int *idx, int m) noexcept nogil:
        """How many slots from idx[0] on coalesce into one packet (1: none)."""
        cdef const uint8_t *a = batch.buf + <size_t> idx[0] * batch.slot_size + batch.off_p[idx[0]]
        cdef uint32_t alen = batch.len_p[idx[0]]
        cdef uint32_t hdr, seg, total, nxt, blen
        cdef const uint8_t *b
        cdef int r = 1
        hdr = _tcp_header_len(a, alen)
        if hdr == 0 or alen <= hdr or not _coalescable(a):
            return 1
        seg = alen - hdr
        total = alen
        nxt = rd32(a + _l4(a) + 4) + seg
        while r < m and r < MAX_RUN:
            b = batch.buf + <size_t> idx[r] * batch.slot_size + batch.off_p[idx[r]]
            blen = batch.len_p[idx[r]]
            if blen <= hdr or blen - hdr > seg or total + blen - hdr > 65535:
                break
            if _tcp_header_len(b, blen) != hdr or not _same_flow(a, b, hdr):
                break
            if rd32(b + _l4(b) + 4) != nxt:
                break
            if b[_l4(b) + 13] & ~(TCP_ACK | TCP_PSH):
                break
            total += blen - hdr
            nxt += blen - hdr
            r += 1
            if blen - hdr < seg or b[_l4(b) + 13] & TCP_PSH:
                break
        return r

    cdef ssize_t _write_coalesced(self, PacketBatch batch, int *idx, int r) noexcept nogil:
        cdef const uint8_t *a = batch.buf + <size_t> idx[0] * batch.slot_size + batch.off_p[idx[0]]
        cdef uint32_t hdr = _tcp_header_len(a, batch.len_p[idx[0]])
        cdef uint32_t l4 = _l4(a)
        cdef uint32_t seg = batch.len_p[idx[0]] - hdr, total = hdr, blen
        cdef uint8_t *h = self.out
        cdef uint8_t *q = self.out + VNET_HDR
        cdef const uint8_t *b = a
        cdef int k
        memcpy(q, a, hdr)
        for k in range(r):
            b = batch.buf + <size_t> idx[k] * batch.slot_size + batch.off_p[idx[k]]
            blen = batch.len_p[idx[k]]
            memcpy(q + total, b + hdr, blen - hdr)
            total += blen - hdr
        # the last segment's flags (a PSH on it)
        q[l4 + 13] = b[l4 + 13]
        if q[0] >> 4 == 4:
            wr16(q + 2, <uint16_t> total)
            ipv4_checksum(q)
        else:
            wr16(q + 4, <uint16_t> (total - 40))
        wr16(q + l4 + 16, <uint16_t> ~csum_fold(pseudo_sum(q, total - l4)))
        h[0] = F_NEEDS_CSUM
        h[1] = GSO_TCPV4 if q[0] >> 4 == 4 else GSO_TCPV6
        wle16(h + 2, <uint16_t> hdr)
        wle16(h + 4, <uint16_t> seg)
        wle16(h + 6, <uint16_t> l4)
        wle16(h + 8, 16)
        return write(self.fd, self.out, total + VNET_HDR)


cdef inline uint32_t _l4(const uint8_t *p) noexcept nogil:
    return (p[0] & 0x0F) * 4 if p[0] >> 4 == 4 else 40


cdef uint32_t _tcp_header_len(const uint8_t *p, uint32_t n) noexcept nogil:
    """IP + TCP header length of a plain TCP packet (IPv4 without fragments or
    IPv6 without extension headers, lengths consistent); 0 for anything else."""
    cdef uint32_t l4, thl
    if n < 40:
        return 0
    if p[0] >> 4 == 4:
        l4 = (p[0] & 0x0F) * 4
        if l4 < 20 or p[9] != IPPROTO_TCP or rd16(p + 2) != n or rd16(p + 6) & 0x3FFF:
            return 0
    elif p[0] >> 4 == 6:
        l4 = 40
        if p[6] != IPPROTO_TCP or rd16(p + 4) + 40 != n or n < 60:
            return 0
    else:
        return 0
    if l4 + 20 > n:
        return 0
    thl = (p[l4 + 12] >> 4) * 4
    if thl < 20 or l4 + thl > n:
        return 0
    return l4 + thl


cdef bint _coalescable(const uint8_t *a) noexcept nogil:
    """A first segment may start a run: ACK and nothing else (a PSH ends a run)."""
    return a[_l4(a) + 13] == TCP_ACK


cdef bint _same_flow(const uint8_t *a, const uint8_t *b, uint32_t hdr) noexcept nogil:
    """The headers agree but for what segmentation changes: IPv4 length, id and
    checksum, IPv6 payload length, TCP sequence number, PSH and checksum."""
    cdef uint32_t l4 = _l4(a)
    if a[0] >> 4 == 4:
        if a[0] != b[0] or a[1] != b[1] or memcmp(a + 6, b + 6, 4) or memcmp(a + 12, b + 12,
                                                                              l4 - 12):
            return False
    else:
        if memcmp(a, b, 4) or memcmp(a + 6, b + 6, 34):
            return False
    # ports; ack number, data offset; window; urgent pointer and options
    if memcmp(a + l4, b + l4, 4) or memcmp(a + l4 + 8, b + l4 + 8, 5):
        return False
    if memcmp(a + l4 + 14, b + l4 + 14, 2) or memcmp(a + l4 + 18, b + l4 + 18, hdr - l4 - 18):
        return False
    return True

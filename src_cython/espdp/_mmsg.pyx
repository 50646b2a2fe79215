# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Batched UDP I/O for ESP in UDP (RFC 3948): ``recvmmsg(2)`` and ``sendmmsg(2)``
straight into and out of a :class:`PacketBatch`, the GIL released in the syscall.

:func:`recv_batch` receives up to 64 datagrams per syscall into the free slots
of a batch, each payload at ``headroom + hdr`` (hdr = 28 for IPv4, 48 for
IPv6), and classifies them in C exactly as ``espdp.io._datagram.deliver``
does: a lone ``0xFF`` is a NAT keepalive (counted, eaten); a first 32-bit
word of zero is the non-ESP marker, whose IKE message is copied out as bytes
and returned with the peer (or counted ``ike_unhandled``); anything else is
ESP and gets a synthetic outer IP + UDP header at ``headroom`` with the peer's
address and port as the source and the local address (``IP_PKTINFO`` /
``IPV6_PKTINFO``, or the bound one) and port as the destination.  IPv4: IHL
5, DF, TTL 64, header checksum; IPv6: hop limit 64; UDP checksum 0 (the
engine does not check it).  A slot freed by a keepalive, an IKE message or a
truncated datagram (``MSG_TRUNC``, counted ``truncated``) is filled by the
next ESP datagram, so the batch stays dense.  The mark of the packet
(the ``SO_MARK`` control message, sent when ``SO_RCVMARK`` is on) goes into
``batch.mark``, 0 without one.  Receiving stops when the batch is full or the
socket has no more datagrams.

:func:`send_batch` reads the destination address and UDP port from the
outer header of each slot (whole IP + UDP + ESP packets the engine wrote; a
slot that is not IP + UDP of the socket's family is counted ``bad_outer``)
and sends the UDP payloads with ``sendmmsg``, in runs of equal mark: before
a run whose mark differs from the socket's, ``SO_MARK`` is set on the socket.
A message refused with ECONNREFUSED, ENETUNREACH, EHOSTUNREACH, EMSGSIZE,
EINVAL, EPERM or EACCES is counted ``send_errors`` and the rest of its run
is sent; EAGAIN counts the rest of the run ``dropped``.

Both update the caller's ``stats`` dict (the keys of ``_datagram.STAT_KEYS``).
``HAVE_MMSG`` is False where the platform has no ``recvmmsg``/``sendmmsg``
(the functions then raise ``OSError(ENOSYS)``).
"""

import socket

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport (EACCES, ECONNREFUSED, EHOSTUNREACH, EINTR, EINVAL, EMSGSIZE,
                         ENETUNREACH, EPERM, errno)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from posix.unistd cimport read, write
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove, memset, strerror

from espdp._engine cimport PacketBatch
from espdp._inet cimport csum_fold, csum_partial, rd16, wr16, wr32

cdef extern from *:
    """
    #include <errno.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    #include <netinet/in.h>
    #if defined(__linux__)
    #define ESPDP_HAVE_MMSG 1
    #else
    #define ESPDP_HAVE_MMSG 0
    struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
    static int recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int f, void *t)
    { (void) fd; (void) v; (void) n; (void) f; (void) t; errno = ENOSYS; return -1; }
    static int sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int f)
    { (void) fd; (void) v; (void) n; (void) f; errno = ENOSYS; return -1; }
    #endif
    #ifndef SO_MARK
    #define SO_MARK 36
    #endif
    #ifndef IP_PKTINFO
    #define IP_PKTINFO 8
    #endif
    #ifndef IPV6_PKTINFO
    #define IPV6_PKTINFO 50
    #endif
    #ifndef MSG_DONTWAIT
    #define MSG_DONTWAIT 0x40
    #endif
    #ifndef SOL_UDP
    #define SOL_UDP 17
    #endif
    #ifndef UDP_SEGMENT
    #define UDP_SEGMENT 103
    #endif
    #ifndef UDP_GRO
    #define UDP_GRO 104
    #endif
    #include <string.h>
    """
    bint ESPDP_HAVE_MMSG
    int EAGAIN, EWOULDBLOCK, ENOSYS
    int AF_INET, AF_INET6, SOL_SOCKET, SO_MARK, IPPROTO_IP, IPPROTO_IPV6
    int IP_PKTINFO, IPV6_PKTINFO, MSG_DONTWAIT, MSG_TRUNC, SOL_UDP, UDP_SEGMENT, UDP_GRO, EIO
    ctypedef unsigned int socklen_t

    struct iovec:
        void *iov_base
        size_t iov_len

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    struct in_addr:
        pass

    struct in6_addr:
        pass

    struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        unsigned short sin6_family
        uint16_t sin6_port
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    struct sockaddr_storage:
        unsigned short ss_family

    cmsghdr *CMSG_FIRSTHDR(msghdr *m) nogil
    cmsghdr *CMSG_NXTHDR(msghdr *m, cmsghdr *c) nogil
    uint8_t *CMSG_DATA(cmsghdr *c) nogil
    size_t CMSG_SPACE(size_t n) nogil
    size_t CMSG_LEN(size_t n) nogil
    int memcmp(const void *a, const void *b, size_t n) nogil
    uint16_t htons(uint16_t v) nogil
    uint16_t ntohs(uint16_t v) nogil
    int recvmmsg(int fd, mmsghdr *v, unsigned int n, int flags, void *timeout) nogil
    int sendmmsg(int fd, mmsghdr *v, unsigned int n, int flags) nogil
    int setsockopt(int fd, int level, int name, const void *val, socklen_t n) nogil

HAVE_MMSG = bool(ESPDP_HAVE_MMSG)

cdef enum:
    VLEN = 64          # messages per syscall
    CTRL_WORDS = 16    # 128 bytes of control data per message: pktinfo + mark
    KIND_ESP = 0
    KIND_KEEPALIVE = 1
    KIND_NON_ESP = 2
    # send counters
    C_SENT = 0
    C_ERRORS = 1
    C_DROPPED = 2
    # UDP GSO (UDP_SEGMENT): equal-sized datagrams to one peer leave as one message
    GSO_SEGS = 64      # at most this many datagrams per message (UDP_MAX_SEGMENTS)
    GSO_BYTES = 65000  # and this many bytes of payload in all
    # UDP GRO (UDP_GRO): a message may hold many datagrams of one size
    GRO_MSGS = 8       # messages per recvmmsg
    GRO_BUF = 65536    # bytes per message


cdef struct rx_counts:
    uint64_t received, esp, keepalive, non_esp, unhandled, trunc, gro


cdef void _add_counts(dict stats, rx_counts *c):
    stats["received"] += c.received
    stats["esp"] += c.esp
    stats["keepalive"] += c.keepalive
    stats["non_esp"] += c.non_esp
    stats["ike_unhandled"] += c.unhandled
    stats["truncated"] += c.trunc
    if c.gro:
        stats["gro"] = stats.get("gro", 0) + c.gro


cdef int _datagram(PacketBatch batch, const uint8_t *p, uint32_t length, msghdr *m,
                   const sockaddr_storage *name, int family, const uint8_t *bound,
                   bint have_local, int local_port, int hdr, rx_counts *c, list ike,
                   bint want_ike) except -1:
    """One received datagram at ``p`` (which may already lie in slot
    ``batch.count``): a keepalive or an IKE message is taken out and counted;
    ESP is moved to slot ``batch.count`` after its synthetic outer header.
    Returns 1 when a slot was added."""
    cdef uint8_t laddr[16]
    cdef uint8_t *q
    cdef uint32_t mark
    cdef int kind = _kind(p, length)
    c.received += 1
    if kind == KIND_KEEPALIVE:
        c.keepalive += 1
        return 0
    if kind == KIND_NON_ESP:
        c.non_esp += 1
        if want_ike:
            ike.append((PyBytes_FromStringAndSize(<char *> p + 4, length - 4),
                        _peer(name, family)))
        else:
            c.unhandled += 1
        return 0
    q = batch.buf + <size_t> batch.count * batch.slot_size + batch.headroom
    if q + hdr != p:
        memmove(q + hdr, p, length)
    memcpy(laddr, bound, 16)
    mark = _control(m, family, NULL if have_local else laddr)
    _write_outer(q, family, name, laddr, <uint16_t> local_port, length)
    batch.off_p[batch.count] = batch.headroom
    batch.len_p[batch.count] = hdr + length
    batch.mark_p[batch.count] = mark
    batch.sa_p[batch.count] = -1
    batch.count += 1
    c.esp += 1
    return 1


cdef inline int _kind(const uint8_t *p, uint32_t n) noexcept nogil:
    if n == 1 and p[0] == 0xFF:
        return KIND_KEEPALIVE
    if n >= 4 and p[0] == 0 and p[1] == 0 and p[2] == 0 and p[3] == 0:
        return KIND_NON_ESP
    return KIND_ESP


cdef uint32_t _control(msghdr *m, int family, uint8_t *local) noexcept nogil:
    """The packet's mark (0 without one); copies the local address from the
    pktinfo message into ``local`` when there is one."""
    cdef cmsghdr *c = CMSG_FIRSTHDR(m)
    cdef uint32_t mark = 0
    while c != NULL:
        if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SO_MARK:
            if c.cmsg_len >= <size_t> (CMSG_DATA(c) - <uint8_t *> c) + 4:
                memcpy(&mark, CMSG_DATA(c), 4)
        elif local == NULL:
            pass
        elif family == AF_INET and c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_PKTINFO:
            # in_pktinfo: ifindex (4), spec_dst (4), addr (4) -- the header's destination
            if c.cmsg_len >= <size_t> (CMSG_DATA(c) - <uint8_t *> c) + 12:
                memcpy(local, CMSG_DATA(c) + 8, 4)
        elif (family == AF_INET6 and c.cmsg_level == IPPROTO_IPV6
              and c.cmsg_type == IPV6_PKTINFO):
            if c.cmsg_len >= <size_t> (CMSG_DATA(c) - <uint8_t *> c) + 16:
                memcpy(local, CMSG_DATA(c), 16)   # in6_pktinfo.ipi6_addr
        c = CMSG_NXTHDR(m, c)
    return mark


cdef void _write_outer(uint8_t *q, int family, const sockaddr_storage *peer,
                       const uint8_t *local, uint16_t local_port,
                       uint32_t payload_len) noexcept nogil:
    """IP + UDP header at ``q`` for ``payload_len`` bytes behind it, peer -> local."""
    cdef uint32_t udp_len = 8 + payload_len
    cdef const sockaddr_in *a4
    cdef const sockaddr_in6 *a6
    cdef uint16_t sport
    if family == AF_INET:
        a4 = <const sockaddr_in *> peer
        q[0], q[1] = 0x45, 0
        wr16(q + 2, <uint16_t> (20 + udp_len))
        wr32(q + 4, 0x00004000)                 # id 0, DF
        q[8], q[9] = 64, 17
        wr16(q + 10, 0)
        memcpy(q + 12, &a4.sin_addr, 4)
        memcpy(q + 16, local, 4)
        wr16(q + 10, csum_fold(csum_partial(q, 20, 0)))
        sport = ntohs(a4.sin_port)
        q += 20
    else:
        a6 = <const sockaddr_in6 *> peer
        wr32(q, 6 << 28)
        wr16(q + 4, <uint16_t> udp_len)
        q[6], q[7] = 17, 64
        memcpy(q + 8, &a6.sin6_addr, 16)
        memcpy(q + 24, local, 16)
        sport = ntohs(a6.sin6_port)
        q += 40
    wr16(q, sport)
    wr16(q + 2, local_port)
    wr16(q + 4, <uint16_t> udp_len)
    wr16(q + 6, 0)


cdef object _peer(const sockaddr_storage *sa, int family):
    cdef const sockaddr_in *a4
    cdef const sockaddr_in6 *a6
    if family == AF_INET:
        a4 = <const sockaddr_in *> sa
        host = socket.inet_ntop(socket.AF_INET, (<const char *> &a4.sin_addr)[:4])
        return host, ntohs(a4.sin_port)
    a6 = <const sockaddr_in6 *> sa
    host = socket.inet_ntop(socket.AF_INET6, (<const char *> &a6.sin6_addr)[:16])
    if a6.sin6_scope_id:
        host = f"{host}%{socket.if_indextoname(a6.sin6_scope_id)}"
    return host, ntohs(a6.sin6_port)


cdef int _header_len(int family) except -1:
    if family == AF_INET:
        return 28
    if family == AF_INET6:
        return 48
    raise ValueError(f"family {family}: expected AF_INET or AF_INET6")


def recv_batch(int fd, PacketBatch batch not None, int family, int local_port, local,
               dict stats not None, bint want_ike=True):
    """Receive datagrams into the free slots of ``batch``; see the module docstring.

    ``local`` is the packed bound address (4 or 16 bytes) or None to take it
    from pktinfo.  Returns ``(added, ike)``: the number of ESP slots added and
    a list of ``(message, (host, port))`` for the non-ESP datagrams (marker
    removed; always empty when ``want_ike`` is False: they are counted
    ``ike_unhandled`` instead).
    """
    cdef mmsghdr msgs[VLEN]
    cdef iovec iov[VLEN]
    cdef sockaddr_storage names[VLEN]
    cdef uint64_t ctrl[VLEN][CTRL_WORDS]
    cdef uint8_t bound[16]
    cdef int hdr = _header_len(family)
    cdef int start = batch.headroom
    cdef size_t size = batch.slot_size
    cdef int room, n, k, err
    cdef rx_counts c
    cdef bint have_local = local is not None
    _check_room(batch, hdr)
    _bound(local, family, bound)
    memset(&c, 0, sizeof(c))
    ike = []
    try:
        while batch.count < batch.capacity:
            room = min(batch.capacity - batch.count, VLEN)
            for k in range(room):
                iov[k].iov_base = batch.buf + <size_t> (batch.count + k) * size + start + hdr
                iov[k].iov_len = size - start - hdr
                msgs[k].msg_hdr.msg_name = &names[k]
                msgs[k].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
                msgs[k].msg_hdr.msg_iov = &iov[k]
                msgs[k].msg_hdr.msg_iovlen = 1
                msgs[k].msg_hdr.msg_control = &ctrl[k][0]
                msgs[k].msg_hdr.msg_controllen = sizeof(ctrl[k])
                msgs[k].msg_hdr.msg_flags = 0
                msgs[k].msg_len = 0
            with nogil:
                n = recvmmsg(fd, msgs, room, MSG_DONTWAIT, NULL)
                err = errno
            if n < 0:
                if err == EINTR or err == ECONNREFUSED:  # a queued ICMP error of a send
                    continue
                if err == EAGAIN or err == EWOULDBLOCK:
                    break
                raise OSError(err, strerror(err).decode())
            for k in range(n):
                if msgs[k].msg_hdr.msg_flags & MSG_TRUNC:
                    c.received += 1
                    c.trunc += 1
                    continue
                _datagram(batch, <uint8_t *> iov[k].iov_base, msgs[k].msg_len,
                          &msgs[k].msg_hdr, &names[k], family, bound, have_local, local_port,
                          hdr, &c, ike, want_ike)
            if n < room:   # the kernel found the queue empty (or an error pending)
                break
    finally:
        _add_counts(stats, &c)
    return c.esp, ike


cdef int _check_room(PacketBatch batch, int hdr) except -1:
    if batch.slot_size <= batch.headroom + hdr:
        raise ValueError(f"slot of {batch.slot_size} bytes has no room after headroom "
                         f"{batch.headroom} and {hdr} bytes of outer header")
    return 0


cdef int _bound(local, int family, uint8_t *bound) except -1:
    """The packed bound address into ``bound`` (zeros when None)."""
    cdef const uint8_t[::1] lv
    cdef int alen = 4 if family == AF_INET else 16
    memset(bound, 0, 16)
    if local is not None:
        lv = local
        if lv.shape[0] != alen:
            raise ValueError(f"local address of {lv.shape[0]} bytes for family {family}")
        memcpy(bound, &lv[0], alen)
    return 0


cdef uint32_t _gro_size(msghdr *m) noexcept nogil:
    """The segment size of a coalesced message (the UDP_GRO control message); 0
    when it holds one datagram."""
    cdef cmsghdr *c = CMSG_FIRSTHDR(m)
    cdef int size = 0
    while c != NULL:
        if c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_GRO:
            if c.cmsg_len >= <size_t> (CMSG_DATA(c) - <uint8_t *> c) + sizeof(int):
                memcpy(&size, CMSG_DATA(c), sizeof(int))
        c = CMSG_NXTHDR(m, c)
    return <uint32_t> size if size > 0 else 0


cdef class GroReader:
    """Receiving from a socket with ``UDP_GRO`` on: each message may hold many
    datagrams of one size (the kernel's GRO, or a sender's UDP_SEGMENT arriving
    whole), so messages land in private 64 KiB buffers and are cut into the
    batch's slots; a message the batch cannot take whole is finished in the
    next call.  Otherwise as :func:`recv_batch` (``stats`` adds ``gro``: the
    messages that held more than one datagram)."""
    cdef uint8_t *bufs
    cdef mmsghdr msgs[GRO_MSGS]
    cdef iovec iov[GRO_MSGS]
    cdef sockaddr_storage names[GRO_MSGS]
    cdef uint64_t ctrl[GRO_MSGS][CTRL_WORDS]
    cdef int nmsg, cur
    cdef uint32_t cur_off
    cdef readonly int fd

    def __cinit__(self, int fd):
        self.fd = fd
        self.bufs = <uint8_t *> malloc(<size_t> GRO_MSGS * GRO_BUF)
        if self.bufs == NULL:
            raise MemoryError()
        self.nmsg = self.cur = 0
        self.cur_off = 0

    def __dealloc__(self):
        free(self.bufs)

    @property
    def pending(self):
        """Whether received datagrams wait for the next batch."""
        return self.cur < self.nmsg

    def read(self, PacketBatch batch not None, int family, int local_port, local,
             dict stats not None, bint want_ike=True):
        """Like :func:`recv_batch`: ``(added, ike)``."""
        cdef uint8_t bound[16]
        cdef int hdr = _header_len(family)
        cdef int n, k, err
        cdef uint32_t length, seg, off, piece
        cdef rx_counts c
        cdef bint have_local = local is not None
        cdef bint more = True
        cdef msghdr *m
        _check_room(batch, hdr)
        _bound(local, family, bound)
        memset(&c, 0, sizeof(c))
        ike = []
        try:
            while True:
                while self.cur < self.nmsg and batch.count < batch.capacity:
                    m = &self.msgs[self.cur].msg_hdr
                    length = self.msgs[self.cur].msg_len
                    if m.msg_flags & MSG_TRUNC:
                        c.received += 1
                        c.trunc += 1
                        self.cur += 1
                        continue
                    seg = _gro_size(m)
                    if length == 0:    # an empty datagram is one datagram still
                        _datagram(batch, self.bufs + <size_t> self.cur * GRO_BUF, 0, m,
                                  &self.names[self.cur], family, bound, have_local,
                                  local_port, hdr, &c, ike, want_ike)
                        self.cur += 1
                        continue
                    if seg == 0 or seg > length:
                        seg = length
                    if self.cur_off == 0 and seg < length:
                        c.gro += 1
                    off = self.cur_off
                    while off < length and batch.count < batch.capacity:
                        piece = seg if length - off > seg else length - off
                        if piece > batch.slot_size - batch.headroom - hdr:
                            c.received += 1
                            c.trunc += 1
                        else:
                            _datagram(batch, self.bufs + <size_t> self.cur * GRO_BUF + off,
                                      piece, m, &self.names[self.cur], family, bound,
                                      have_local, local_port, hdr, &c, ike, want_ike)
                        off += piece
                    if off < length:
                        self.cur_off = off      # the batch is full: the rest next time
                        break
                    self.cur += 1
                    self.cur_off = 0
                if batch.count >= batch.capacity or not more:
                    break
                for k in range(GRO_MSGS):
                    self.iov[k].iov_base = self.bufs + <size_t> k * GRO_BUF
                    self.iov[k].iov_len = GRO_BUF
                    self.msgs[k].msg_hdr.msg_name = &self.names[k]
                    self.msgs[k].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
                    self.msgs[k].msg_hdr.msg_iov = &self.iov[k]
                    self.msgs[k].msg_hdr.msg_iovlen = 1
                    self.msgs[k].msg_hdr.msg_control = &self.ctrl[k][0]
                    self.msgs[k].msg_hdr.msg_controllen = sizeof(self.ctrl[k])
                    self.msgs[k].msg_hdr.msg_flags = 0
                    self.msgs[k].msg_len = 0
                with nogil:
                    n = recvmmsg(self.fd, self.msgs, GRO_MSGS, MSG_DONTWAIT, NULL)
                    err = errno
                self.nmsg = self.cur = 0
                self.cur_off = 0
                if n < 0:
                    if err == EINTR or err == ECONNREFUSED:
                        continue
                    if err == EAGAIN or err == EWOULDBLOCK:
                        break
                    raise OSError(err, strerror(err).decode())
                self.nmsg = n
                more = n == GRO_MSGS   # fewer: the queue was empty
        finally:
            _add_counts(stats, &c)
        return c.esp, ike


def enable_gro(int fd) -> bool:
    """Turn UDP_GRO on for ``fd``; False where the kernel refuses it."""
    cdef int one = 1
    return setsockopt(fd, SOL_UDP, UDP_GRO, &one, sizeof(one)) == 0


cdef bint _parse_outer(const uint8_t *slot, uint32_t off, uint32_t length, size_t size,
                       int family, sockaddr_storage *name, iovec *iov) noexcept nogil:
    """Destination and UDP payload of the whole packet at ``slot + off``, as
    ``espdp.io._datagram.parse_outer`` reads them; False when it is not IP +
    UDP of ``family`` (or does not fit its slot)."""
    cdef const uint8_t *p = slot + off
    cdef uint32_t ihl
    cdef sockaddr_in *a4
    cdef sockaddr_in6 *a6
    if length < 28 or <size_t> off + length > size:
        return False
    if p[0] >> 4 == 4 and family == AF_INET:
        ihl = (p[0] & 0x0F) * 4
        if ihl < 20 or p[9] != 17 or length < ihl + 8:
            return False
        memset(name, 0, sizeof(sockaddr_in))
        a4 = <sockaddr_in *> name
        a4.sin_family = AF_INET
        memcpy(&a4.sin_addr, p + 16, 4)
        a4.sin_port = htons(rd16(p + ihl + 2))
    elif p[0] >> 4 == 6 and family == AF_INET6:
        if length < 48 or p[6] != 17:
            return False
        ihl = 40
        memset(name, 0, sizeof(sockaddr_in6))
        a6 = <sockaddr_in6 *> name
        a6.sin6_family = AF_INET6
        memcpy(&a6.sin6_addr, p + 24, 16)
        a6.sin6_port = htons(rd16(p + 42))
    else:
        return False
    iov.iov_base = <void *> (p + ihl + 8)
    iov.iov_len = length - ihl - 8
    return True


cdef int _group(mmsghdr *msgs, iovec *iov, sockaddr_storage *names, int n,
                socklen_t namelen, uint16_t *seg, uint64_t (*ctrl)[4], bint gso) noexcept nogil:
    """Point ``msgs`` at the ``n`` prepared datagrams; with ``gso``, runs of datagrams
    of one size to one peer (the last of a run may be shorter) share a message with
    a UDP_SEGMENT control message.  ``seg[g]`` is message g's datagram count.
    Returns the number of messages."""
    cdef int k = 0, g = 0, first, count
    cdef size_t size, total
    cdef uint16_t gso_size
    cdef cmsghdr *c
    while k < n:
        first, count = k, 1
        size, total = iov[k].iov_len, iov[k].iov_len
        k += 1
        while (gso and k < n and count < GSO_SEGS and total + iov[k].iov_len <= GSO_BYTES
               and iov[k - 1].iov_len == size and iov[k].iov_len <= size
               and memcmp(&names[k], &names[first], namelen) == 0):
            total += iov[k].iov_len
            count += 1
            k += 1
        msgs[g].msg_hdr.msg_name = &names[first]
        msgs[g].msg_hdr.msg_namelen = namelen
        msgs[g].msg_hdr.msg_iov = &iov[first]
        msgs[g].msg_hdr.msg_iovlen = count
        msgs[g].msg_hdr.msg_flags = 0
        msgs[g].msg_hdr.msg_control = NULL
        msgs[g].msg_hdr.msg_controllen = 0
        if count > 1:
            msgs[g].msg_hdr.msg_control = &ctrl[g][0]
            msgs[g].msg_hdr.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
            c = CMSG_FIRSTHDR(&msgs[g].msg_hdr)
            c.cmsg_level = SOL_UDP
            c.cmsg_type = UDP_SEGMENT
            c.cmsg_len = CMSG_LEN(sizeof(uint16_t))
            gso_size = <uint16_t> size
            memcpy(CMSG_DATA(c), &gso_size, sizeof(uint16_t))
        seg[g] = count
        g += 1
    return g


cdef int _flush(int fd, mmsghdr *msgs, iovec *iov, sockaddr_storage *names, int n,
                socklen_t namelen, uint64_t *counts, bint *gso) noexcept nogil:
    """Send ``n`` prepared datagrams; 0, or an errno that is not a per-message one.
    ``*gso`` is cleared, and the datagrams sent one by one, when the kernel
    refuses UDP_SEGMENT (EIO, EINVAL on a grouped message)."""
    cdef int r, done = 0, err, nmsg
    cdef uint16_t seg[VLEN]
    cdef uint64_t ctrl[VLEN][4]       # CMSG_SPACE(2) is 24 bytes on 64-bit Linux
    cdef int k
    nmsg = _group(msgs, iov, names, n, namelen, seg, ctrl, gso[0])
    while done < nmsg:
        r = sendmmsg(fd, msgs + done, nmsg - done, MSG_DONTWAIT)
        if r > 0:
            for k in range(done, done + r):
                counts[C_SENT] += seg[k]
            done += r
            continue
        err = errno if r < 0 else EAGAIN
        if err == EINTR:
            continue
        if err == EAGAIN or err == EWOULDBLOCK:
            for k in range(done, nmsg):
                counts[C_DROPPED] += seg[k]
            return 0
        if seg[done] > 1 and (err == EIO or err == EINVAL):
            gso[0] = False       # no UDP GSO here: the rest one datagram a message
            k = <int> (msgs[done].msg_hdr.msg_iov - iov)
            return _flush(fd, msgs, iov + k, names + k, n - k, namelen, counts, gso)
        if (err == ECONNREFUSED or err == ENETUNREACH or err == EHOSTUNREACH
                or err == EMSGSIZE or err == EINVAL or err == EPERM or err == EACCES):
            counts[C_ERRORS] += seg[done]  # this message; go on with the next
            done += 1
            continue
        return err
    return 0


def send_batch(int fd, PacketBatch batch not None, indexes, int family, dict stats not None,
               uint32_t mark, bint gso=False):
    """Send the UDP payload of the slots ``indexes`` (all when None); see the module
    docstring.  ``mark`` is the socket's current ``SO_MARK``; with ``gso``, runs of
    equal-sized datagrams to one peer go out as one UDP_SEGMENT message each.
    Returns ``(sent, mark, gso)``: the socket's mark afterwards, and False for
    ``gso`` when the kernel refused it.  Raises PermissionError when ``SO_MARK``
    cannot be set (after counting what was sent).
    """
    cdef mmsghdr msgs[VLEN]
    cdef iovec iov[VLEN]
    cdef sockaddr_storage names[VLEN]
    cdef uint64_t counts[3]
    cdef uint64_t bad = 0
    cdef int n = 0, err = 0, i
    cdef uint32_t m
    cdef size_t size = batch.slot_size
    cdef socklen_t namelen
    _header_len(family)
    namelen = sizeof(sockaddr_in) if family == AF_INET else sizeof(sockaddr_in6)
    counts[0] = counts[1] = counts[2] = 0
    try:
        for idx in (range(batch.count) if indexes is None else indexes):
            i = idx
            if not 0 <= i < batch.capacity:
                raise IndexError(f"slot {i} of a batch of {batch.capacity}")
            if not _parse_outer(batch.buf + <size_t> i * size, batch.off_p[i], batch.len_p[i],
                                size, family, &names[n], &iov[n]):
                bad += 1
                continue
            m = batch.mark_p[i]
            if m != mark:
                if n:
                    with nogil:
                        err = _flush(fd, msgs, iov, names, n, namelen, counts, &gso)
                    if err:
                        raise OSError(err, strerror(err).decode())
                    names[0] = names[n]
                    iov[0] = iov[n]
                    n = 0
                if setsockopt(fd, SOL_SOCKET, SO_MARK, &m, sizeof(m)) != 0:
                    err = errno
                    raise OSError(err, strerror(err).decode())
                mark = m
            n += 1
            if n == VLEN:
                with nogil:
                    err = _flush(fd, msgs, iov, names, n, namelen, counts, &gso)
                n = 0
                if err:
                    raise OSError(err, strerror(err).decode())
        if n:
            with nogil:
                err = _flush(fd, msgs, iov, names, n, namelen, counts, &gso)
            if err:
                raise OSError(err, strerror(err).decode())
    finally:
        stats["sent"] += counts[C_SENT]
        stats["send_errors"] += counts[C_ERRORS]
        stats["dropped"] += counts[C_DROPPED]
        stats["bad_outer"] += bad
    return counts[C_SENT], mark, gso


# ---------------------------------------------------------------- TUN

def tun_read_batch(int fd, PacketBatch batch not None, dict stats not None) -> int:
    """Read packets from a non-blocking TUN fd into slots ``batch.count..`` (each at
    the headroom) until EAGAIN or the batch is full, with the GIL released; the
    number added.  A packet that fills the whole room may have been cut by the
    kernel: counted ``truncated`` and dropped.  An error other than EAGAIN/EINTR
    is raised only when nothing was read (what was read is never lost)."""
    cdef int start = batch.headroom, i, err = 0
    cdef size_t room = batch.slot_size - batch.headroom
    cdef ssize_t n
    cdef uint8_t *slot
    cdef uint64_t added = 0, trunc = 0
    with nogil:
        while batch.count < batch.capacity:
            i = batch.count
            slot = batch.buf + <size_t> i * batch.slot_size
            n = read(fd, slot + start, room)
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
            if <size_t> n >= room:
                trunc += 1
                continue
            batch.off_p[i] = start
            batch.len_p[i] = <uint32_t> n
            batch.mark_p[i] = 0
            batch.sa_p[i] = -1
            batch.count = i + 1
            added += 1
    stats["received"] += added
    if trunc:
        stats["truncated"] = stats.get("truncated", 0) + trunc
    if err and not added:
        raise OSError(err, strerror(err).decode())
    return added


def tun_write_batch(int fd, PacketBatch batch not None, indexes, dict stats not None) -> int:
    """Write each given slot's packet (all slots when ``indexes`` is None), with
    the GIL released; the number written.  EAGAIN (the queue is full) counts the
    rest ``dropped``; EINVAL, EIO, EFAULT or ENOMEM for one packet counts it in
    ``send_errors`` and goes on, as does a slot whose offset + length do not fit
    in it (nothing is read outside the slot)."""
    cdef int k, m, i, j, err
    cdef ssize_t n
    cdef uint64_t sent = 0, dropped = 0, errors = 0
    cdef int[64] idx
    cdef size_t size = batch.slot_size
    cdef object it = range(batch.count) if indexes is None else indexes
    chunk = []
    for value in it:
        i = value
        if not 0 <= i < batch.count:
            raise IndexError(f"slot {i} of a batch of {batch.count}")
        if <size_t> batch.off_p[i] + batch.len_p[i] > size:
            errors += 1
            continue
        chunk.append(i)
    k = 0
    while k < len(chunk):
        m = 0
        while m < 64 and k + m < len(chunk):
            idx[m] = chunk[k + m]
            m += 1
        with nogil:
            j = 0
            while j < m:
                i = idx[j]
                n = write(fd, batch.buf + <size_t> i * batch.slot_size + batch.off_p[i],
                          batch.len_p[i])
                if n < 0:
                    err = errno
                    if err == EINTR:
                        continue
                    if err == EAGAIN or err == EWOULDBLOCK:
                        dropped += m - j
                        break
                    errors += 1      # this packet (EINVAL, EIO, ...): go on
                else:
                    sent += 1
                j += 1
        k += m
        if dropped:
            dropped += len(chunk) - k
            break
    stats["sent"] += sent
    stats["dropped"] += dropped
    stats["send_errors"] += errors
    return sent

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""ESP output and input for one packet in a buffer slot, in place (RFC 4303).

A slot holds one packet at ``off`` with free room on both sides.  Output
grows it in both directions; input shrinks it to the inner packet::

    output, tunnel mode:
      [headroom ............][inner IP packet][tailroom ..................]
      [outer IP][UDP][SPI|seq][IV][inner IP packet][TFC][pad][pl][nh][ICV]
    output, transport mode: the IP header (IPv6: up to and including the
    routing header) moves down to make room, its next header becomes 50/17:
      [IP hdr][UDP][SPI|seq][IV][upper-layer payload][pad][pl][nh][ICV]

UDP encapsulation (RFC 3948) puts an 8-byte UDP header before ESP: checksum
0 over IPv4, the full checksum over IPv6 (a computed 0 is sent as 0xFFFF).
ECN and DSCP cross the tunnel as RFC 6040 (normal mode) says, subject to the
SA flags noecn, decap-dscp and dont-encap-dscp.
"""

from libc.string cimport memcmp, memcpy, memmove, memset
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from espdp._crypto cimport esp_open, esp_seal, CIPHER_AES_CBC
from espdp._atomic cimport (espdp_add64, espdp_cas64, espdp_first, espdp_load64,
                            espdp_lock, espdp_unlock)
from espdp._inet cimport csum_fold, csum_partial, rd16, rd32, wr16, wr32
from espdp._replay cimport (REPLAY_DUPLICATE, REPLAY_OK, REPLAY_SEQ_ZERO, ReplayResult,
                            replay_advance, replay_check)

cdef enum:
    PROTO_HOPOPTS = 0
    PROTO_IPIP = 4
    PROTO_UDP = 17
    PROTO_IPV6 = 41
    PROTO_ROUTING = 43
    PROTO_FRAGMENT = 44
    PROTO_ESP = 50
    PROTO_NONE = 59
    PROTO_DSTOPTS = 60
    ECN_MASK = 3
    ECN_NOT_ECT = 0
    ECN_ECT1 = 1
    ECN_ECT0 = 2
    ECN_CE = 3
    MAX_EXT_HEADERS = 8


# ---------------------------------------------------------------- headers

cdef inline uint8_t _tos(const uint8_t *ip) noexcept nogil:
    if ip[0] >> 4 == 4:
        return ip[1]
    return ((ip[0] & 0x0F) << 4) | (ip[1] >> 4)


cdef inline void _ipv4_checksum(uint8_t *ip) noexcept nogil:
    wr16(ip + 10, 0)
    wr16(ip + 10, csum_fold(csum_partial(ip, (ip[0] & 0x0F) * 4, 0)))


cdef inline void _set_tos(uint8_t *ip, uint8_t tos) noexcept nogil:
    if ip[0] >> 4 == 4:
        ip[1] = tos
        _ipv4_checksum(ip)
    else:
        ip[0] = 0x60 | (tos >> 4)
        ip[1] = ((tos & 0x0F) << 4) | (ip[1] & 0x0F)


cdef inline uint32_t _ip_length(const uint8_t *p, uint32_t n) noexcept nogil:
    """Length of the IP packet at p as its header says; 0 when it is not a sane one."""
    cdef uint32_t total
    if n >= 20 and p[0] >> 4 == 4:
        total = rd16(p + 2)
        if (p[0] & 0x0F) >= 5 and (p[0] & 0x0F) * 4u <= total <= n:
            return total
    elif n >= 40 and p[0] >> 4 == 6:
        total = 40 + rd16(p + 4)
        if total <= n:
            return total
    return 0


cdef uint32_t _ipv6_esp_offset(const uint8_t *p, uint32_t total, uint32_t *nh_field) noexcept nogil:
    """Where ESP goes in an IPv6 packet in transport mode (RFC 4303 3.1.1):
    after hop-by-hop, routing, and destination options that precede a
    routing header.  0 when the chain is malformed."""
    cdef uint32_t off = 40
    cdef uint8_t nh = p[6]
    cdef int _k
    nh_field[0] = 6
    for _k in range(MAX_EXT_HEADERS):
        if off + 8 > total:
            return off if nh != PROTO_HOPOPTS and nh != PROTO_ROUTING else 0
        if nh == PROTO_DSTOPTS and p[off] != PROTO_ROUTING:
            return off
        if nh != PROTO_HOPOPTS and nh != PROTO_ROUTING and nh != PROTO_DSTOPTS:
            return off
        nh_field[0] = off
        nh = p[off]
        off += (p[off + 1] + 1) * 8
        if off > total:
            return 0
    return 0


cdef Verdict parse_outer(const uint8_t *p, uint32_t n, outer_info *o) noexcept nogil:
    cdef uint32_t off, ulen, payload
    cdef uint8_t proto
    cdef int _k
    o.total = _ip_length(p, n)
    if o.total == 0:
        return V_MALFORMED
    o.tos = _tos(p)
    if p[0] >> 4 == 4:
        o.family = 4
        if rd16(p + 6) & 0x3FFF:
            return V_FRAGMENT
        off = (p[0] & 0x0F) * 4
        proto = p[9]
        o.nh_field = 9
        o.src = 12
        o.dst = 16
    else:
        o.family = 6
        o.src = 8
        o.dst = 24
        off = 40
        proto = p[6]
        o.nh_field = 6
        for _k in range(MAX_EXT_HEADERS):
            if proto != PROTO_HOPOPTS and proto != PROTO_ROUTING and proto != PROTO_DSTOPTS:
                break
            if off + 8 > o.total:
                return V_MALFORMED
            o.nh_field = off
            proto = p[off]
            off += (p[off + 1] + 1) * 8
            if off > o.total:
                return V_MALFORMED
        if proto == PROTO_FRAGMENT:
            # RFC 6946: an atomic fragment (offset 0, M clear) is processed as is.
            if off + 8 > o.total or rd16(p + off + 2) & 0xFFF9 != 0:
                return V_FRAGMENT
            o.nh_field = off
            proto = p[off]
            off += 8
    o.ip_len = off
    o.udp = proto == PROTO_UDP
    if proto == PROTO_UDP:
        if off + 8 > o.total:
            return V_MALFORMED
        ulen = rd16(p + off + 4)
        if ulen < 8 or off + ulen > o.total:
            return V_MALFORMED
        o.total = off + ulen
        o.sport = rd16(p + off)
        o.dport = rd16(p + off + 2)
        payload = off + 8
        if ulen == 9 and p[payload] == 0xFF:
            return V_KEEPALIVE
        if ulen >= 12 and rd32(p + payload) == 0:
            return V_NON_ESP
        off = payload
    elif proto != PROTO_ESP:
        return V_NOT_ESP
    if o.total - off < 8:
        return V_MALFORMED
    o.esp = off
    return V_OK


cdef const uint8_t *_final_destination(const uint8_t *ip, uint32_t hdr_len) noexcept nogil:
    """RFC 8200 8.1: the pseudo header names the final destination, which a
    routing header with segments left carries (type 0/2: its last address;
    type 4, SRv6: segment list[0])."""
    cdef uint32_t off = 40
    cdef uint8_t nh = ip[6]
    while off + 8 <= hdr_len and (nh == PROTO_HOPOPTS or nh == PROTO_ROUTING or
                                  nh == PROTO_DSTOPTS):
        if nh == PROTO_ROUTING and ip[off + 3] > 0 and ip[off + 1] >= 2:
            if ip[off + 2] == 4:
                return ip + off + 8
            if ip[off + 2] in (0, 2):
                return ip + off + (ip[off + 1] + 1) * 8 - 16
        nh = ip[off]
        off += (ip[off + 1] + 1) * 8
    return ip + 24


cdef void _udp_header(uint8_t *udp, const sa_core *sa, uint32_t length,
                      const uint8_t *ip, uint32_t hdr_len) noexcept nogil:
    cdef uint64_t acc
    cdef uint16_t check
    wr16(udp, sa.sport)
    wr16(udp + 2, sa.dport)
    wr16(udp + 4, length)
    wr16(udp + 6, 0)
    if sa.family == 6:
        # RFC 8200 8.1: the checksum is mandatory; pseudo header + UDP datagram.
        acc = csum_partial(ip + 8, 16, 0)
        acc = csum_partial(_final_destination(ip, hdr_len), 16, acc)
        acc += length + PROTO_UDP
        check = csum_fold(csum_partial(udp, length, acc))
        wr16(udp + 6, check if check != 0 else 0xFFFF)


# ---------------------------------------------------------------- output

cdef inline uint8_t _encap_tos(const sa_core *sa, uint8_t inner) noexcept nogil:
    cdef uint8_t dscp = 0 if sa.extra_flags & XFRM_XFLAG_DONT_ENCAP_DSCP else inner & ~ECN_MASK
    cdef uint8_t ecn = 0 if sa.flags & XFRM_NOECN else inner & ECN_MASK
    return dscp | ecn


cdef inline bint _inner_df(const sa_core *sa, const uint8_t *inner) noexcept nogil:
    # nopmtudisc clears DF; otherwise an IPv4 packet's DF is copied and IPv6
    # (never fragmented on the way) sets it.
    if sa.flags & XFRM_NOPMTUDISC:
        return False
    if inner[0] >> 4 == 4:
        return (inner[6] & 0x40) != 0
    return True


cdef void _outer_header(sa_core *sa, uint8_t *ip, uint32_t total, uint8_t proto,
                        uint8_t tos, bint df) noexcept nogil:
    if sa.family == 4:
        ip[0] = 0x45
        ip[1] = tos
        wr16(ip + 2, total)
        wr16(ip + 4, sa.ip_id)
        sa.ip_id += 1
        wr16(ip + 6, 0x4000 if df else 0)
        ip[8] = sa.ttl
        ip[9] = proto
        memcpy(ip + 12, sa.src, 4)
        memcpy(ip + 16, sa.dst, 4)
        _ipv4_checksum(ip)
    else:
        wr32(ip, 0x60000000 | (<uint32_t> tos << 20))
        wr16(ip + 4, total - 40)
        ip[6] = proto
        ip[7] = sa.ttl
        memcpy(ip + 8, sa.src, 16)
        memcpy(ip + 24, sa.dst, 16)


cdef inline bint _next_seq(sa_core *sa, uint64_t *seq) noexcept nogil:
    """Reserve the next outbound sequence number, atomically (workers share the
    SA: each number goes to exactly one packet); False when it would wrap."""
    cdef uint64_t limit = 0xFFFFFFFFFFFFFFFF if sa.esn else 0xFFFFFFFF
    cdef uint64_t cur = espdp_load64(&sa.oseq), nxt
    while True:
        if cur >= limit:
            if not sa.extra_flags & XFRM_XFLAG_OSEQ_MAY_WRAP:
                return False
            nxt = 0
        else:
            nxt = cur + 1
        if sa.nwxf == 0:     # no contexts for other workers: one thread, a plain store
            sa.oseq = nxt
            seq[0] = nxt
            return True
        if espdp_cas64(&sa.oseq, &cur, nxt):   # on failure cur is reloaded
            seq[0] = nxt
            return True


cdef inline transform *_xf(sa_core *sa, int worker) noexcept nogil:
    if worker == 0:
        return &sa.xf
    if 0 < worker <= sa.nwxf:
        return &sa.wxf[worker - 1]
    return NULL


cdef void sa_count_drop(sa_core *sa, Verdict v) noexcept nogil:
    if sa.nwxf == 0:
        sa.stats.drops[<int> v] += 1
    else:
        espdp_add64(&sa.stats.drops[<int> v], 1)


cdef inline bint _limits_ok(sa_core *sa, uint8_t *flags) noexcept nogil:
    """XFRM's xfrm_state_check_expire: the limits are compared with the counts
    *before* this packet, so a hard limit of N lets N packets through and a
    soft limit of N is reported with packet N + 1 (a limit of 0: at once)."""
    cdef uint64_t packets = espdp_load64(&sa.stats.packets)
    cdef uint64_t nbytes = espdp_load64(&sa.stats.bytes)
    if packets >= sa.hard_packets or nbytes >= sa.hard_bytes:
        return False
    if (not sa.soft_fired and (packets >= sa.soft_packets or nbytes >= sa.soft_bytes)
            and espdp_first(&sa.soft_fired)):
        flags[0] |= F_SOFT_EXPIRED
    return True


cdef inline void _count(sa_core *sa, uint32_t nbytes) noexcept nogil:
    # An SA with no contexts for other workers is used by one thread: plain adds
    # (the atomic ones cost a few percent of a small packet).
    if sa.nwxf == 0:
        sa.stats.packets += 1
        sa.stats.bytes += nbytes
    else:
        espdp_add64(&sa.stats.packets, 1)
        espdp_add64(&sa.stats.bytes, nbytes)


cdef Verdict esp_output(sa_core *sa, int worker, uint8_t *slot, uint32_t slot_size,
                        uint32_t *off, uint32_t *length, uint32_t *mark,
                        uint8_t *flags) noexcept nogil:
    cdef transform *xf = _xf(sa, worker)
    cdef Verdict v = (_output(sa, xf, slot, slot_size, off, length, mark, flags)
                      if xf != NULL else V_CRYPTO_ERROR)
    if v != V_OK:
        sa_count_drop(sa, v)
    return v


cdef Verdict _output(sa_core *sa, transform *xf, uint8_t *slot, uint32_t slot_size,
                     uint32_t *off, uint32_t *length, uint32_t *mark,
                     uint8_t *flags) noexcept nogil:
    cdef uint8_t *p = slot + off[0]
    cdef uint32_t n = _ip_length(p, length[0])
    cdef uint32_t hdr_len = 0, nh_field = 0, payload_len, tfc = 0, pad, text_len
    cdef uint32_t udp_len = 8 if sa.encap else 0, outer_len, total, k
    cdef uint8_t nh, outer_tos
    cdef bint df
    cdef uint64_t seq
    cdef uint8_t *payload
    cdef uint8_t *start
    cdef uint8_t *esp
    if sa.dead:
        return V_NO_SA
    if n == 0:
        return V_MALFORMED
    if sa.dir == DIR_IN:
        return V_WRONG_DIR
    if sa.tunnel:
        payload = p
        payload_len = n
        nh = PROTO_IPIP if p[0] >> 4 == 4 else PROTO_IPV6
        outer_len = 20 if sa.family == 4 else 40
        if sa.tfcpad > n:
            tfc = sa.tfcpad - n
    else:
        if p[0] >> 4 != sa.family:
            return V_BAD_INNER
        if sa.family == 4:
            hdr_len = (p[0] & 0x0F) * 4
            nh_field = 9
        else:
            hdr_len = _ipv6_esp_offset(p, n, &nh_field)
            if hdr_len == 0:
                return V_MALFORMED
        nh = p[nh_field]
        payload = p + hdr_len
        payload_len = n - hdr_len
        outer_len = hdr_len
    pad = (sa.xf.align - (payload_len + tfc + 2) % sa.xf.align) % sa.xf.align
    text_len = payload_len + tfc + pad + 2
    esp = payload - 8 - sa.xf.iv_len
    start = esp - udp_len - outer_len
    total = outer_len + udp_len + 8 + sa.xf.iv_len + text_len + sa.xf.icv_len
    if (start < slot or total > 0xFFFF or
            <uint32_t> (payload - slot) + text_len + sa.xf.icv_len > slot_size):
        return V_TOO_BIG
    if not _limits_ok(sa, flags):
        return V_LIMIT
    if not _next_seq(sa, &seq):
        return V_SEQ_OVERFLOW
    # The inner header is about to be encrypted: take what the outer one copies.
    outer_tos = _encap_tos(sa, _tos(p))
    df = _inner_df(sa, p)
    if not sa.tunnel:
        memmove(start, p, hdr_len)   # moves down: the regions may overlap
    # trailer: TFC padding (zeros), padding 1, 2, 3, ..., pad length, next header
    memset(payload + payload_len, 0, tfc)
    for k in range(pad):
        payload[payload_len + tfc + k] = k + 1
    payload[text_len - 2] = pad
    payload[text_len - 1] = nh
    wr32(esp, sa.spi)
    wr32(esp + 4, <uint32_t> seq)
    if esp_seal(xf, esp, text_len, seq, sa.esn) != 0:
        return V_CRYPTO_ERROR
    if sa.tunnel:
        _outer_header(sa, start, total, PROTO_UDP if sa.encap else PROTO_ESP, outer_tos, df)
    else:
        start[nh_field] = PROTO_UDP if sa.encap else PROTO_ESP
        if sa.family == 4:
            wr16(start + 2, total)
            _ipv4_checksum(start)
        else:
            wr16(start + 4, total - 40)
    if sa.encap:
        _udp_header(start + outer_len, sa, total - outer_len, start, outer_len)
    _count(sa, n)
    if sa.has_set_mark:
        mark[0] = (mark[0] & ~sa.set_mark_m) | (sa.set_mark_v & sa.set_mark_m)
    off[0] = <uint32_t> (start - slot)
    length[0] = total
    return V_OK


# ---------------------------------------------------------------- input

cdef inline Verdict _replay_verdict(ReplayResult r) noexcept nogil:
    if r == REPLAY_OK:
        return V_OK
    if r == REPLAY_DUPLICATE:
        return V_REPLAY
    if r == REPLAY_SEQ_ZERO:
        return V_SEQ_ZERO
    return V_REPLAY_WINDOW


cdef Verdict _decap_ecn(const sa_core *sa, uint8_t outer_tos, uint8_t *inner) noexcept nogil:
    # RFC 6040 section 4.2, normal mode; decap-dscp copies the outer DSCP in.
    cdef uint8_t tos = _tos(inner)
    cdef uint8_t new = tos
    cdef uint8_t outer_ecn = outer_tos & ECN_MASK
    if not sa.flags & XFRM_NOECN:
        if outer_ecn == ECN_CE:
            if tos & ECN_MASK == ECN_NOT_ECT:
                return V_ECN_DROP
            new = (new & ~ECN_MASK) | ECN_CE
        elif outer_ecn == ECN_ECT1 and tos & ECN_MASK == ECN_ECT0:
            new = (new & ~ECN_MASK) | ECN_ECT1
    if sa.flags & XFRM_DECAP_DSCP:
        new = (outer_tos & ~ECN_MASK) | (new & ECN_MASK)
    if new != tos:
        _set_tos(inner, new)
    return V_OK


cdef Verdict _check_trailer(const uint8_t *text, uint32_t text_len,
                            uint32_t *payload_len) noexcept nogil:
    cdef uint32_t pad = text[text_len - 2], k
    if pad + 2 > text_len:
        return V_BAD_PADDING
    for k in range(pad):
        if text[text_len - 2 - pad + k] != k + 1:
            return V_BAD_PADDING
    payload_len[0] = text_len - 2 - pad
    return V_OK


cdef inline Verdict _drop(sa_core *sa, Verdict v) noexcept nogil:
    sa_count_drop(sa, v)
    return v


cdef inline Verdict _replay(sa_core *sa, uint32_t seq_lo, uint64_t *seq,
                            bint advance) noexcept nogil:
    """The replay check (and with ``advance``, the window's update) under the
    SA's lock: workers decrypting packets of one SA at once see one window."""
    cdef Verdict v
    cdef bint shared = sa.nwxf != 0
    if shared:
        espdp_lock(&sa.replay_lock)
    v = _replay_verdict(replay_check(&sa.replay, seq_lo, seq))
    if v == V_OK and advance:
        replay_advance(&sa.replay, seq[0])
    if shared:
        espdp_unlock(&sa.replay_lock)
    return v


cdef Verdict esp_input(sa_core *sa, int worker, const outer_info *o, uint8_t *slot,
                       uint32_t *off, uint32_t *length, uint32_t *mark,
                       uint8_t *flags) noexcept nogil:
    cdef transform *xf = _xf(sa, worker)
    cdef uint8_t *p = slot + off[0]
    cdef uint8_t *esp = p + o.esp
    cdef uint8_t *text = esp + 8 + sa.xf.iv_len
    cdef int64_t text_len = <int64_t> o.total - o.esp - 8 - sa.xf.iv_len - sa.xf.icv_len
    cdef uint32_t payload_len = 0, inner_len, alen = 4 if o.family == 4 else 16
    cdef uint64_t seq = 0
    cdef uint8_t nh
    cdef uint8_t *start
    cdef Verdict v
    if sa.dir == DIR_OUT:
        return _drop(sa, V_WRONG_DIR)
    if sa.encap != o.udp:
        return _drop(sa, V_ENCAP_MISMATCH)
    if xf == NULL:
        return _drop(sa, V_CRYPTO_ERROR)
    if text_len < 2 or (sa.xf.cipher == CIPHER_AES_CBC and text_len % 16 != 0):
        return _drop(sa, V_MALFORMED)
    if not _limits_ok(sa, flags):
        return _drop(sa, V_LIMIT)
    v = _replay(sa, rd32(esp + 4), &seq, False)
    if v != V_OK:
        return _drop(sa, v)
    if esp_open(xf, esp, <size_t> text_len, seq, sa.esn) != 0:
        return _drop(sa, V_INTEGRITY)
    v = _replay(sa, rd32(esp + 4), &seq, True)   # another worker may have taken it since
    if v != V_OK:
        return _drop(sa, v)
    v = _check_trailer(text, <uint32_t> text_len, &payload_len)
    if v != V_OK:
        return _drop(sa, v)
    nh = text[text_len - 1]
    if sa.has_set_mark:
        mark[0] = (mark[0] & ~sa.set_mark_m) | (sa.set_mark_v & sa.set_mark_m)
    if sa.encap and (memcmp(p + o.src, sa.src, alen) != 0 or o.sport != sa.sport):
        flags[0] |= F_MAPPING
    if nh == PROTO_NONE:
        _count(sa, payload_len)
        return _drop(sa, V_DUMMY)
    if sa.tunnel:
        # The inner length drops TFC padding (RFC 4303 2.7).
        inner_len = _ip_length(text, payload_len)
        if inner_len == 0 or (nh != PROTO_IPIP and nh != PROTO_IPV6) or \
                (text[0] >> 4 == 4) != (nh == PROTO_IPIP):
            return _drop(sa, V_BAD_INNER)
        v = _decap_ecn(sa, o.tos, text)
        if v != V_OK:
            return _drop(sa, v)
        _count(sa, inner_len)
        off[0] = <uint32_t> (text - slot)
        length[0] = inner_len
        return V_OK
    # Transport: the IP header chain moves up to the payload, next header restored.
    start = text - o.ip_len
    memmove(start, p, o.ip_len)
    start[o.nh_field] = nh
    if o.family == 4:
        wr16(start + 2, o.ip_len + payload_len)
        _ipv4_checksum(start)
    else:
        wr16(start + 4, o.ip_len - 40 + payload_len)
    _count(sa, o.ip_len + payload_len)
    off[0] = <uint32_t> (start - slot)
    length[0] = o.ip_len + payload_len
    return V_OK

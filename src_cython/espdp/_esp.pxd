# ESP packet processing (RFC 4303, RFC 3948): per-SA state and the per-packet
# functions.  Everything here is C data and nogil code; the Python classes
# that own it are in _engine.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from espdp._crypto cimport transform
from espdp._replay cimport replay_state

# What became of a packet; also the index of the per-SA drop counters.
cdef enum Verdict:
    V_OK = 0
    V_DUMMY = 1            # next header 59: authenticated, then dropped
    V_KEEPALIVE = 2        # RFC 3948 NAT keepalive (0xFF)
    V_NON_ESP = 3          # RFC 3948 non-ESP marker: IKE, for whoever owns it
    V_NOT_ESP = 4          # neither ESP nor UDP
    V_MALFORMED = 5
    V_FRAGMENT = 6         # outer fragments are reassembled by the kernel, not here
    V_NO_SA = 7
    V_ENCAP_MISMATCH = 8   # SA with encap got raw ESP, or the other way round
    V_LIMIT = 9            # hard byte/packet limit reached
    V_SEQ_ZERO = 10
    V_REPLAY = 11          # duplicate: XFRM stats.replay
    V_REPLAY_WINDOW = 12   # too old: XFRM stats.replay_window
    V_INTEGRITY = 13       # ICV mismatch: XFRM stats.integrity_failed
    V_BAD_PADDING = 14
    V_BAD_INNER = 15       # inner packet does not match next header or length
    V_ECN_DROP = 16        # RFC 6040: outer CE over a Not-ECT inner packet
    V_SEQ_OVERFLOW = 17    # outbound sequence number would wrap
    V_TOO_BIG = 18         # no headroom or tailroom left in the buffer slot
    V_CRYPTO_ERROR = 19    # OpenSSL failed (should never happen)
    V_WRONG_DIR = 20       # SA has dir in/out and was used the other way
    N_VERDICTS = 21

cdef enum PacketFlag:
    F_MAPPING = 1          # good ICV from another outer address/port than the SA's
    F_SOFT_EXPIRED = 2     # this packet crossed a soft limit

cdef enum SAFlag:          # XFRM_STATE_* and XFRM_SA_XFLAG_*
    XFRM_NOECN = 1
    XFRM_DECAP_DSCP = 2
    XFRM_NOPMTUDISC = 4
    XFRM_XFLAG_DONT_ENCAP_DSCP = 1
    XFRM_XFLAG_OSEQ_MAY_WRAP = 2

cdef enum SADir:
    DIR_ANY = 0
    DIR_IN = 1
    DIR_OUT = 2

cdef struct sa_stats:
    uint64_t packets
    uint64_t bytes
    uint64_t drops[N_VERDICTS]

cdef struct sa_core:
    uint32_t spi
    int family               # outer: 4 or 6
    uint8_t src[16]          # outer addresses in network order
    uint8_t dst[16]
    bint tunnel
    int dir
    uint32_t flags
    uint32_t extra_flags
    bint esn
    bint encap
    uint16_t sport
    uint16_t dport
    bint has_mark
    uint32_t mark_v
    uint32_t mark_m
    bint has_set_mark
    uint32_t set_mark_v
    uint32_t set_mark_m
    uint32_t tfcpad
    uint8_t ttl
    uint16_t ip_id
    uint64_t oseq            # last sequence number sent (64 bits with ESN)
    uint64_t soft_bytes
    uint64_t hard_bytes
    uint64_t soft_packets
    uint64_t hard_packets
    int soft_fired           # set once (atomically): the soft limit was reported
    bint dead                # removed from the SAD: sends nothing any more
    transform xf             # worker 0's contexts (and the parameters of all)
    transform *wxf           # workers 1..nwxf: contexts of their own, same keys
    int nwxf
    int replay_lock          # a spinlock around the replay window's check and update
    replay_state replay
    sa_stats stats

# Where the outer headers of a received packet put things (offsets from its start).
cdef struct outer_info:
    int family
    uint32_t src             # offset of the source address
    uint32_t dst
    uint32_t ip_len          # IP header chain (IPv6: with extension headers)
    uint32_t nh_field        # offset of the next-header byte that named ESP or UDP
    uint32_t esp             # offset of the ESP header
    uint32_t total           # packet length as the IP header says
    uint8_t tos              # TOS / traffic class
    bint udp
    uint16_t sport
    uint16_t dport

cdef Verdict parse_outer(const uint8_t *p, uint32_t n, outer_info *o) noexcept nogil
# ``worker`` picks the crypto contexts (0: sa.xf, k: sa.wxf[k - 1]); the
# sequence number, the counters and the replay window are shared by all
# workers and updated atomically.
cdef Verdict esp_output(sa_core *sa, int worker, uint8_t *slot, uint32_t slot_size,
                        uint32_t *off, uint32_t *length, uint32_t *mark,
                        uint8_t *flags) noexcept nogil
cdef Verdict esp_input(sa_core *sa, int worker, const outer_info *o, uint8_t *slot,
                       uint32_t *off, uint32_t *length, uint32_t *mark,
                       uint8_t *flags) noexcept nogil
cdef void sa_count_drop(sa_core *sa, Verdict v) noexcept nogil

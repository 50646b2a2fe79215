"""The cluster's segment hash is Linux xt_cluster's: jhash (lookup3, 4.1+ initial
values) of the peer's address words, scaled by ``(hash * total) >> 32``.

The expected values come from an independent C implementation of the
kernel's ``jhash()`` / ``jhash2()`` / ``jhash_1word()`` compiled here, itself
anchored to Bob Jenkins' published lookup3 vectors (``hashlittle("Four score
and seven years ago", 30, 0) == 0x17770551``).  tests/test_cluster.py also
checks the split against the running kernel's ``-m cluster``.
"""

from __future__ import annotations

import ipaddress
import random
import shutil
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from espdp.cluster.hash import (
    PeerSegments,
    address_words,
    jhash2,
    jhash_1word,
    reciprocal_scale,
    segment_of,
)

# Written for this test from the kernel's documented algorithm (include/linux/jhash.h):
# lookup3's mix and final, JHASH_INITVAL 0xdeadbeef, "+ (n << 2)" for the word forms.
C_SOURCE = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static uint32_t rot(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }
#define MIX(a, b, c) { \
    a -= c; a ^= rot(c, 4);  c += b; b -= a; b ^= rot(a, 6);  a += c; \
    c -= b; c ^= rot(b, 8);  b += a; a -= c; a ^= rot(c, 16); c += b; \
    b -= a; b ^= rot(a, 19); a += c; c -= b; c ^= rot(b, 4);  b += a; }
#define FINAL(a, b, c) { \
    c ^= b; c -= rot(b, 14); a ^= c; a -= rot(c, 11); b ^= a; b -= rot(a, 25); \
    c ^= b; c -= rot(b, 16); a ^= c; a -= rot(c, 4);  b ^= a; b -= rot(a, 14); \
    c ^= b; c -= rot(b, 24); }
#define INITVAL 0xdeadbeefu

/* the kernel's jhash(key, length, initval) over bytes */
static uint32_t jhash_bytes(const uint8_t *k, uint32_t length, uint32_t initval) {
    uint32_t a, b, c, w[3];
    a = b = c = INITVAL + length + initval;
    while (length > 12) {
        memcpy(w, k, 12);   /* __get_unaligned_cpu32 */
        a += w[0]; b += w[1]; c += w[2];
        MIX(a, b, c);
        length -= 12; k += 12;
    }
    switch (length) {
    case 12: c += (uint32_t)k[11] << 24; /* fall through */
    case 11: c += (uint32_t)k[10] << 16; /* fall through */
    case 10: c += (uint32_t)k[9] << 8;   /* fall through */
    case 9:  c += k[8];                  /* fall through */
    case 8:  b += (uint32_t)k[7] << 24;  /* fall through */
    case 7:  b += (uint32_t)k[6] << 16;  /* fall through */
    case 6:  b += (uint32_t)k[5] << 8;   /* fall through */
    case 5:  b += k[4];                  /* fall through */
    case 4:  a += (uint32_t)k[3] << 24;  /* fall through */
    case 3:  a += (uint32_t)k[2] << 16;  /* fall through */
    case 2:  a += (uint32_t)k[1] << 8;   /* fall through */
    case 1:  a += k[0]; FINAL(a, b, c);  /* fall through */
    case 0:  break;
    }
    return c;
}

/* jhash2(k, length, initval) over 32-bit words */
static uint32_t jhash_words(const uint32_t *k, uint32_t length, uint32_t initval) {
    uint32_t a, b, c;
    a = b = c = INITVAL + (length << 2) + initval;
    while (length > 3) {
        a += k[0]; b += k[1]; c += k[2];
        MIX(a, b, c);
        length -= 3; k += 3;
    }
    switch (length) {
    case 3: c += k[2]; /* fall through */
    case 2: b += k[1]; /* fall through */
    case 1: a += k[0]; FINAL(a, b, c); /* fall through */
    case 0: break;
    }
    return c;
}

static uint32_t jhash_one(uint32_t a, uint32_t initval) {
    uint32_t b, c;
    initval += INITVAL + (1 << 2);
    a += initval; b = initval; c = initval;
    FINAL(a, b, c);
    return c;
}

/* stdin: "bytes HEX SEED" -> jhash over the bytes;
   "addr HEX SEED TOTAL" (4 or 16 address bytes, as in a packet) -> xt_cluster's
   hash (jhash_1word of the first word: NF_CT_TUPLE_L3SIZE / sizeof(u32) == 1),
   jhash2 over every word, jhash over the bytes, and the two segments */
int main(void) {
    char kind[16], hex[256];
    unsigned long seed, total;
    while (scanf("%15s %255s %lu", kind, hex, &seed) == 3) {
        uint8_t raw[128]; uint32_t n = strlen(hex) / 2;
        for (uint32_t i = 0; i < n; i++) sscanf(hex + 2 * i, "%2hhx", &raw[i]);
        if (strcmp(kind, "bytes") == 0) {
            printf("%u\n", jhash_bytes(raw, n, (uint32_t)seed));
            continue;
        }
        if (scanf("%lu", &total) != 1) return 1;
        uint32_t words[4];
        memcpy(words, raw, n);   /* the address as the kernel reads it from the packet */
        uint32_t first = jhash_one(words[0], (uint32_t)seed);
        uint32_t all = jhash_words(words, n / 4, (uint32_t)seed);
        printf("%u %u %u %u %u\n", first, all, jhash_bytes(raw, n, (uint32_t)seed),
               (uint32_t)(((uint64_t)first * total) >> 32),
               (uint32_t)(((uint64_t)all * total) >> 32));
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def kernel_jhash(tmp_path_factory):
    """Run the C implementation: a function taking input lines, giving output lines."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("jhash")
    (d / "jhash.c").write_text(C_SOURCE)
    subprocess.run([cc, "-O1", "-Wall", "-Wextra", "-o", str(d / "jhash"), str(d / "jhash.c")],
                   check=True, capture_output=True)

    def run(lines: list[str]) -> list[str]:
        out = subprocess.run([str(d / "jhash")], input="\n".join(lines) + "\n",
                             capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    return run


def test_the_c_reference_reproduces_jenkins_published_lookup3_vectors(kernel_jhash):
    text = b"Four score and seven years ago".hex()
    assert kernel_jhash([f"bytes {text} 0", f"bytes {text} 1"]) == \
        [str(0x17770551), str(0xCD628161)]


@pytest.mark.skipif(sys.byteorder != "little", reason="vectors below are for little-endian")
def test_word_forms_equal_the_byte_form_on_this_machine(kernel_jhash):
    """On a little-endian CPU jhash2 over address words is jhash over its bytes: the
    anchored byte form vouches for the word forms."""
    lines = []
    rng = random.Random(7)
    for _ in range(200):
        n = rng.choice((4, 16))
        lines.append(f"addr {rng.randbytes(n).hex()} {rng.getrandbits(32)} 7")
    for line in kernel_jhash(lines):
        _, every_word, from_bytes, _, _ = line.split()
        assert every_word == from_bytes


def test_segments_match_the_c_reference_for_ipv4_and_ipv6(kernel_jhash):
    rng = random.Random(1)
    cases = []
    for i in range(600):
        if i % 2:
            addr = ipaddress.IPv6Address(rng.getrandbits(128))
        else:
            addr = ipaddress.IPv4Address(rng.getrandbits(32))
        cases.append((addr, rng.getrandbits(32) if i % 3 else 0, rng.randint(1, 32)))
    out = kernel_jhash([f"addr {a.packed.hex()} {seed} {total}" for a, seed, total in cases])
    for (addr, seed, total), line in zip(cases, out, strict=True):
        first, every, _, seg_first, seg_every = (int(x) for x in line.split())
        words = address_words(addr.packed)
        assert jhash_1word(words[0], seed) == first
        assert jhash2(words, seed) == every
        # xt_cluster: one word (IPv4, and IPv6 as the kernel really does); or all four
        assert segment_of(addr, total, seed) == seg_first == reciprocal_scale(first, total)
        assert segment_of(addr, total, seed, ipv6_words=4) == seg_every


def test_the_kernel_default_hashes_only_the_first_32_bits_of_an_ipv6_address():
    a, b = ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8:ffff::2")
    assert all(segment_of(a, 32, seed) == segment_of(b, 32, seed) for seed in range(50))
    assert any(segment_of(a, 32, seed, ipv6_words=4) != segment_of(b, 32, seed, ipv6_words=4)
               for seed in range(50))
    assert PeerSegments(32, 9).of(b) == segment_of(b, 32, 9)
    assert PeerSegments(32, 9, ipv6_words=4).of(b) == segment_of(b, 32, 9, ipv6_words=4)


# (address, total, seed, ipv6_words, jhash, segment), computed with the C reference
# above on x86-64 (little-endian): regressions show even where no compiler is at hand.
KNOWN = [
    ("192.0.2.1", 6, 0, 1, 0xB3BCB8D1, 4),
    ("198.51.100.77", 3, 0x12345678, 1, 0xB8B5FCA2, 2),
    ("10.0.0.1", 32, 0, 1, 0x2FA5F781, 5),
    ("2001:db8::1", 6, 0, 4, 0x0E5B0ADB, 0),
    ("fe80::1", 32, 0xDEADBEEF, 4, 0x3F41971A, 7),
    ("2001:db8::1", 6, 0, 1, 0xAA846C4A, 3),
    ("fe80::1", 32, 0xDEADBEEF, 1, 0xC1676D74, 24),
]


@pytest.mark.skipif(sys.byteorder != "little", reason="vectors are for little-endian")
@pytest.mark.parametrize("text,total,seed,ipv6_words,expected,segment", KNOWN)
def test_known_vectors(text, total, seed, ipv6_words, expected, segment):
    addr = ipaddress.ip_address(text)
    words = address_words(addr.packed)[:ipv6_words]
    assert (jhash_1word(words[0], seed) if len(words) == 1 else jhash2(words, seed)) \
        == expected
    assert segment_of(addr, total, seed, ipv6_words=ipv6_words) == segment


@pytest.mark.skipif(sys.byteorder != "little", reason="vectors are for little-endian")
def test_known_vectors_are_the_c_references(kernel_jhash):
    lines = kernel_jhash([f"addr {ipaddress.ip_address(t).packed.hex()} {seed} {total}"
                          for t, total, seed, *_ in KNOWN])
    for (_, _, _, ipv6_words, h, segment), line in zip(KNOWN, lines, strict=True):
        first, every, _, seg_first, seg_every = (int(x) for x in line.split())
        assert (h, segment) == ((first, seg_first) if ipv6_words == 1 else (every, seg_every))


def test_jhash_1word_is_jhash2_of_one_word():
    for word in (0, 1, 0xFFFFFFFF, 0x0100000A):
        for seed in (0, 1, 0xDEADBEEF):
            assert jhash_1word(word, seed) == jhash2((word,), seed)


@given(st.integers(0, 2**32 - 1), st.integers(1, 32), st.integers(0, 2**32 - 1))
def test_segment_is_in_range_and_the_cache_agrees(value, total, seed):
    addr = ipaddress.IPv4Address(value)
    peers = PeerSegments(total, seed)
    assert 0 <= segment_of(addr, total, seed) < total
    assert peers.of(addr) == segment_of(addr, total, seed) == peers.of(addr)


def test_addr_and_port_mode_spreads_one_nat_address_over_segments():
    nat = ipaddress.ip_address("198.51.100.1")
    plain = PeerSegments(8, 0)
    with_port = PeerSegments(8, 0, with_port=True)
    assert len({plain.of(nat, port) for port in range(1024, 1124)}) == 1
    spread = {with_port.of(nat, port) for port in range(1024, 1124)}
    assert len(spread) == 8
    assert with_port.of(nat, 4500) == segment_of(nat, 8, 0, port=4500)


def test_segments_are_balanced_over_many_peers():
    counts = [0] * 6
    for i in range(60000):
        counts[segment_of(ipaddress.IPv4Address(0x0A000000 + i), 6, 99)] += 1
    assert max(counts) < 1.1 * min(counts), counts

"""ESP transforms by their XFRM names, with keying rules.

Names, key lengths and truncations follow Linux ``net/xfrm/xfrm_algo.c``;
key lengths *include* the salt or nonce, which sits at the end of the key
(RFC 4106, 4309, 4543, 3686, 7634).  Legacy aliases (``aes``, ``sha256``
...) are accepted and reported by their canonical name, as the kernel does.

The ``engine_id`` of each entry is the number the Cython engine switches on;
keep it in step with ``src_cython/espdp/_crypto.pxd``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

# Engine ids of ciphers (keep in step with _crypto.pxd).
CIPHER_NULL = 0
CIPHER_AES_CBC = 1
CIPHER_AES_CTR = 2
CIPHER_AES_GCM = 3
CIPHER_AES_GMAC = 4
CIPHER_AES_CCM = 5
CIPHER_CHACHA20_POLY1305 = 6

# Engine ids of integrity transforms.
AUTH_NONE = 0
AUTH_HMAC_SHA1 = 1
AUTH_HMAC_SHA256 = 2
AUTH_HMAC_SHA384 = 3
AUTH_HMAC_SHA512 = 4
AUTH_CMAC_AES = 5
AUTH_HMAC_MD5 = 6


@dataclass(frozen=True)
class Algorithm:
    """One XFRM algorithm.

    ``key_bits`` are the allowed key lengths *including* ``salt_bits``.
    For AEAD, ``icv_bits`` are the allowed ICV lengths; for integrity
    transforms, ``icv_bits`` is ``(default truncation, full length)``.
    """

    name: str
    kind: str  # "aead" | "enc" | "auth"
    engine_id: int
    key_bits: tuple[int, ...]
    salt_bits: int = 0
    icv_bits: tuple[int, ...] = ()
    iv_bytes: int = 0
    block_bytes: int = 1  # the cipher's block size; ESP pads to max(4, this)
    ikev2_id: int = 0
    aliases: tuple[str, ...] = ()

    @property
    def default_icv_bits(self) -> int:
        return self.icv_bits[0] if self.icv_bits else 0

    @property
    def full_icv_bits(self) -> int:
        return self.icv_bits[-1] if self.icv_bits else 0


_AES = (128, 192, 256)

ALGORITHMS: tuple[Algorithm, ...] = (
    # AEAD (IKEv2 ids are those for a 16-octet ICV; 8/12 are id-2, id-1)
    Algorithm("rfc4106(gcm(aes))", "aead", CIPHER_AES_GCM,
              tuple(b + 32 for b in _AES), 32, (64, 96, 128), 8, 1, 20),
    Algorithm("rfc4309(ccm(aes))", "aead", CIPHER_AES_CCM,
              tuple(b + 24 for b in _AES), 24, (64, 96, 128), 8, 1, 16),
    Algorithm("rfc4543(gcm(aes))", "aead", CIPHER_AES_GMAC,
              tuple(b + 32 for b in _AES), 32, (128,), 8, 1, 21),
    Algorithm("rfc7539esp(chacha20,poly1305)", "aead", CIPHER_CHACHA20_POLY1305,
              (288,), 32, (128,), 8, 1, 28),
    # Encryption
    Algorithm("ecb(cipher_null)", "enc", CIPHER_NULL, (0,), 0, (), 0, 1, 11,
              ("cipher_null",)),
    Algorithm("cbc(aes)", "enc", CIPHER_AES_CBC, _AES, 0, (), 16, 16, 12,
              ("aes",)),
    Algorithm("rfc3686(ctr(aes))", "enc", CIPHER_AES_CTR,
              tuple(b + 32 for b in _AES), 32, (), 8, 1, 13),
    # Integrity: icv_bits = (default truncation, full length)
    Algorithm("hmac(md5)", "auth", AUTH_HMAC_MD5, (128,), 0, (96, 128),
              ikev2_id=1, aliases=("md5",)),
    Algorithm("hmac(sha1)", "auth", AUTH_HMAC_SHA1, (160,), 0, (96, 160),
              ikev2_id=2, aliases=("sha1",)),
    Algorithm("hmac(sha256)", "auth", AUTH_HMAC_SHA256, (256,), 0, (96, 256),
              ikev2_id=12, aliases=("sha256",)),
    Algorithm("hmac(sha384)", "auth", AUTH_HMAC_SHA384, (384,), 0, (192, 384),
              ikev2_id=13, aliases=("sha384",)),
    Algorithm("hmac(sha512)", "auth", AUTH_HMAC_SHA512, (512,), 0, (256, 512),
              ikev2_id=14, aliases=("sha512",)),
    Algorithm("cmac(aes)", "auth", AUTH_CMAC_AES, (128,), 0, (96, 128),
              ikev2_id=8),
)

_BY_NAME: dict[tuple[str, str], Algorithm] = {}
for _alg in ALGORITHMS:
    for _name in (_alg.name, *_alg.aliases):
        _BY_NAME[(_alg.kind, _name)] = _alg


def lookup(kind: str, name: str) -> Algorithm:
    """The algorithm of ``kind`` ("aead", "enc", "auth") called ``name``.

    Raises :class:`ConfigError` naming the known ones when there is none.
    """
    try:
        return _BY_NAME[(kind, name)]
    except KeyError:
        known = ", ".join(a.name for a in ALGORITHMS if a.kind == kind)
        raise ConfigError(f"unknown {kind} algorithm {name!r} (known: {known})") from None


def check_key(alg: Algorithm, key: bytes) -> None:
    """Refuse a key whose length the algorithm does not take (the key itself is never shown)."""
    if len(key) * 8 not in alg.key_bits:
        allowed = "/".join(str(b) for b in alg.key_bits)
        raise ConfigError(
            f"{alg.name}: key is {len(key) * 8} bits, expected {allowed} bits"
            + (f" (including the {alg.salt_bits}-bit salt/nonce)" if alg.salt_bits else "")
        )


def check_icv_bits(alg: Algorithm, bits: int) -> None:
    """Refuse an ICV length the algorithm cannot produce.

    AEAD: one of the listed sizes.  Integrity: a multiple of 32 bits from 64
    up to the full digest (keeps ESP 4-byte aligned; the kernel allows any
    length, but a shorter ICV is a weakness nobody should configure).
    """
    if alg.kind == "aead":
        ok = bits in alg.icv_bits
        allowed = "/".join(str(b) for b in alg.icv_bits)
    else:
        ok = 64 <= bits <= alg.full_icv_bits and bits % 32 == 0
        allowed = f"a multiple of 32 from 64 to {alg.full_icv_bits}"
    if not ok:
        raise ConfigError(f"{alg.name}: ICV length {bits} bits is invalid ({allowed})")

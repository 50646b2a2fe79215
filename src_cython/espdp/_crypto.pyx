# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""ESP transforms (RFC 4303 section 2, RFC 4106, 4309, 4543, 3602, 3686, 7634)
over OpenSSL's EVP interface.

Each transform keeps one cipher context per direction with the cipher and
key set once; per packet only the nonce/IV is set.  What each algorithm
protects, with ``seq`` the 64-bit sequence number and ``hi`` its high half::

    AEAD (GCM, CCM, ChaCha20-Poly1305):  nonce = salt | IV
        AAD = SPI | seq_lo              (ESN: SPI | hi | seq_lo)
        encrypt payload|pad|padlen|nh, ICV = tag
    GMAC (rfc4543):                      nonce = salt | IV
        AAD = SPI | seq_lo (| hi first with ESN) | IV | payload|pad|padlen|nh
        nothing encrypted, ICV = tag
    cipher + integrity (CBC, CTR, NULL):
        encrypt, then ICV = trunc(MAC(SPI | seq_lo | IV | ciphertext | hi if ESN))

The explicit IV of counter-based modes (GCM, CCM, CTR, ChaCha) is the
64-bit sequence number: unique under the key exactly as long as sequence
numbers are, which the SA guarantees (it refuses to wrap).  CBC needs an
unpredictable IV (RFC 3602): it is the sequence number encrypted with AES
under a random key of the SA's own that never leaves the process -- a
pseudo-random permutation of a counter, unpredictable without that key and
four times cheaper than asking the DRBG for every packet.
"""

import os

from libc.string cimport memcpy, memset
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from includes.openssl cimport *
from espdp._inet cimport wr32, wr64

cdef enum:
    AAD_MAX = 12


cdef const EVP_CIPHER *_evp_cipher(int cipher, int key_len) except? NULL:
    if cipher == CIPHER_AES_GCM or cipher == CIPHER_AES_GMAC:
        return (EVP_aes_128_gcm() if key_len == 16 else
                EVP_aes_192_gcm() if key_len == 24 else EVP_aes_256_gcm())
    if cipher == CIPHER_AES_CCM:
        return (EVP_aes_128_ccm() if key_len == 16 else
                EVP_aes_192_ccm() if key_len == 24 else EVP_aes_256_ccm())
    if cipher == CIPHER_AES_CBC:
        return (EVP_aes_128_cbc() if key_len == 16 else
                EVP_aes_192_cbc() if key_len == 24 else EVP_aes_256_cbc())
    if cipher == CIPHER_AES_CTR:
        return (EVP_aes_128_ctr() if key_len == 16 else
                EVP_aes_192_ctr() if key_len == 24 else EVP_aes_256_ctr())
    if cipher == CIPHER_CHACHA20_POLY1305:
        return EVP_chacha20_poly1305()
    return NULL


cdef int _salt_len(int cipher):
    if cipher == CIPHER_AES_CCM:
        return 3
    if cipher in (CIPHER_AES_GCM, CIPHER_AES_GMAC, CIPHER_AES_CTR, CIPHER_CHACHA20_POLY1305):
        return 4
    return 0


cdef EVP_CIPHER_CTX *_cipher_ctx(int cipher, const uint8_t *key, int key_len,
                                 int icv_len, int enc) except NULL:
    cdef const EVP_CIPHER *evp = _evp_cipher(cipher, key_len)
    cdef EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new()
    cdef bint ok
    if ctx == NULL:
        raise MemoryError()
    ok = EVP_CipherInit_ex(ctx, evp, NULL, NULL, NULL, enc) == 1
    if ok and cipher == CIPHER_AES_CCM:
        # 3-byte salt + 8-byte IV = 11-byte nonce; the tag length is fixed at setup.
        ok = (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, 11, NULL) == 1 and
              EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, icv_len, NULL) == 1)
    ok = ok and EVP_CipherInit_ex(ctx, NULL, NULL, key, NULL, enc) == 1
    if ok and cipher in (CIPHER_AES_CBC, CIPHER_AES_CTR):
        ok = EVP_CIPHER_CTX_set_padding(ctx, 0) == 1   # ESP pads by itself
    if not ok:
        EVP_CIPHER_CTX_free(ctx)
        ERR_clear_error()
        raise RuntimeError("OpenSSL refused to set up the cipher context")
    return ctx


cdef EVP_CIPHER_CTX *_iv_ctx(bytes key) except NULL:
    cdef EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new()
    if ctx == NULL:
        raise MemoryError()
    if (EVP_CipherInit_ex(ctx, EVP_aes_128_ecb(), NULL, key, NULL, 1) != 1 or
            EVP_CIPHER_CTX_set_padding(ctx, 0) != 1):
        EVP_CIPHER_CTX_free(ctx)
        ERR_clear_error()
        raise RuntimeError("OpenSSL refused to set up the IV generator")
    return ctx


cdef EVP_MAC_CTX *_mac_ctx(int auth, bytes key) except NULL:
    cdef const char *name = b"HMAC"
    cdef bytes digest
    cdef OSSL_PARAM params[2]
    if auth == AUTH_CMAC_AES:
        name = b"CMAC"
        params[0] = OSSL_PARAM_construct_utf8_string(b"cipher", <char *> b"AES-128-CBC", 0)
    else:
        digest = {AUTH_HMAC_SHA1: b"SHA1", AUTH_HMAC_SHA256: b"SHA256",
                  AUTH_HMAC_SHA384: b"SHA384", AUTH_HMAC_SHA512: b"SHA512",
                  AUTH_HMAC_MD5: b"MD5"}[auth]
        params[0] = OSSL_PARAM_construct_utf8_string(b"digest", <char *> digest, 0)
    params[1] = OSSL_PARAM_construct_end()
    cdef EVP_MAC *mac = EVP_MAC_fetch(NULL, name, NULL)
    if mac == NULL:
        ERR_clear_error()
        raise RuntimeError("OpenSSL has no %s" % name.decode())
    cdef EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(mac)
    EVP_MAC_free(mac)
    if ctx == NULL:
        raise MemoryError()
    if EVP_MAC_init(ctx, key, len(key), params) != 1:
        EVP_MAC_CTX_free(ctx)
        ERR_clear_error()
        raise RuntimeError("OpenSSL refused the integrity key")
    return ctx


cdef int transform_init(transform *t, int cipher, bytes key, int icv_len,
                        int auth, bytes auth_key) except -1:
    memset(t, 0, sizeof(transform))
    t.cipher = cipher
    t.auth = auth
    t.aead = cipher in (CIPHER_AES_GCM, CIPHER_AES_GMAC, CIPHER_AES_CCM,
                        CIPHER_CHACHA20_POLY1305)
    t.salt_len = _salt_len(cipher)
    t.iv_len = 16 if cipher == CIPHER_AES_CBC else (0 if cipher == CIPHER_NULL else 8)
    t.align = 16 if cipher == CIPHER_AES_CBC else 4
    t.icv_len = icv_len
    if icv_len > MAX_ICV or len(key) < t.salt_len:
        raise ValueError("invalid ICV or key length")
    cdef bytes cipher_key = key[:len(key) - t.salt_len]
    memcpy(t.salt, <const char *> key + len(cipher_key), t.salt_len)
    if cipher != CIPHER_NULL:
        t.seal_ctx = _cipher_ctx(cipher, cipher_key, len(cipher_key), icv_len, 1)
        t.open_ctx = _cipher_ctx(cipher, cipher_key, len(cipher_key), icv_len, 0)
    if cipher == CIPHER_AES_CBC:
        t.iv_ctx = _iv_ctx(os.urandom(16))
    if not t.aead:
        if auth == AUTH_NONE:
            raise ValueError("a non-AEAD transform needs an integrity algorithm")
        t.seal_mac = _mac_ctx(auth, auth_key)
        t.open_mac = _mac_ctx(auth, auth_key)
    return 0


cdef EVP_CIPHER_CTX *_copy_cipher(const EVP_CIPHER_CTX *src) except? NULL:
    cdef EVP_CIPHER_CTX *ctx
    if src == NULL:
        return NULL
    ctx = EVP_CIPHER_CTX_new()
    if ctx == NULL or EVP_CIPHER_CTX_copy(ctx, src) != 1:
        EVP_CIPHER_CTX_free(ctx)
        raise MemoryError("EVP_CIPHER_CTX_copy failed")
    return ctx


cdef EVP_MAC_CTX *_copy_mac(const EVP_MAC_CTX *src) except? NULL:
    cdef EVP_MAC_CTX *ctx
    if src == NULL:
        return NULL
    ctx = EVP_MAC_CTX_dup(src)
    if ctx == NULL:
        raise MemoryError("EVP_MAC_CTX_dup failed")
    return ctx


cdef int transform_clone(transform *dst, const transform *src) except -1:
    """A transform with the same keys and contexts of its own, for another thread:
    an EVP context is never used by two threads at once."""
    memcpy(dst, src, sizeof(transform))
    dst.seal_ctx = dst.open_ctx = dst.iv_ctx = NULL
    dst.seal_mac = dst.open_mac = NULL
    try:
        dst.seal_ctx = _copy_cipher(src.seal_ctx)
        dst.open_ctx = _copy_cipher(src.open_ctx)
        dst.iv_ctx = _copy_cipher(src.iv_ctx)
        dst.seal_mac = _copy_mac(src.seal_mac)
        dst.open_mac = _copy_mac(src.open_mac)
    except BaseException:
        transform_free(dst)
        raise
    return 0


cdef void transform_free(transform *t) noexcept nogil:
    EVP_CIPHER_CTX_free(t.seal_ctx)
    EVP_CIPHER_CTX_free(t.open_ctx)
    EVP_CIPHER_CTX_free(t.iv_ctx)
    EVP_MAC_CTX_free(t.seal_mac)
    EVP_MAC_CTX_free(t.open_mac)
    t.seal_ctx = t.open_ctx = t.iv_ctx = NULL
    t.seal_mac = t.open_mac = NULL


cdef inline int _aad(const uint8_t *esp, uint64_t seq, bint esn, uint8_t *aad) noexcept nogil:
    memcpy(aad, esp, 4)                          # SPI
    if esn:
        wr32(aad + 4, <uint32_t> (seq >> 32))    # high half, not sent on the wire
        memcpy(aad + 8, esp + 4, 4)
        return 12
    memcpy(aad + 4, esp + 4, 4)
    return 8


cdef inline void _nonce(const transform *t, const uint8_t *iv, uint8_t *nonce) noexcept nogil:
    memcpy(nonce, t.salt, t.salt_len)
    memcpy(nonce + t.salt_len, iv, 8)


cdef int _aead(transform *t, EVP_CIPHER_CTX *ctx, uint8_t *esp, size_t length,
               uint64_t seq, bint esn, int enc) noexcept nogil:
    cdef uint8_t aad[AAD_MAX]
    cdef uint8_t nonce[12]
    cdef uint8_t *iv = esp + 8
    cdef uint8_t *text = iv + t.iv_len
    cdef uint8_t *icv = text + length
    cdef int aad_len = _aad(esp, seq, esn, aad)
    cdef int outl = 0
    _nonce(t, iv, nonce)
    if t.cipher == CIPHER_AES_CCM:
        if not enc and EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, t.icv_len, icv) != 1:
            return -1
        if EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, enc) != 1:
            return -1
        if EVP_CipherUpdate(ctx, NULL, &outl, NULL, <int> length) != 1:
            return -1
    elif EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, enc) != 1:
        return -1
    if EVP_CipherUpdate(ctx, NULL, &outl, aad, aad_len) != 1:
        return -1
    if t.cipher == CIPHER_AES_GMAC:
        # RFC 4543: everything is authenticated, nothing is encrypted.
        if EVP_CipherUpdate(ctx, NULL, &outl, iv, <int> (t.iv_len + length)) != 1:
            return -1
    elif EVP_CipherUpdate(ctx, text, &outl, text, <int> length) != 1:
        return -1               # CCM verifies the tag here when opening
    if t.cipher == CIPHER_AES_CCM:
        if enc:
            return 0 if EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG,
                                            t.icv_len, icv) == 1 else -1
        return 0
    if not enc and EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, t.icv_len, icv) != 1:
        return -1
    if EVP_CipherFinal_ex(ctx, text + length, &outl) != 1:
        return -1
    if enc and EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, t.icv_len, icv) != 1:
        return -1
    return 0


cdef int _mac(EVP_MAC_CTX *mac, const uint8_t *esp, size_t covered, uint64_t seq,
              bint esn, uint8_t *out) noexcept nogil:
    # RFC 4303 2.2.1: with ESN the high half is appended to what the ICV covers.
    cdef uint8_t hi[4]
    cdef size_t outl = 0
    if EVP_MAC_init(mac, NULL, 0, NULL) != 1:
        return -1
    if EVP_MAC_update(mac, esp, covered) != 1:
        return -1
    if esn:
        wr32(hi, <uint32_t> (seq >> 32))
        if EVP_MAC_update(mac, hi, 4) != 1:
            return -1
    return 0 if EVP_MAC_final(mac, out, &outl, MAX_ICV) == 1 else -1


cdef int _cipher(transform *t, EVP_CIPHER_CTX *ctx, uint8_t *esp, size_t length,
                 int enc) noexcept nogil:
    cdef uint8_t block[16]
    cdef uint8_t *iv = esp + 8
    cdef int outl = 0
    if t.cipher == CIPHER_NULL:
        return 0
    if t.cipher == CIPHER_AES_CTR:
        # RFC 3686: counter block = nonce | IV | 1
        memcpy(block, t.salt, 4)
        memcpy(block + 4, iv, 8)
        wr32(block + 12, 1)
        iv = block
    if EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, enc) != 1:
        return -1
    if EVP_CipherUpdate(ctx, esp + 8 + t.iv_len, &outl,
                        esp + 8 + t.iv_len, <int> length) != 1:
        return -1
    return 0


cdef int esp_seal(transform *t, uint8_t *esp, size_t length, uint64_t seq,
                  bint esn) noexcept nogil:
    cdef uint8_t mac[MAX_ICV]
    cdef uint8_t counter[16]
    cdef int outl = 0
    if t.cipher == CIPHER_AES_CBC:
        wr64(counter, seq)
        memset(counter + 8, 0, 8)
        if EVP_CipherUpdate(t.iv_ctx, esp + 8, &outl, counter, 16) != 1:
            return -1
    elif t.iv_len == 8:
        wr64(esp + 8, seq)
    if t.aead:
        return _aead(t, t.seal_ctx, esp, length, seq, esn, 1)
    if _cipher(t, t.seal_ctx, esp, length, 1) != 0:
        return -1
    if _mac(t.seal_mac, esp, 8 + t.iv_len + length, seq, esn, mac) != 0:
        return -1
    memcpy(esp + 8 + t.iv_len + length, mac, t.icv_len)
    return 0


cdef int esp_open(transform *t, uint8_t *esp, size_t length, uint64_t seq,
                  bint esn) noexcept nogil:
    cdef uint8_t mac[MAX_ICV]
    if t.aead:
        return _aead(t, t.open_ctx, esp, length, seq, esn, 0)
    # Encrypt-then-MAC: verify before touching the ciphertext.
    if _mac(t.open_mac, esp, 8 + t.iv_len + length, seq, esn, mac) != 0:
        return -1
    if CRYPTO_memcmp(mac, esp + 8 + t.iv_len + length, t.icv_len) != 0:
        return -1
    return _cipher(t, t.open_ctx, esp, length, 0)


cdef class Transform:
    """One transform on its own, for known-answer tests and the algorithm probe.

    ``seal(esp_header_iv_and_padded_plaintext, seq, esn)`` returns the same
    bytes encrypted with the ICV appended; ``open`` reverses it or returns None.
    """

    def __cinit__(self, int cipher, bytes key, int icv_len, int auth=AUTH_NONE,
                  bytes auth_key=b""):
        transform_init(&self.t, cipher, key, icv_len, auth, auth_key)

    def __dealloc__(self):
        transform_free(&self.t)

    @property
    def iv_len(self):
        return self.t.iv_len

    @property
    def icv_len(self):
        return self.t.icv_len

    @property
    def align(self):
        return self.t.align

    def seal(self, bytes packet, uint64_t seq, bint esn=False):
        cdef size_t length = len(packet) - 8 - self.t.iv_len
        buf = bytearray(packet) + bytearray(self.t.icv_len)
        cdef uint8_t[::1] view = buf
        if esp_seal(&self.t, &view[0], length, seq, esn) != 0:
            raise RuntimeError("seal failed")
        return bytes(buf)

    def open(self, bytes packet, uint64_t seq, bint esn=False):
        cdef Py_ssize_t length = len(packet) - 8 - self.t.iv_len - self.t.icv_len
        if length < 0:
            return None
        buf = bytearray(packet)
        cdef uint8_t[::1] view = buf
        if esp_open(&self.t, &view[0], length, seq, esn) != 0:
            return None
        return bytes(buf[:len(buf) - self.t.icv_len])


# The engine's ids as Python sees them; tests check espdp.algorithms agrees.
ENGINE_IDS = {
    "CIPHER_NULL": CIPHER_NULL, "CIPHER_AES_CBC": CIPHER_AES_CBC,
    "CIPHER_AES_CTR": CIPHER_AES_CTR, "CIPHER_AES_GCM": CIPHER_AES_GCM,
    "CIPHER_AES_GMAC": CIPHER_AES_GMAC, "CIPHER_AES_CCM": CIPHER_AES_CCM,
    "CIPHER_CHACHA20_POLY1305": CIPHER_CHACHA20_POLY1305,
    "AUTH_NONE": AUTH_NONE, "AUTH_HMAC_SHA1": AUTH_HMAC_SHA1,
    "AUTH_HMAC_SHA256": AUTH_HMAC_SHA256, "AUTH_HMAC_SHA384": AUTH_HMAC_SHA384,
    "AUTH_HMAC_SHA512": AUTH_HMAC_SHA512, "AUTH_CMAC_AES": AUTH_CMAC_AES,
    "AUTH_HMAC_MD5": AUTH_HMAC_MD5,
}

# ESP transforms over OpenSSL EVP: one context per direction, key set once.
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from includes.openssl cimport EVP_CIPHER_CTX, EVP_MAC_CTX

# Cipher and integrity ids: keep in step with espdp/algorithms.py.
cdef enum CipherId:
    CIPHER_NULL = 0
    CIPHER_AES_CBC = 1
    CIPHER_AES_CTR = 2
    CIPHER_AES_GCM = 3
    CIPHER_AES_GMAC = 4
    CIPHER_AES_CCM = 5
    CIPHER_CHACHA20_POLY1305 = 6

cdef enum AuthId:
    AUTH_NONE = 0
    AUTH_HMAC_SHA1 = 1
    AUTH_HMAC_SHA256 = 2
    AUTH_HMAC_SHA384 = 3
    AUTH_HMAC_SHA512 = 4
    AUTH_CMAC_AES = 5
    AUTH_HMAC_MD5 = 6

cdef enum:
    MAX_ICV = 64          # untruncated HMAC-SHA-512
    MAX_IV = 16

cdef struct transform:
    int cipher
    int auth
    bint aead
    int iv_len            # IV bytes on the wire
    int align             # the ciphertext is padded to a multiple of this (>= 4)
    int icv_len           # ICV bytes on the wire (after truncation)
    int salt_len
    uint8_t salt[4]
    EVP_CIPHER_CTX *seal_ctx
    EVP_CIPHER_CTX *open_ctx
    EVP_CIPHER_CTX *iv_ctx   # CBC: AES-ECB under a random per-SA key, IV = E(seq)
    EVP_MAC_CTX *seal_mac
    EVP_MAC_CTX *open_mac

cdef int transform_init(transform *t, int cipher, bytes key, int icv_len,
                        int auth, bytes auth_key) except -1
cdef int transform_clone(transform *dst, const transform *src) except -1
cdef void transform_free(transform *t) noexcept nogil

# esp points at the ESP header; the IV follows it, then `length` bytes of
# padded plaintext (seal) or ciphertext (open), then the ICV.
cdef int esp_seal(transform *t, uint8_t *esp, size_t length, uint64_t seq,
                  bint esn) noexcept nogil
cdef int esp_open(transform *t, uint8_t *esp, size_t length, uint64_t seq,
                  bint esn) noexcept nogil

cdef class Transform:
    cdef transform t

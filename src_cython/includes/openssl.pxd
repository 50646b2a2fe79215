# The part of OpenSSL 3 libcrypto the engine uses (headers from libssl-dev).

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_CIPHER:
        pass
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_MAC:
        pass
    ctypedef struct EVP_MAC_CTX:
        pass
    ctypedef struct ENGINE:
        pass
    ctypedef struct OSSL_LIB_CTX:
        pass

    const EVP_CIPHER *EVP_aes_128_gcm()
    const EVP_CIPHER *EVP_aes_192_gcm()
    const EVP_CIPHER *EVP_aes_256_gcm()
    const EVP_CIPHER *EVP_aes_128_ccm()
    const EVP_CIPHER *EVP_aes_192_ccm()
    const EVP_CIPHER *EVP_aes_256_ccm()
    const EVP_CIPHER *EVP_aes_128_cbc()
    const EVP_CIPHER *EVP_aes_192_cbc()
    const EVP_CIPHER *EVP_aes_256_cbc()
    const EVP_CIPHER *EVP_aes_128_ctr()
    const EVP_CIPHER *EVP_aes_192_ctr()
    const EVP_CIPHER *EVP_aes_256_ctr()
    const EVP_CIPHER *EVP_chacha20_poly1305()
    const EVP_CIPHER *EVP_aes_128_ecb()

    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    int EVP_CIPHER_CTX_copy(EVP_CIPHER_CTX *out, const EVP_CIPHER_CTX *inp)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr)
    int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX *ctx, int pad)
    int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, ENGINE *impl,
                          const unsigned char *key, const unsigned char *iv, int enc)
    int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                         const unsigned char *inp, int inl)
    int EVP_CipherFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)

    int EVP_CTRL_AEAD_SET_IVLEN
    int EVP_CTRL_AEAD_GET_TAG
    int EVP_CTRL_AEAD_SET_TAG

    EVP_MAC *EVP_MAC_fetch(OSSL_LIB_CTX *libctx, const char *algorithm, const char *properties)
    void EVP_MAC_free(EVP_MAC *mac)
    EVP_MAC_CTX *EVP_MAC_CTX_new(EVP_MAC *mac)
    void EVP_MAC_CTX_free(EVP_MAC_CTX *ctx)
    EVP_MAC_CTX *EVP_MAC_CTX_dup(const EVP_MAC_CTX *src)

cdef extern from "openssl/params.h" nogil:
    ctypedef struct OSSL_PARAM:
        pass
    OSSL_PARAM OSSL_PARAM_construct_utf8_string(const char *key, char *buf, size_t bsize)
    OSSL_PARAM OSSL_PARAM_construct_end()

cdef extern from "openssl/evp.h" nogil:
    int EVP_MAC_init(EVP_MAC_CTX *ctx, const unsigned char *key, size_t keylen,
                     const OSSL_PARAM *params)
    int EVP_MAC_update(EVP_MAC_CTX *ctx, const unsigned char *data, size_t datalen)
    int EVP_MAC_final(EVP_MAC_CTX *ctx, unsigned char *out, size_t *outl, size_t outsize)

cdef extern from "openssl/crypto.h" nogil:
    int CRYPTO_memcmp(const void *a, const void *b, size_t len)

cdef extern from "openssl/rand.h" nogil:
    int RAND_bytes(unsigned char *buf, int num)

cdef extern from "openssl/err.h" nogil:
    void ERR_clear_error()

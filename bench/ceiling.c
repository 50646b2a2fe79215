/* The crypto ceiling: ESP-shaped AES-GCM with one reused EVP context.
 *
 * Per packet exactly what an ideal ESP encoder must do and nothing else:
 * set the nonce (salt | 64-bit counter), feed the 8-byte AAD (SPI | seq),
 * encrypt the padded payload in place, take the 16-byte tag.  Packets are
 * kept in a ring of BATCH buffers so the data does not stay in L1 unfairly.
 *
 * usage: ceiling KEYBITS PAYLOAD_BYTES SECONDS  -> prints one JSON object
 */
#include <openssl/evp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BATCH 64
#define SLOT 2048

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s KEYBITS PAYLOAD_BYTES SECONDS\n", argv[0]);
		return 2;
	}
	int bits = atoi(argv[1]), size = atoi(argv[2]);
	double seconds = atof(argv[3]);
	const EVP_CIPHER *cipher = bits == 256 ? EVP_aes_256_gcm() : EVP_aes_128_gcm();
	unsigned char key[32] = {1}, nonce[12] = {2}, aad[8] = {3}, tag[16];
	/* the ESP plaintext: payload + 2-byte trailer, padded to 4 */
	int text = (size + 2 + 3) & ~3, outl;
	unsigned char *buf = calloc(BATCH, SLOT);
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	if (!buf || !ctx || !EVP_EncryptInit_ex(ctx, cipher, NULL, key, NULL))
		return 1;
	uint64_t seq = 0, packets = 0;
	double start = now(), end = start + seconds, t;
	do {
		for (int i = 0; i < BATCH; i++) {
			unsigned char *p = buf + (size_t)i * SLOT;
			seq++;
			memcpy(nonce + 4, &seq, 8);
			memcpy(aad + 4, &seq, 4);
			EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce);
			EVP_EncryptUpdate(ctx, NULL, &outl, aad, 8);
			EVP_EncryptUpdate(ctx, p, &outl, p, text);
			EVP_EncryptFinal_ex(ctx, p + text, &outl);
			EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, tag);
		}
		packets += BATCH;
		t = now();
	} while (t < end);
	printf("{\"packets\": %llu, \"seconds\": %.6f, \"pps\": %.1f}\n",
	       (unsigned long long)packets, t - start, packets / (t - start));
	EVP_CIPHER_CTX_free(ctx);
	free(buf);
	return 0;
}

"""What leaves a node for etcd carries no key in the clear.

SAs installed through one node's control socket reach the others through
etcd.  Their lines hold keys, so each record is *sealed* before it is
written: AES-256-GCM under a key derived (HKDF-SHA256) from the cluster
secret, a random 96-bit nonce per record, the etcd key name as associated
data (a record cannot be moved to another name).  etcd, its disk, its
backups and the network to it see ciphertext only; TLS to etcd (``https://``
endpoints with ``ca_cert``/``cert``/``key``) can be added for the rest.

Checkpoints are filed under an HMAC of the SA's SPI, protocol and keys
(:func:`checkpoint_id`): the same name on every node, and no way to test a
guessed key against it without the cluster secret.

The secret is 32 random bytes in a file of its own (hex, mode 0600, the same
on every node): ``python -c "import os; print(os.urandom(32).hex())"``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError

NONCE = 12


def read_secret(path: str) -> bytes:
    """The cluster secret from ``path`` (hex, 32 bytes or more); refuses a file
    that others can read."""
    try:
        st = os.stat(path)
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise ConfigError(f"cluster secret {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"cluster secret {path}: readable by others (chmod 600)")
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"cluster secret {path}: expected hex") from None
    if len(secret) < 32:
        raise ConfigError(f"cluster secret {path}: expected at least 32 bytes")
    return secret


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"espdp cluster " + purpose).derive(secret)


class Sealer:
    """Seals and opens records with keys derived from the cluster secret."""

    def __init__(self, secret: bytes) -> None:
        self._aead = AESGCM(_derive(secret, b"records"))
        self._mac_key = _derive(secret, b"checkpoint ids")

    def seal(self, plaintext: bytes, name: str) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext, name.encode())

    def open(self, sealed: bytes, name: str) -> bytes:
        """The plaintext; ConfigError when the record was not sealed with this
        cluster secret under this name (wrong secret, tampering, a moved record)."""
        try:
            return self._aead.decrypt(sealed[:NONCE], sealed[NONCE:], name.encode())
        except (InvalidTag, ValueError):
            raise ConfigError(f"record {name}: does not open with this cluster's secret") \
                from None

    def checkpoint_id(self, info: Any) -> str:
        """A stable name for the nonce space of an SA: SPI, protocol and keys."""
        h = hmac.new(self._mac_key, digestmod=hashlib.sha256)
        h.update(f"{info.spi}|{info.proto}".encode())
        for algo in (info.aead, info.enc, info.auth):
            if algo is not None:
                h.update(b"\0" + algo.name.encode() + b"\0" + bytes(algo.key))
        return h.hexdigest()[:32]

"""Which ESP transforms this build can really use, proven and timed.

XFRM has no call that lists working algorithms, and what works depends on
the OpenSSL the engine links (a FIPS provider refuses MD5, a trimmed build
may lack CCM).  :func:`probe` tries every combination through the engine:
a known-answer test of ``espdp._crypto.Transform`` (seal, open, with and
without ESN, a corrupted ICV refused) and one SA round trip
(``encrypt_packet``, ``decrypt_packet``), the expected ESP bytes computed at
probe time by an independent implementation, ``cryptography`` (which carries
its own OpenSSL).  CBC's IV is random, so there each side opens the other's
packet.  ``probe(measure=True)`` also times 1400-byte inner packets through
the batch API, and :func:`proposal` turns that into strongSwan's
``esp_proposals``, fastest first.

Command line: ``espdp algs [--json] [--measure] [--proposal] [--all]``
(also ``python -m espdp.algs``).
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Optional

from cryptography.hazmat.primitives import cmac, constant_time, hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.hazmat.primitives.ciphers import algorithms as ciphers
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

from . import algorithms
from .algorithms import Algorithm

# ------------------------------------------------------------------ the transforms

_AES = (128, 192, 256)

# AEAD: XFRM name, key sizes without salt, {ICV bits: (strongSwan keyword, IKEv2 ENCR id)}
_AEADS = (
    ("rfc4106(gcm(aes))", _AES, {64: ("aes{k}gcm8", 18), 96: ("aes{k}gcm12", 19),
                                 128: ("aes{k}gcm16", 20)}),
    ("rfc4309(ccm(aes))", _AES, {64: ("aes{k}ccm8", 14), 96: ("aes{k}ccm12", 15),
                                 128: ("aes{k}ccm16", 16)}),
    ("rfc4543(gcm(aes))", _AES, {128: ("aes{k}gmac", 21)}),
    ("rfc7539esp(chacha20,poly1305)", (256,), {128: ("chacha20poly1305", 28)}),
)
# Encryption: XFRM name, key sizes without nonce, strongSwan keyword, IKEv2 ENCR id
_ENCRYPTION = (
    ("cbc(aes)", _AES, "aes{k}", 12),
    ("rfc3686(ctr(aes))", _AES, "aes{k}ctr", 13),
    ("ecb(cipher_null)", (0,), "null", 11),
)
# Integrity: XFRM name, ICV bits, strongSwan keyword, IKEv2 INTEG id, legacy
_INTEGRITY = (
    ("hmac(sha1)", 96, "sha1", 2, False),
    ("hmac(sha256)", 128, "sha256", 12, False),        # RFC 4868
    ("hmac(sha256)", 96, "sha256_96", None, False),    # Linux's default truncation
    ("hmac(sha384)", 192, "sha384", 13, False),
    ("hmac(sha512)", 256, "sha512", 14, False),
    ("cmac(aes)", 96, "aescmac", 8, False),
    ("hmac(md5)", 96, "md5", 1, True),
)
_HASHES = {"hmac(sha1)": hashes.SHA1, "hmac(sha256)": hashes.SHA256,
           "hmac(sha384)": hashes.SHA384, "hmac(sha512)": hashes.SHA512,
           "hmac(md5)": hashes.MD5}


@dataclass(frozen=True)
class _Spec:
    """One transform to probe: a cipher (AEAD or encryption) and maybe integrity."""

    keyword: str
    cipher: Algorithm
    key_bits: int                       # without salt
    icv_bits: int
    encr_id: int
    integ: Optional[Algorithm] = None
    integ_id: Optional[int] = None
    legacy: bool = False

    @property
    def aead(self) -> bool:
        return self.cipher.kind == "aead"

    @property
    def random_iv(self) -> bool:
        return self.cipher.engine_id == algorithms.CIPHER_AES_CBC

    @property
    def confidential(self) -> bool:
        return self.cipher.engine_id not in (algorithms.CIPHER_AES_GMAC, algorithms.CIPHER_NULL)

    @property
    def enc_key(self) -> bytes:
        """Cipher key followed by the salt/nonce, as XFRM takes it."""
        return _fixed_bytes((self.key_bits + self.cipher.salt_bits) // 8, 0x11)

    @property
    def cipher_key(self) -> bytes:
        return self.enc_key[: self.key_bits // 8]

    @property
    def salt(self) -> bytes:
        return self.enc_key[self.key_bits // 8:]

    @property
    def auth_key(self) -> bytes:
        return _fixed_bytes(self.integ.key_bits[0] // 8, 0x5A) if self.integ else b""


def _fixed_bytes(n: int, seed: int) -> bytes:
    return bytes((seed + 37 * i) & 0xFF for i in range(n))


@functools.lru_cache(maxsize=1)
def _specs() -> tuple[_Spec, ...]:
    specs = []
    for name, sizes, icvs in _AEADS:
        alg = algorithms.lookup("aead", name)
        for bits in sizes:
            for icv, (keyword, encr) in icvs.items():
                specs.append(_Spec(keyword.format(k=bits), alg, bits, icv, encr))
    for name, sizes, keyword, encr in _ENCRYPTION:
        alg = algorithms.lookup("enc", name)
        for bits in sizes:
            for auth, icv, auth_keyword, integ, legacy in _INTEGRITY:
                specs.append(_Spec(f"{keyword.format(k=bits)}-{auth_keyword}", alg, bits, icv,
                                   encr, algorithms.lookup("auth", auth), integ, legacy))
    return tuple(specs)


# ------------------------------------------------------------------ the report

@dataclass(frozen=True)
class TransformReport:
    """What the probe found out about one transform.

    ``key_bits`` excludes the salt/nonce (``salt_bits``); XFRM wants both
    concatenated.  ``auth_key_bits`` is the integrity key (0 for AEAD).
    Speeds are for 1400-byte inner packets on one core, when measured.
    """

    keyword: str                        # strongSwan proposal keyword(s)
    aead: Optional[str]
    enc: Optional[str]
    auth: Optional[str]
    key_bits: int
    salt_bits: int
    icv_bits: int
    auth_key_bits: int
    ikev2_encr_id: int
    ikev2_integ_id: Optional[int]
    kat_passed: bool
    usable: bool
    reason: str = ""                    # why not usable
    legacy: bool = False
    confidential: bool = True           # False: GMAC and NULL authenticate only
    note: str = ""
    packets_per_second: Optional[float] = None
    gbit_per_second: Optional[float] = None

    @property
    def negotiable(self) -> bool:
        """Whether IKEv2 has transform ids for it."""
        return self.aead is not None or self.ikev2_integ_id is not None

    @property
    def xfrm(self) -> str:
        return self.aead or f"{self.enc} + {self.auth}"

    def as_dict(self) -> dict:
        return {**asdict(self), "negotiable": self.negotiable}


def _report(spec: _Spec, kat_passed: bool, reason: str) -> TransformReport:
    # strongSwan's sha256_96 has a private-use id: it works only between strongSwan peers.
    notes = [text for text, applies in (
        ("integrity only, no encryption", not spec.confidential),
        ("not negotiable in IKEv2 (no IANA INTEG id)", spec.integ and spec.integ_id is None),
        ("legacy", spec.legacy)) if applies]
    return TransformReport(
        keyword=spec.keyword,
        aead=spec.cipher.name if spec.aead else None,
        enc=None if spec.aead else spec.cipher.name,
        auth=spec.integ.name if spec.integ else None,
        key_bits=spec.key_bits, salt_bits=spec.cipher.salt_bits, icv_bits=spec.icv_bits,
        auth_key_bits=spec.integ.key_bits[0] if spec.integ else 0,
        ikev2_encr_id=spec.encr_id, ikev2_integ_id=spec.integ_id,
        kat_passed=kat_passed, usable=kat_passed and not reason, reason=reason,
        legacy=spec.legacy, confidential=spec.confidential, note="; ".join(notes))


# ------------------------------------------------------------------ the reference (cryptography)

def _esp_header(spi: int, seq: int) -> bytes:
    return spi.to_bytes(4, "big") + (seq & 0xFFFFFFFF).to_bytes(4, "big")


def _seq_hi(seq: int, esn: bool) -> bytes:
    return (seq >> 32).to_bytes(4, "big") if esn else b""


def _aad(spi: int, seq: int, esn: bool) -> bytes:
    """RFC 4106 5 / RFC 4309 5 / RFC 7634 2.1: SPI, then (ESN high half,) low half."""
    return spi.to_bytes(4, "big") + _seq_hi(seq, esn) + (seq & 0xFFFFFFFF).to_bytes(4, "big")


def _mac(spec: _Spec, covered: bytes) -> bytes:
    assert spec.integ is not None
    if spec.integ.engine_id == algorithms.AUTH_CMAC_AES:
        mac = cmac.CMAC(ciphers.AES(spec.auth_key))
    else:
        mac = hmac.HMAC(spec.auth_key, _HASHES[spec.integ.name]())
    mac.update(covered)
    return mac.finalize()[: spec.icv_bits // 8]


def _aead_reference(spec: _Spec, nonce: bytes, aad: bytes, iv: bytes, text: bytes) -> bytes:
    """Encrypted ``text`` and ICV for RFC 4106, 4309, 4543 and 7634."""
    key, icv_len, engine_id = spec.cipher_key, spec.icv_bits // 8, spec.cipher.engine_id
    if engine_id == algorithms.CIPHER_AES_GMAC:
        # RFC 4543 3: the IV and the payload are authenticated too, nothing is encrypted.
        return text + AESGCM(key).encrypt(nonce, b"", aad + iv + text)
    if engine_id == algorithms.CIPHER_AES_CCM:
        return AESCCM(key, tag_length=icv_len).encrypt(nonce, text, aad)
    chacha = engine_id == algorithms.CIPHER_CHACHA20_POLY1305
    sealed = (ChaCha20Poly1305(key) if chacha else AESGCM(key)).encrypt(nonce, text, aad)
    return sealed[: len(text) + icv_len]     # RFC 4106 8/12-byte ICVs: the tag truncated


def _crypt(spec: _Spec, iv: bytes, text: bytes, encrypt: bool) -> bytes:
    """AES-CBC or AES-CTR (RFC 3686 4: counter block = nonce | IV | 1); NULL: as it is."""
    engine_id = spec.cipher.engine_id
    if engine_id == algorithms.CIPHER_NULL:
        return text
    if engine_id == algorithms.CIPHER_AES_CBC:
        mode = modes.CBC(iv)
    else:
        mode = modes.CTR(spec.salt + iv + b"\0\0\0\1")
    cipher = Cipher(ciphers.AES(spec.cipher_key), mode)
    context = cipher.encryptor() if encrypt else cipher.decryptor()
    return context.update(text) + context.finalize()


def reference_seal(spec: _Spec, spi: int, seq: int, esn: bool, iv: bytes, text: bytes) -> bytes:
    """The ESP packet (header, IV, encrypted ``text``, ICV) computed with ``cryptography``.

    ``text`` is the padded plaintext with its pad length and next header.
    """
    header = _esp_header(spi, seq)
    if spec.aead:
        return header + iv + _aead_reference(spec, spec.salt + iv, _aad(spi, seq, esn), iv, text)
    body = header + iv + _crypt(spec, iv, text, True)
    # RFC 4303 2.2.1: with ESN the high half is appended to what the ICV covers.
    return body + _mac(spec, body + _seq_hi(seq, esn))


def reference_open(spec: _Spec, packet: bytes, seq: int, esn: bool) -> Optional[bytes]:
    """The padded plaintext of a non-AEAD ESP packet, or None if its ICV is wrong."""
    icv_len, iv_len = spec.icv_bits // 8, spec.cipher.iv_bytes
    body, icv = packet[:-icv_len], packet[-icv_len:]
    if not constant_time.bytes_eq(_mac(spec, body + _seq_hi(seq, esn)), icv):
        return None
    return _crypt(spec, body[8: 8 + iv_len], body[8 + iv_len:], False)


# ------------------------------------------------------------------ the known-answer tests

_SPI = 0xC0DE0042
_VECTORS = ((0x2A, False), ((1 << 32) | 7, True))   # (64-bit sequence number, ESN)
_PAYLOAD = b"espdp known-answer test " + bytes(range(19))
_NH_IPV4 = 4
_SRC, _DST = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")


class KatError(Exception):
    """The engine disagreed with the reference."""


def _padded(spec: _Spec, payload: bytes, next_header: int) -> bytes:
    """RFC 4303 2.4: pad with 1, 2, 3 ... to the cipher's block (at least 4 bytes)."""
    align = max(4, spec.cipher.block_bytes)
    pad = -(len(payload) + 2) % align
    return payload + bytes(range(1, pad + 1)) + bytes((pad, next_header))


def _iv(spec: _Spec, seq: int) -> bytes:
    """The IV on the wire: fixed for CBC here, the sequence number for counter modes."""
    if spec.random_iv:
        return bytes(range(0xA0, 0xB0))
    return seq.to_bytes(8, "big")[: spec.cipher.iv_bytes]


def _tampered(packet: bytes) -> bytes:
    return packet[:-1] + bytes((packet[-1] ^ 0x01,))


def _kat_transform(spec: _Spec) -> None:
    """Seal and open through ``Transform`` against the reference, raising KatError."""
    from ._crypto import Transform

    auth_id = spec.integ.engine_id if spec.integ else algorithms.AUTH_NONE
    transform = Transform(spec.cipher.engine_id, spec.enc_key, spec.icv_bits // 8, auth_id,
                          spec.auth_key)
    text = _padded(spec, _PAYLOAD, _NH_IPV4)
    for seq, esn in _VECTORS:
        case = f"seq {seq:#x}{' with ESN' if esn else ''}"
        iv = _iv(spec, seq)
        plain = _esp_header(_SPI, seq) + iv + text
        expected = reference_seal(spec, _SPI, seq, esn, iv, text)
        if spec.random_iv:
            sealed = transform.seal(_esp_header(_SPI, seq) + bytes(len(iv)) + text, seq, esn)
            if sealed[8: 8 + len(iv)] == bytes(len(iv)):
                raise KatError(f"the engine left the CBC IV zero ({case})")
            if reference_open(spec, sealed, seq, esn) != text:
                raise KatError(f"the reference cannot open the engine's packet ({case})")
        elif transform.seal(plain, seq, esn) != expected:
            raise KatError(f"the engine's packet differs from the reference ({case})")
        if transform.open(expected, seq, esn) != plain:
            raise KatError(f"the engine cannot open the reference packet ({case})")
        if transform.open(_tampered(expected), seq, esn) is not None:
            raise KatError(f"the engine accepts a corrupted ICV ({case})")


def _sa_info(spec: _Spec):
    from .sa import AlgoKey, SAInfo

    if spec.aead:
        keys = {"aead": AlgoKey(spec.cipher.name, spec.enc_key, spec.icv_bits)}
    else:
        assert spec.integ is not None
        keys = {"enc": AlgoKey(spec.cipher.name, spec.enc_key),
                "auth": AlgoKey(spec.integ.name, spec.auth_key, spec.icv_bits)}
    return SAInfo(src=_SRC, dst=_DST, spi=_SPI, mode="tunnel", replay_window=64, **keys)


def _inner_packet(size: int) -> bytes:
    """An IPv4/UDP packet of exactly ``size`` bytes."""
    header = bytearray.fromhex("4500000000004000401100000a0000010a000002")
    header[2:4] = size.to_bytes(2, "big")
    return bytes(header) + _fixed_bytes(size - len(header), 0x33)


def _kat_sa(spec: _Spec) -> None:
    """One packet through an SA and back, its ESP part checked against the reference."""
    from .engine import SA, SATable

    outbound, peer = SA(_sa_info(spec)), SATable()
    peer.add(SA(_sa_info(spec)))
    inner = _inner_packet(120)
    verdict, outer, _ = outbound.encrypt_packet(inner)
    if verdict != "ok" or outer is None:
        raise KatError(f"SA encrypt_packet: {verdict}")
    esp, text = outer[(outer[0] & 0x0F) * 4:], _padded(spec, inner, _NH_IPV4)
    if spec.random_iv:
        same = reference_open(spec, esp, 1, False) == text
    else:
        same = esp == reference_seal(spec, _SPI, 1, False, _iv(spec, 1), text)
    if not same:
        raise KatError("the SA's ESP packet differs from the reference")
    verdict, decrypted, _ = peer.decrypt_packet(outer)
    if verdict != "ok" or decrypted != inner:
        raise KatError(f"SA round trip: decrypt_packet gave {verdict}")


def _check(spec: _Spec) -> TransformReport:
    kat_passed = False
    try:
        _kat_transform(spec)
        kat_passed = True
        _kat_sa(spec)
    except Exception as e:  # noqa: BLE001 -- any failure makes this one transform unusable
        return _report(spec, kat_passed, _reason(e))
    return _report(spec, True, "")


def _reason(error: Exception) -> str:
    if isinstance(error, KatError):
        return f"known-answer test failed: {error}"
    return f"{type(error).__name__}: {error}"


# ------------------------------------------------------------------ speed

INNER_SIZE = 1400


def _packets_per_second(spec: _Spec, seconds: float, slices: int = 3) -> float:
    """Encrypt batches of 64 inner packets, refilling each time; the best of ``slices``
    (on a shared machine, interference only ever slows down)."""
    from .engine import SA, PacketBatch

    sa, template, work = SA(_sa_info(spec)), PacketBatch(64), PacketBatch(64)
    inner = _inner_packet(INNER_SIZE)
    for _ in range(64):
        template.add(inner)
    work.copy_from(template)
    sa.encrypt(work)                      # warm up
    best = 0.0
    for _ in range(slices):
        packets, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / slices or not packets:
            work.copy_from(template)
            done = sa.encrypt(work)
            if done != len(work):
                raise KatError(f"batch encrypt passed {done} of {len(work)} packets")
            packets += done
        best = max(best, packets / elapsed)
    return best


def _measured(spec: _Spec, report: TransformReport, seconds: float) -> TransformReport:
    try:
        pps = _packets_per_second(spec, seconds)
    except Exception as e:  # noqa: BLE001
        return replace(report, usable=False, reason=f"measurement: {_reason(e)}")
    return replace(report, packets_per_second=pps,
                   gbit_per_second=pps * INNER_SIZE * 8 / 1e9)


# ------------------------------------------------------------------ public API

def probe(measure: bool = False, seconds: float = 0.2,
          progress: Optional[Callable[[str], None]] = None) -> list[TransformReport]:
    """Every transform espdp knows, each with its known-answer result.

    A failure (OpenSSL lacking an algorithm, a FIPS provider, a wrong
    result) makes that one entry unusable, with the reason; the probe goes
    on.  With ``measure``, usable entries are timed for ``seconds`` each;
    ``progress`` gets a line before each measurement.
    """
    specs = _specs()
    reports = []
    for number, spec in enumerate(specs, 1):
        report = _check(spec)
        if measure and report.usable:
            if progress is not None:
                progress(f"measuring {spec.keyword} ({number}/{len(specs)})")
            report = _measured(spec, report, seconds)
        reports.append(report)
    return reports


def proposal(reports: Sequence[TransformReport], include_legacy: bool = False, *,
             include_unencrypted: bool = False, include_short_icv: bool = False) -> str:
    """ESP proposals in swanctl's ``esp_proposals`` syntax, fastest first.

    One AEAD proposal and one encryption + integrity proposal (strongSwan
    cannot mix them), each ending in ``-esn-noesn``.  Only usable entries
    that IKEv2 can negotiate are listed; legacy ones (MD5) only when asked.
    Unless asked, also left out: GMAC and NULL encryption (a peer taking the
    fastest would send cleartext) and AEAD ICVs under 128 bits (no faster,
    easier to forge).  Raises ValueError when nothing is left or when the
    reports were not measured.
    """
    chosen = [r for r in reports if r.usable and r.negotiable
              and (include_legacy or not r.legacy)
              and (include_unencrypted or r.confidential)
              and (include_short_icv or r.aead is None or r.icv_bits >= 128)]
    if any(r.packets_per_second is None for r in chosen):
        raise ValueError("a proposal needs measured reports: probe(measure=True)")
    by_speed = sorted(chosen, key=lambda r: -(r.packets_per_second or 0.0))
    parts = []
    aead = [r.keyword for r in by_speed if r.aead is not None]
    if aead:
        parts.append("-".join(aead))
    enc_integ = _enc_integ_keywords([r for r in by_speed if r.aead is None])
    if enc_integ:
        parts.append("-".join(enc_integ))
    if not parts:
        raise ValueError("no usable transform to propose")
    return ",".join(f"{part}-esn-noesn" for part in parts)


def _enc_integ_keywords(by_speed: list[TransformReport]) -> list[str]:
    """Encryption keywords by their best speed, then integrity keywords by theirs.

    A strongSwan proposal allows every encryption with every integrity
    algorithm in it, so a keyword whose combination failed is dropped (the
    one missing most combinations first) until every pair is usable.
    """
    pairs = [tuple(r.keyword.split("-")) for r in by_speed]   # fastest first
    encs = list(dict.fromkeys(enc for enc, _ in pairs))
    integs = list(dict.fromkeys(integ for _, integ in pairs))
    present = set(pairs)
    while True:
        missing = [(e, i) for e in encs for i in integs if (e, i) not in present]
        if not missing:
            return encs + integs if encs and integs else []
        count = Counter(k for pair in missing for k in pair)
        slowness = {k: n for n, k in enumerate(encs)} | {k: n for n, k in enumerate(integs)}
        worst = max(count, key=lambda k: (count[k], slowness[k]))
        encs = [e for e in encs if e != worst]
        integs = [i for i in integs if i != worst]


# ------------------------------------------------------------------ command line

_COLUMNS = ("{:<22} {:<33} {:>4} {:>4} {:>4} {:>4} {:>5} {:<4}")


def format_table(reports: Sequence[TransformReport]) -> str:
    """The reports as a table for a person."""
    measured = any(r.packets_per_second is not None for r in reports)
    head = _COLUMNS.format("strongSwan", "XFRM", "key", "salt", "ICV", "ENCR", "INTEG", "KAT")
    lines = [head + ("  Gbit/s     kpps" if measured else "") + "  notes"]
    for r in reports:
        row = _COLUMNS.format(r.keyword, r.xfrm, r.key_bits, r.salt_bits, r.icv_bits,
                              r.ikev2_encr_id, "-" if r.aead else r.ikev2_integ_id or "none",
                              "ok" if r.kat_passed else "FAIL")
        if measured:
            row += (f"  {r.gbit_per_second:6.2f} {r.packets_per_second / 1e3:8.1f}"
                    if r.packets_per_second is not None else f"  {'-':>6} {'-':>8}")
        notes = [r.note] if r.note else []
        if not r.usable:
            notes.insert(0, f"NOT USABLE: {r.reason}")
        lines.append(f"{row}  {'; '.join(notes)}".rstrip())
    return "\n".join(lines)


def _progress(line: str) -> None:
    if sys.stderr.isatty():
        print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="espdp algs",
        description="List the ESP transforms this build can use, each proven by a "
                    "known-answer test through the engine.")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument("--measure", action="store_true",
                        help=f"time {INNER_SIZE}-byte inner packets through the engine")
    parser.add_argument("--proposal", action="store_true",
                        help="print only a strongSwan esp_proposals line, fastest first "
                             "(implies --measure)")
    parser.add_argument("--all", action="store_true",
                        help="include failed and legacy entries (and legacy ones in --proposal)")
    parser.add_argument("--seconds", type=float, default=0.2, metavar="S",
                        help="measuring time per transform (default 0.2)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``espdp algs``: 0 when at least one transform is usable, 1 otherwise."""
    args = _parser().parse_args(argv)
    measure = args.measure or args.proposal
    reports = probe(measure, args.seconds, _progress if measure else None)
    if measure and sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    if args.proposal:
        try:
            print(proposal(reports, include_legacy=args.all))
        except ValueError as e:
            print(f"espdp algs: {e}", file=sys.stderr)
            return 1
        return 0
    shown = [r for r in reports if args.all or (r.usable and not r.legacy)]
    if args.json:
        print(json.dumps([r.as_dict() for r in shown], indent=2))
    else:
        print(format_table(shown))
    return 0 if any(r.usable for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())

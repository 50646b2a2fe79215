"""An independent decryptor: tshark, given the esp_sa file espdp writes,
decrypts what espdp encrypted (Wireshark's own ESP code, not ours)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess

import pytest

from espdp.engine import SA
from espdp.pcap import PcapWriter, write_wireshark_esp_sa
from espdp.sa import AlgoKey, Encap, SAInfo

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(
    TSHARK is None and not os.environ.get("CI"),
    reason="tshark is not installed (scripts/bootstrap.sh installs it; CI always has it)")

TRANSFORMS = {
    "aes128gcm16": dict(aead=AlgoKey("rfc4106(gcm(aes))", bytes(range(20)), 128)),
    "aes256gcm8": dict(aead=AlgoKey("rfc4106(gcm(aes))", bytes(range(36)), 64)),
    "aes128-sha1": dict(enc=AlgoKey("cbc(aes)", bytes(range(16))),
                        auth=AlgoKey("hmac(sha1)", bytes(range(20)), 96)),
    "aes256-sha256": dict(enc=AlgoKey("cbc(aes)", bytes(range(32))),
                          auth=AlgoKey("hmac(sha256)", bytes(range(32)), 128)),
    "aes128ctr-sha512": dict(enc=AlgoKey("rfc3686(ctr(aes))", bytes(range(20))),
                             auth=AlgoKey("hmac(sha512)", bytes(range(64)), 256)),
    "null-sha384": dict(enc=AlgoKey("ecb(cipher_null)", b""),
                        auth=AlgoKey("hmac(sha384)", bytes(range(48)), 192)),
}


def _udp4(payload: bytes) -> bytes:
    udp = (40000).to_bytes(2, "big") + (7777).to_bytes(2, "big") + \
        (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    return (b"\x45\0" + (20 + len(udp)).to_bytes(2, "big") + b"\0\1\0\0\x40\x11\0\0"
            + bytes([10, 9, 1, 1, 10, 9, 2, 1]) + udp)


@pytest.mark.parametrize("outer", ["ipv4", "ipv6", "ipv4-udp"])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_tshark_decrypts_what_espdp_encrypts(name, outer, tmp_path):
    src, dst = ("2001:db8::1", "2001:db8::2") if outer == "ipv6" else ("192.0.2.1", "192.0.2.2")
    info = SAInfo(src=ipaddress.ip_address(src), dst=ipaddress.ip_address(dst), spi=0x5EC0001,
                  mode="tunnel", encap=Encap("espinudp", 4500, 4500) if "udp" in outer else None,
                  **TRANSFORMS[name])
    sa = SA(info)
    payloads = [bytes([i]) * (i * 37 % 700 + 1) for i in range(12)]
    with PcapWriter(tmp_path / "esp.pcap") as writer:
        for payload in payloads:
            verdict, packet, _ = sa.encrypt_packet(_udp4(payload))
            assert verdict == "ok"
            writer.write(packet)
    config = tmp_path / "wireshark"
    config.mkdir()
    export = write_wireshark_esp_sa(config / "esp_sa", [info], esn_columns=False)
    assert export.written == 1
    proc = subprocess.run(
        [TSHARK or "tshark", "-n", "-r", str(tmp_path / "esp.pcap"),
         "-o", "esp.enable_encryption_decode:TRUE", "-d", "udp.port==7777,data",
         "-T", "fields", "-e", "esp.sequence", "-e", "data.data"],
        capture_output=True, text=True, env={**os.environ, "WIRESHARK_CONFIG_DIR": str(config)},
        timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [int(seq) for seq, _ in rows] == list(range(1, 13))
    assert [bytes.fromhex(data.replace(":", "")) for _, data in rows] == payloads

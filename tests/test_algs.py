"""espdp algs: which transforms the engine really supports, their ids and the proposal."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import espdp._crypto
import espdp.engine
from espdp import algorithms, algs
from espdp.algs import TransformReport

ROOT = Path(__file__).resolve().parent.parent

AEADS = ([f"aes{k}gcm{i}" for k in (128, 192, 256) for i in (8, 12, 16)]
         + [f"aes{k}ccm{i}" for k in (128, 192, 256) for i in (8, 12, 16)]
         + [f"aes{k}gmac" for k in (128, 192, 256)] + ["chacha20poly1305"])
ENCRYPTIONS = ["aes128", "aes192", "aes256", "aes128ctr", "aes192ctr", "aes256ctr", "null"]
INTEGRITIES = ["sha1", "sha256", "sha256_96", "sha384", "sha512", "aescmac", "md5"]
EXPECTED = AEADS + [f"{e}-{i}" for e in ENCRYPTIONS for i in INTEGRITIES]


@pytest.fixture(scope="module")
def reports() -> dict[str, TransformReport]:
    return {r.keyword: r for r in algs.probe()}


def _others_usable(found: list[TransformReport], broken: str) -> bool:
    return all(r.usable and r.kat_passed for r in found if r.keyword != broken)


# ------------------------------------------------------------------ the probe

def test_every_expected_transform_is_usable_with_its_known_answer_test_passed(reports):
    assert sorted(reports) == sorted(EXPECTED)
    failed = {k: r.reason for k, r in reports.items() if not (r.usable and r.kat_passed)}
    assert failed == {}


def test_probe_without_measuring_takes_well_under_a_second(reports):
    start = time.perf_counter()
    algs.probe()
    assert time.perf_counter() - start < 1.0


def test_key_sizes_match_what_the_xfrm_registry_accepts(reports):
    for r in reports.values():
        name, kind = (r.aead, "aead") if r.aead else (r.enc, "enc")
        assert r.key_bits + r.salt_bits in algorithms.lookup(kind, name).key_bits
        if r.auth:
            assert r.auth_key_bits in algorithms.lookup("auth", r.auth).key_bits


@pytest.mark.parametrize("broken", ["aes128gcm16", "aes256ccm8", "aes128-sha256",
                                    "aes192ctr-aescmac", "null-sha512"])
def test_a_transform_whose_reference_bytes_disagree_is_not_usable(monkeypatch, broken):
    real = algs.reference_seal

    def corrupted(spec, *args):
        packet = real(spec, *args)
        if spec.keyword != broken:
            return packet
        return packet[:-5] + bytes((packet[-5] ^ 0x80,)) + packet[-4:]

    monkeypatch.setattr(algs, "reference_seal", corrupted)
    found = algs.probe()
    bad = next(r for r in found if r.keyword == broken)
    assert not bad.usable and not bad.kat_passed
    assert bad.reason.startswith("known-answer test failed")
    assert len(found) == len(EXPECTED) and _others_usable(found, broken)


def test_an_exception_in_one_transform_does_not_stop_the_probe(monkeypatch):
    real = algs.reference_seal

    def exploding(spec, *args):
        if spec.keyword == "aes256ctr-sha512":
            raise RuntimeError("reference unavailable")
        return real(spec, *args)

    monkeypatch.setattr(algs, "reference_seal", exploding)
    found = algs.probe()
    bad = next(r for r in found if r.keyword == "aes256ctr-sha512")
    assert not bad.usable and bad.reason == "RuntimeError: reference unavailable"
    assert _others_usable(found, "aes256ctr-sha512")


def test_an_algorithm_the_engine_cannot_set_up_is_reported_with_the_reason(monkeypatch):
    real = espdp._crypto.Transform

    def transform(cipher, *args):
        if cipher == algorithms.CIPHER_AES_CCM:
            raise RuntimeError("OpenSSL refused to set up the cipher context")
        return real(cipher, *args)

    monkeypatch.setattr(espdp._crypto, "Transform", transform)
    found = {r.keyword: r for r in algs.probe()}
    ccm = [r for k, r in found.items() if "ccm" in k]
    assert len(ccm) == 9 and all(not r.usable and "OpenSSL refused" in r.reason for r in ccm)
    assert all(r.usable for k, r in found.items() if "ccm" not in k)


def test_an_sa_round_trip_failure_makes_a_transform_unusable_after_a_good_kat(monkeypatch):
    real = espdp.engine.SATable

    class BrokenTable:
        def __init__(self):
            self.table = real()

        def add(self, sa):
            return self.table.add(sa)

        def decrypt_packet(self, packet, mark=0):
            return ("integrity", None, mark)

    monkeypatch.setattr(espdp.engine, "SATable", BrokenTable)
    r = next(r for r in algs.probe() if r.keyword == "aes128gcm16")
    assert r.kat_passed and not r.usable
    assert "decrypt_packet gave integrity" in r.reason


def test_measuring_gives_packets_and_bits_per_second_for_usable_entries():
    found = algs.probe(measure=True, seconds=0.001)
    assert all(r.packets_per_second and r.packets_per_second > 0 for r in found)
    for r in found:
        assert r.gbit_per_second == pytest.approx(r.packets_per_second * 1400 * 8 / 1e9)


# ------------------------------------------------------------------ ids and keywords

@pytest.mark.parametrize("keyword, encr, integ, key, salt, icv", [
    ("aes128gcm16", 20, None, 128, 32, 128),
    ("aes256gcm12", 19, None, 256, 32, 96),
    ("aes192gcm8", 18, None, 192, 32, 64),
    ("aes128ccm16", 16, None, 128, 24, 128),
    ("aes256ccm8", 14, None, 256, 24, 64),
    ("aes192ccm12", 15, None, 192, 24, 96),
    ("aes128gmac", 21, None, 128, 32, 128),
    ("chacha20poly1305", 28, None, 256, 32, 128),
    ("aes128-sha256", 12, 12, 128, 0, 128),
    ("aes256ctr-sha512", 13, 14, 256, 32, 256),
    ("aes192-sha384", 12, 13, 192, 0, 192),
    ("null-sha1", 11, 2, 0, 0, 96),
    ("aes128-aescmac", 12, 8, 128, 0, 96),
    ("aes256-md5", 12, 1, 256, 0, 96),
])
def test_ikev2_ids_and_sizes_of_known_entries(reports, keyword, encr, integ, key, salt, icv):
    r = reports[keyword]
    assert (r.ikev2_encr_id, r.ikev2_integ_id) == (encr, integ)
    assert (r.key_bits, r.salt_bits, r.icv_bits) == (key, salt, icv)
    assert r.negotiable


def test_xfrm_names_behind_strongswan_keywords(reports):
    assert reports["aes256gcm12"].aead == "rfc4106(gcm(aes))"
    assert reports["aes128ccm8"].aead == "rfc4309(ccm(aes))"
    assert reports["aes256gmac"].aead == "rfc4543(gcm(aes))"
    assert reports["chacha20poly1305"].aead == "rfc7539esp(chacha20,poly1305)"
    r = reports["aes256ctr-sha512"]
    assert (r.aead, r.enc, r.auth) == (None, "rfc3686(ctr(aes))", "hmac(sha512)")
    assert (reports["null-sha1"].enc, reports["null-sha1"].auth) == ("ecb(cipher_null)",
                                                                      "hmac(sha1)")


def test_truncated_sha256_is_listed_but_not_negotiable_in_ikev2(reports):
    r96, r128 = reports["aes128-sha256_96"], reports["aes128-sha256"]
    assert (r96.auth, r96.icv_bits, r96.ikev2_integ_id) == ("hmac(sha256)", 96, None)
    assert not r96.negotiable and "not negotiable in IKEv2" in r96.note
    assert r96.usable and r128.negotiable and r128.icv_bits == 128


def test_md5_is_legacy_and_gmac_and_null_are_marked_unencrypted(reports):
    assert reports["aes128-md5"].legacy and "legacy" in reports["aes128-md5"].note
    assert not any(r.legacy for k, r in reports.items() if not k.endswith("-md5"))
    unencrypted = {k for k, r in reports.items() if not r.confidential}
    assert unencrypted == {k for k in EXPECTED if "gmac" in k or k.startswith("null-")}


# ------------------------------------------------------------------ the proposal

def fake(keyword: str, pps: float | None, **changes) -> TransformReport:
    """A report with a given speed (fields the proposal ignores are filler)."""
    is_aead = "-" not in keyword
    r = TransformReport(
        keyword=keyword, aead="rfc4106(gcm(aes))" if is_aead else None,
        enc=None if is_aead else "cbc(aes)", auth=None if is_aead else "hmac(sha256)",
        key_bits=128, salt_bits=32 if is_aead else 0, icv_bits=128, auth_key_bits=256,
        ikev2_encr_id=20 if is_aead else 12, ikev2_integ_id=None if is_aead else 12,
        kat_passed=True, usable=True, packets_per_second=pps,
        gbit_per_second=None if pps is None else pps * 1400 * 8 / 1e9)
    return replace(r, **changes)


SYNTHETIC = [
    fake("aes128gcm16", 5e5), fake("aes256gcm16", 4e5), fake("chacha20poly1305", 9e5),
    fake("aes128-sha256", 1e5), fake("aes256-sha256", 2e5),
    fake("aes128-sha512", 3e5), fake("aes256-sha512", 1.5e5),
    # faster than all of the above, but not to be proposed by default
    fake("aes128gcm8", 9e6, icv_bits=64), fake("aes128gmac", 9e6, confidential=False),
    fake("null-sha256", 9e6, confidential=False), fake("aes128-md5", 9e6, legacy=True),
    fake("aes256-md5", 8e6, legacy=True), fake("aes128-sha256_96", 9e6, ikev2_integ_id=None),
    fake("aes192gcm16", 9e6, usable=False, kat_passed=False, reason="known-answer test failed"),
]


def test_proposal_orders_transforms_from_fastest_to_slowest():
    assert algs.proposal(SYNTHETIC) == ("chacha20poly1305-aes128gcm16-aes256gcm16-esn-noesn,"
                                        "aes128-aes256-sha512-sha256-esn-noesn")


def test_proposal_includes_legacy_entries_only_when_asked():
    assert "md5" not in algs.proposal(SYNTHETIC)
    assert algs.proposal(SYNTHETIC, include_legacy=True).endswith(
        ",aes128-aes256-md5-sha512-sha256-esn-noesn")


def test_proposal_leaves_out_unencrypted_and_short_icv_transforms_unless_asked():
    assert "gmac" not in algs.proposal(SYNTHETIC) and "null" not in algs.proposal(SYNTHETIC)
    assert algs.proposal(SYNTHETIC, include_unencrypted=True).startswith("aes128gmac-")
    assert algs.proposal(SYNTHETIC, include_short_icv=True).startswith("aes128gcm8-")


def test_proposal_drops_a_keyword_whose_combination_is_not_usable():
    reports = [fake("aes128-sha256", 3e5), fake("aes256-sha256", 2e5),
               fake("aes128-sha512", 4e5), fake("aes256-sha512", 5e5, usable=False)]
    # aes256 is slower than sha512, so aes256 goes and sha512 stays
    assert algs.proposal(reports) == "aes128-sha512-sha256-esn-noesn"


def test_proposal_needs_measured_reports():
    with pytest.raises(ValueError, match="measured"):
        algs.proposal([fake("aes128gcm16", None)])
    with pytest.raises(ValueError, match="no usable"):
        algs.proposal([fake("aes128-md5", 1e5, legacy=True)])


def test_proposal_from_a_real_measurement_is_well_formed():
    line = algs.proposal(algs.probe(measure=True, seconds=0.001))
    aead, enc_integ = line.split(",")
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*-esn-noesn", aead)
    assert "aes128gcm16" in aead and "chacha20poly1305" in aead and "aes128-" not in aead
    assert "gmac" not in line and "md5" not in line and "sha256_96" not in line
    assert {"aes128", "aes256ctr", "sha256", "sha512", "aescmac"} <= set(enc_integ.split("-"))


# ------------------------------------------------------------------ command line

def test_cli_prints_a_table_of_usable_transforms(capsys):
    assert algs.main([]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["strongSwan", "XFRM", "key"]
    assert re.search(r"^aes128gcm16\s+rfc4106\(gcm\(aes\)\)\s+128\s+32\s+128\s+20\s+-\s+ok",
                     out, re.M)
    assert "aes128-sha256_96" in out and "md5" not in out


def test_cli_all_includes_legacy_entries(capsys):
    assert algs.main(["--all"]) == 0
    assert re.search(r"^aes128-md5 .*legacy$", capsys.readouterr().out, re.M)


def test_cli_json_is_a_list_of_reports_with_their_fields(capsys):
    assert algs.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["keyword"] for d in data} == {k for k in EXPECTED if not k.endswith("-md5")}
    gcm = next(d for d in data if d["keyword"] == "aes128gcm16")
    assert gcm["aead"] == "rfc4106(gcm(aes))" and gcm["ikev2_encr_id"] == 20
    assert gcm["kat_passed"] and gcm["usable"] and gcm["negotiable"]
    assert gcm["packets_per_second"] is None
    assert {"enc", "auth", "key_bits", "salt_bits", "icv_bits", "ikev2_integ_id", "reason",
            "legacy", "gbit_per_second"} <= gcm.keys()


def test_cli_proposal_prints_one_line_and_progress_on_stderr(capsys):
    assert algs.main(["--proposal", "--seconds", "0.001"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1 and lines[0].endswith("-esn-noesn") and "," in lines[0]
    assert "measuring aes128gcm16" in captured.err


def test_cli_measure_shows_speeds(capsys):
    assert algs.main(["--measure", "--seconds", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "Gbit/s" in out.splitlines()[0]
    assert re.search(r"^chacha20poly1305 .* ok\s+\d+\.\d\d\s+\d+\.\d", out, re.M)


def test_python_m_espdp_algs_runs():
    done = subprocess.run([sys.executable, "-m", "espdp.algs", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert any(d["keyword"] == "chacha20poly1305" for d in json.loads(done.stdout))

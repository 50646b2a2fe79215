"""The TOML configuration: ip xfrm words as keys, located errors, nothing half-read."""

from __future__ import annotations

import ipaddress

import pytest

from espdp.config import load, loads
from espdp.errors import ConfigError
from espdp.sa import Encap, Lifetime, Mark
from espdp.xfrm.parse import parse_state
from espdp.xfrm.policy_parse import parse_policy

KEY = "0x" + "11" * 20
FULL = f"""
[tunnel]
tun = "esp0"
address = ["10.9.1.1/32", "fd09:1::1/128"]
route = ["10.9.2.0/24", "fd09:2::/64"]
udp_port = 4500
control = "/run/espdp/esp0.sock"

[[sa]]
src = "198.51.100.1"
dst = "203.0.113.7"
proto = "esp"
spi = 0xc0ffee01
reqid = 1
mode = "tunnel"
aead = {{ name = "rfc4106(gcm(aes))", key = "{KEY}", icv_bits = 128 }}
replay_window = 128
flag = ["esn"]
set_mark = {{ value = 0x42, mask = 0xff }}
encap = {{ type = "espinudp", sport = 4500, dport = 4500 }}
limit = {{ time_soft = 3300, time_hard = 3600 }}

[[sa]]
src = "203.0.113.7"
dst = "198.51.100.1"
spi = 0xc0ffee02
mode = "transport"
enc = {{ name = "cbc(aes)", key = "0x{'22' * 16}" }}
auth = {{ name = "hmac(sha256)", key = "0x{'33' * 32}", trunc_bits = 128 }}
mark = 7
sel = {{ src = "10.0.0.0/8", dst = "10.1.0.0/16", proto = "tcp", dport = 443 }}

[[policy]]
src = "10.9.1.0/24"
dst = "10.9.2.0/24"
dir = "out"
priority = 100
[[policy.tmpl]]
src = "198.51.100.1"
dst = "203.0.113.7"
proto = "esp"
reqid = 1
mode = "tunnel"
"""


def test_toml_means_the_same_as_the_ip_xfrm_lines():
    cfg = loads(FULL, "t.toml")
    assert cfg.tunnel.tun == "esp0" and cfg.tunnel.udp_port == 4500
    assert cfg.tunnel.address[1] == ipaddress.ip_interface("fd09:1::1/128")
    sa1, sa2, pol = cfg.commands
    expected = parse_state(
        f"add src 198.51.100.1 dst 203.0.113.7 proto esp spi 0xc0ffee01 reqid 1 mode tunnel "
        f"aead 'rfc4106(gcm(aes))' {KEY} 128 replay-window 128 flag esn "
        f"set-mark 0x42 mask 0xff encap espinudp 4500 4500 0.0.0.0 "
        f"limit time-soft 3300 limit time-hard 3600").info
    assert sa1.info == expected
    assert sa1.info.set_mark == Mark(0x42, 0xFF) and sa1.info.encap == Encap("espinudp", 4500,
                                                                               4500)
    assert sa1.info.lifetime == Lifetime(soft_add_expires=3300, hard_add_expires=3600)
    assert sa2.info.auth.bits == 128 and sa2.info.mark == Mark(7)
    assert sa2.info.selector.dport == 443
    assert pol.policy == parse_policy(
        "add src 10.9.1.0/24 dst 10.9.2.0/24 dir out priority 100 tmpl src 198.51.100.1 "
        "dst 203.0.113.7 proto esp reqid 1 mode tunnel").policy


def test_xfrm_key_adds_the_lines_of_a_script(tmp_path):
    (tmp_path / "sas.xfrm").write_text(
        f"ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 9 "
        f"aead 'rfc4106(gcm(aes))' {KEY} 128\n")
    (tmp_path / "c.toml").write_text('xfrm = "sas.xfrm"\n[tunnel]\nfd = 5\n')
    cfg = load(tmp_path / "c.toml")
    assert cfg.tunnel.fd == 5 and cfg.commands[0].info.spi == 9


@pytest.mark.parametrize("text, message", [
    ("[tunnel]\ntun = 'x'\nbogus = 1\n", "[tunnel]: 'tunnel': unknown key 'bogus'"),
    ("[tunnel]\n", "needs 'tun'"),
    ("[tunnel]\ntun = 'x'\naddress = [5]\n", "'address'"),
    ("[tunnel]\ntun = 'x'\nnat_keepalive = true\n", "'nat_keepalive'"),
    ("[tunnel]\ntun = 'a-name-that-is-far-too-long'\n", "'tun'"),
    ("[tunnel]\ntun = 'x'\nudp_port = 70000\n", "'udp_port'"),
    ("[tunnel]\ntun = 'x'\naddress = ['nonsense']\n", "'address'"),
    ("[[sa]]\nsrc = '1.2.3.4'\ndst = '5.6.7.8'\nspi = 1\ncolour = 'red'\n",
     "[[sa]] 1: unknown key 'colour'"),
    ("[[sa]]\nsrc = '1.2.3.4'\ndst = '5.6.7.8'\nspi = 'zz'\n"
     f"aead = {{ name = 'rfc4106(gcm(aes))', key = '{KEY}', icv_bits = 128 }}\n",
     "[[sa]] 1: 'spi'"),
    ("[[sa]]\nsrc = '1.2.3.4'\ndst = '5.6.7.8'\nspi = 1\n"
     "aead = { name = 'rfc4106(gcm(aes))', key = '0x0011', icv_bits = 128 }\n",
     "[[sa]] 1"),
    ("[[policy]]\nsrc = '10.0.0.0/8'\ndst = '10.1.0.0/16'\ndir = 'sideways'\n",
     "[[policy]] 1"),
    ("this is = not toml [", "<config>"),
    ("[nonsense]\n", "unknown table or key 'nonsense'"),
])
def test_bad_configuration_is_refused_with_its_location(text, message):
    with pytest.raises(ConfigError) as exc:
        loads(text)
    assert message in str(exc.value)
    assert "0011" not in str(exc.value) and "1111111111" not in str(exc.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml"):
        load(tmp_path / "missing.toml")


def test_files_that_are_not_utf8_or_nested_too_deeply_are_config_errors(tmp_path):
    # Both used to escape as UnicodeDecodeError / RecursionError tracebacks.
    (tmp_path / "bin.toml").write_bytes(b"[tunnel]\ntun = 'x\xff'\n")
    with pytest.raises(ConfigError, match=r"bin.toml:2: not UTF-8 text"):
        load(tmp_path / "bin.toml")
    (tmp_path / "bin.xfrm").write_bytes(b"ip xfrm state \xfe\n")
    (tmp_path / "x.toml").write_text('xfrm = "bin.xfrm"\n[tunnel]\nfd = 5\n')
    with pytest.raises(ConfigError, match=r"x.toml: xfrm = 'bin.xfrm': .*bin.xfrm:1: not UTF-8"):
        load(tmp_path / "x.toml")
    with pytest.raises(ConfigError, match="nested too deeply"):
        loads("a = " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        loads("a = " + "{b = " * 5000 + "}" * 5000)

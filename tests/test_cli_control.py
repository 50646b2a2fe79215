"""`espdp xfrm`, `espdp status` and `espdp run` argument handling against a
control socket served in this process (the daemon itself is in test_e2e)."""

from __future__ import annotations

import json
import time

import pytest
from helpers import serve_control

from espdp import config
from espdp.cli import main
from espdp.client import format_status
from espdp.errors import ConfigError
from espdp.xfrm import Xfrm

KEY = "0x" + "5a" * 20
SA = ["state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp", "spi", "0x77",
      "reqid", "3", "mode", "tunnel", "aead", "rfc4106(gcm(aes))", KEY, "128"]


@pytest.fixture
def served(tmp_path):
    """A control socket on an Xfrm model, polled by a thread until the test ends."""
    xfrm = Xfrm()
    status = {"tun": "esp9", "uptime": 3.0, "policies": 0, "sas": [], "no_sa_drops": {}}
    with serve_control(str(tmp_path / "c.sock"), xfrm, {"status": lambda r, now: status}) \
            as path:
        yield path, xfrm


def test_xfrm_add_list_get_delete(served, capsys):
    path, xfrm = served
    assert main(["xfrm", "--control", path, *SA]) == 0
    assert main(["xfrm", "--control", path, "state", "list"]) == 0
    text = capsys.readouterr().out
    assert "spi 0x00000077 reqid 3 mode tunnel" in text
    assert KEY[2:] not in text  # keys only when asked
    assert main(["xfrm", "--control", path, "--json", "--show-keys", "state", "get", "src",
                 "192.0.2.1", "dst", "192.0.2.2", "proto", "esp", "spi", "0x77"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["aead"]["key"] == KEY and got["reqid"] == 3
    assert main(["xfrm", "--control", path, "state", "delete", "src", "192.0.2.1", "dst",
                 "192.0.2.2", "proto", "esp", "spi", "0x77"]) == 0
    assert main(["xfrm", "--control", path, "state", "count"]) == 0
    assert capsys.readouterr().out.strip() == "0"


def test_xfrm_errors_are_one_line_with_the_errno(served, capsys):
    path, _ = served
    assert main(["xfrm", "--control", path, "state", "get", "src", "192.0.2.1", "dst",
                 "192.0.2.2", "proto", "esp", "spi", "0x99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("espdp: ") and "(ESRCH)" in err and err.count("\n") == 1
    assert main(["xfrm", "--control", path, "state", "add", "src", "1.2.3.4", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["xfrm", "--control", path, "route", "list"]) == 2
    assert "usage" in capsys.readouterr().err


def test_monitor_prints_events_as_they_happen(served):
    import subprocess
    import sys

    from espdp.lab import python_env

    path, _ = served
    proc = subprocess.Popen([sys.executable, "-m", "espdp", "xfrm", "--control", path,
                             "monitor", "SA"], stdout=subprocess.PIPE, text=True,
                            env=python_env())
    try:
        time.sleep(1.0)
        assert main(["xfrm", "--control", path, *SA]) == 0
        line = proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait()
    assert line.startswith("sa ") or line.startswith("newsa "), line
    assert "0x00000077" in line and KEY[2:] not in line


def test_status_text_and_json(served, capsys):
    path, _ = served
    assert main(["status", "--control", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tun"] == "esp9"
    assert main(["status", "--control", path]) == 0
    assert capsys.readouterr().out.startswith("esp9: up 3s, 0 SAs")


def test_unreachable_daemon_is_a_clear_error(tmp_path, capsys):
    assert main(["xfrm", "--control", str(tmp_path / "none.sock"), "state", "list"]) == 2
    assert "cannot reach the daemon" in capsys.readouterr().err


def test_run_refuses_bad_input_before_touching_anything(tmp_path, capsys):
    assert main(["run"]) == 2
    assert "needs --tun" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[tunnel]\ntun = 'esp0'\nnat_keepalive = 'often'\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "'nat_keepalive'" in capsys.readouterr().err
    assert main(["run", "--tun", "esp0", "--address", "10.0.0.300/24"]) == 2
    assert "'address'" in capsys.readouterr().err
    assert main(["run", "--tun", "esp0", "--metrics", "nowhere"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_flags_add_to_and_override_the_file(tmp_path):
    xf = tmp_path / "sas.xfrm"
    xf.write_text("ip xfrm " + " ".join(SA[:15]) + f" 'rfc4106(gcm(aes))' {KEY} 128\n")
    base = config.loads("[tunnel]\ntun = 'esp1'\naddress = ['10.0.0.1/32']\nudp_port = 4600\n")
    cfg = config.override(base, xfrm=xf, address=["fd00::1/128"], udp_port=4700, mtu=None)
    assert [str(a) for a in cfg.tunnel.address] == ["10.0.0.1/32", "fd00::1/128"]
    assert cfg.tunnel.udp_port == 4700 and cfg.tunnel.tun == "esp1"
    assert len(cfg.commands) == 1
    with pytest.raises(ConfigError, match="udp_port"):
        config.override(base, udp_port=70000)


def test_status_format_lists_each_sa():
    text = format_status({
        "tun": "esp0", "uptime": 12.0, "policies": 4, "no_sa_drops": {"no_sa": 2},
        "sas": [{"spi": "0x0000a0b0", "reqid": 1, "state": "valid", "src": "192.0.2.1",
                 "dst": "192.0.2.2", "mode": "tunnel", "encap": "udp 4500->4500",
                 "algorithms": ["rfc4106(gcm(aes))"], "packets": 10, "bytes": 2048,
                 "drops": {"replay": 1}, "age": 11.0}],
        "counters": {"tun_in": 10, "tun_out": 9, "sent": 10, "received": 9, "injected": 0,
                     "policy_drops": {}, "engine_drops": {"replay": 1}}})
    assert "spi 0x0000a0b0 reqid 1 valid: 192.0.2.1 -> 192.0.2.2, tunnel, udp 4500->4500" \
        in text
    assert "10 packets, 2.0 KiB, 1 drops (replay 1), age 11s" in text
    assert "dropped before an SA was found: no_sa 2" in text


def test_marks_print_as_ip_prints_them(served, capsys):
    path, _ = served
    assert main(["xfrm", "--control", path, *SA, "mark", "0x10", "mask", "0xff", "output-mark",
                 "0x77"]) == 0
    assert main(["xfrm", "--control", path, "state", "list"]) == 0
    text = capsys.readouterr().out
    assert "\tmark 0x10/0xff\n" in text and "\toutput-mark 0x77/0xffffffff\n" in text

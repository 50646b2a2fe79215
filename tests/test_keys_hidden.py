"""Keys are never shown (issue 8): not in log records, error messages, what
``espdp xfrm`` and ``espdp status`` print without ``--show-keys``, nor in
``espdp xfrm monitor``; and a file that must hold keys (the Wireshark
``esp_sa`` export) is created mode 0600, whatever the umask.

A running daemon's own outputs (its log at -v, status, monitor, list,
metrics, state files) are checked end to end by
tests/test_e2e.py::test_keys_appear_nowhere_a_running_daemon_writes, and
the error messages of bad ``ip xfrm`` lines and TOML files by
tests/test_bad_input_table.py; here the same paths run in this process, so
that every log record can be captured (caplog) and every error and output
listed.  Each test also shows the key where it is asked for, so that a
check that cannot see a key cannot pass.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time

import pytest
from helpers import inner_packet, serve_control

from espdp.cli import main
from espdp.config import Config
from espdp.control import ControlServer
from espdp.daemon import Daemon
from espdp.errors import ConfigError
from espdp.io.memory import MemoryPipe, MemoryUdp
from espdp.lab import python_env
from espdp.pcap import PcapWriter, write_wireshark_esp_sa
from espdp.seqguard import SequenceGuard
from espdp.tunnel import Tunnel
from espdp.xfrm import Xfrm

GCM_KEY = "7e57ab1e" * 5                  # AES-128 + salt
ENC_KEY = "c0c0a5a5" * 4                  # AES-128-CBC
AUTH_KEY = "a17bd00d" * 8                 # HMAC-SHA-256
TEXT_KEY = "correcthorsebattery!"        # a text key (20 bytes, iproute2 takes those)
SECRETS = (GCM_KEY, GCM_KEY[::-1], ENC_KEY, AUTH_KEY, TEXT_KEY, TEXT_KEY.encode().hex())

ID = "src 192.0.2.1 dst 192.0.2.2 proto esp"
GCM_SA = f"ip xfrm state add {ID} spi 0x1001 reqid 1 mode tunnel " \
         f"aead 'rfc4106(gcm(aes))' 0x{GCM_KEY} 128 encap espinudp 4500 4500 0.0.0.0"
CBC_SA = f"ip xfrm state add src 192.0.2.2 dst 192.0.2.1 proto esp spi 0x2002 reqid 2 " \
         f"mode tunnel enc 'cbc(aes)' 0x{ENC_KEY} auth-trunc 'hmac(sha256)' 0x{AUTH_KEY} 128"
TEXT_SA = f"ip xfrm state add {ID} spi 0x3003 mode transport " \
          f"aead 'rfc4106(gcm(aes))' '{TEXT_KEY}' 128"
POLICY = "ip xfrm policy add src 10.1.0.0/16 dst 10.2.0.0/16 dir out " \
         "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel"
# An UPDSA carrying other keys: accepted, the keys left as they are (as XFRM does).
REKEY = GCM_SA.replace("state add", "state update").replace(GCM_KEY, GCM_KEY[::-1])
# Requests that fail, each with key material in it.
FAILING = [
    GCM_SA,                                                           # EEXIST
    GCM_SA.replace("0x1001", "0x1009").replace(GCM_KEY, GCM_KEY[:-2]),   # key too short
    GCM_SA.replace("0x1001", "0x100a").replace(f"0x{GCM_KEY} 128", f"128 0x{GCM_KEY}"),

    TEXT_SA.replace("0x3003", "0x300a").replace(f"'{TEXT_KEY}' 128", f"128 '{TEXT_KEY}'"),
    GCM_SA.replace("0x1001", "0x100b") + f" auth sha1 0x{AUTH_KEY}",   # aead and auth
    CBC_SA.replace(f"auth-trunc 'hmac(sha256)' 0x{AUTH_KEY} 128", ""),  # no integrity
    f"ip xfrm state add {ID} spi 0x100c aead 0x{GCM_KEY} 128",          # key for the name
    f"ip xfrm state add {ID} spi 0x100d enc 'cbc(aes)' {TEXT_KEY} auth sha1",
]


def assert_hidden(text: str, where: str) -> None:
    low = text.lower()
    for secret in SECRETS:
        assert secret.lower() not in low, f"a key shows in {where}"


def assert_shown(text: str) -> None:
    """The check can see a key where one is asked for."""
    low = text.lower()
    assert GCM_KEY in low and AUTH_KEY in low


# ---------------------------------------------------------------- logs and errors

def test_no_key_in_any_log_record_or_error_message(caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    errors, outputs = [], []
    wire_a, wire_b = MemoryUdp.pair(("192.0.2.1", 4500), ("192.0.2.2", 4500))
    app, tun = MemoryPipe.pair()
    _, tun_b = MemoryPipe.pair()
    with Tunnel(tun, sockets={4: wire_a}) as t, Tunnel(tun_b, sockets={4: wire_b}) as peer:
        guard = SequenceGuard(str(tmp_path / "esp0.seq.json"))
        guard.attach(t.xfrm)

        def broken_listener(event):       # the model logs a failing callback, event and all
            raise RuntimeError(f"listener failed on {event.type}")

        t.subscribe(broken_listener)
        for line in (GCM_SA, CBC_SA, TEXT_SA, POLICY, REKEY):
            outputs.append(json.dumps(t.execute(line)))
        peer.execute(GCM_SA)
        peer.execute(POLICY.replace("dir out", "dir in"))
        for line in FAILING:
            with pytest.raises(ConfigError) as exc:
                t.execute(line)
            errors.append(str(exc.value))
        outputs.append(json.dumps(t.execute("ip xfrm state list")))
        outputs.append(json.dumps(t.execute(f"ip xfrm state get {ID} spi 0x1001")))
        outputs += [repr(st.info) + str(st.info) + repr(st.engine) for st in t.xfrm.sad.dump()]
        outputs += [json.dumps(e.to_json()) for e in t.xfrm.events()]
        # traffic through the policy and the SA to the peer, and the timers
        app.write(inner_packet(4, "udp", 100, src="10.1.0.1", dst="10.2.0.1"))
        assert t.poll(0.5) == 1 and peer.poll(0.5) == 1
        assert peer.xfrm.sad.table[0].stats()["packets"] == 1
        shown = json.dumps(t.xfrm.execute("ip xfrm state list", 0, show_keys=True))
        t.execute(f"ip xfrm state update {ID} spi 0x1001 reqid 1 mode tunnel "
                  f"aead 'rfc4106(gcm(aes))' 0x{GCM_KEY} 128 encap espinudp 4500 4500 "
                  "0.0.0.0 limit time-hard 1")
        t.xfrm.tick(time.monotonic() + 5)                 # hard expiry: an EXPIRE event
        guard.check()
    assert_shown(shown)
    assert any("listener failed" in r.getMessage() + (r.exc_text or "")
               for r in caplog.records), "nothing was logged: the check would be empty"
    for record in caplog.records:
        assert_hidden(record.getMessage() + (record.exc_text or ""),
                      f"the log record {record.getMessage()!r}")
    for i, text in enumerate(errors):
        assert_hidden(text, f"the error of FAILING[{i}]: {text}")
    for text in outputs:
        assert_hidden(text, "an answer or a repr")
    assert_hidden((tmp_path / "esp0.seq.json").read_text(), "the sequence reservations")


# ---------------------------------------------------------------- what the CLI prints

@pytest.fixture
def served_daemon(tmp_path):
    """A control socket on an XFRM model whose `status` is the daemon's own."""
    daemon = Daemon(Config())
    with serve_control(str(tmp_path / "c.sock"), daemon.xfrm, {"status": daemon.status}) \
            as path:
        yield path, daemon


def _monitor(path: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "espdp", "xfrm", "--control", path, *args,
                             "monitor"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=python_env())


def test_espdp_xfrm_status_and_monitor_show_no_key_unless_asked(served_daemon, capsys):
    path, daemon = served_daemon
    monitors = [_monitor(path), _monitor(path, "--json")]
    try:
        time.sleep(1.0)                               # subscribed before the events
        for line in (GCM_SA, CBC_SA, TEXT_SA, POLICY, REKEY):
            assert main(["xfrm", "--control", path, *_words(line)]) == 0
        for line in FAILING:
            assert main(["xfrm", "--control", path, *_words(line)]) == 2
        assert main(["xfrm", "--control", path, "state", "update", *_words(GCM_SA)[2:],
                     "limit", "time-soft", "1000"]) == 0   # an UPDSA event
        views = [["state"], ["state", "list"], ["--json", "state", "list"], ["-j", "state"],
                 ["state", "get", *ID.split(), "spi", "0x1001"],
                 ["--json", "state", "get", *ID.split(), "spi", "0x3003"],
                 ["state", "count"], ["policy", "list"]]
        for view in views:
            assert main(["xfrm", "--control", path, *view]) == 0
        assert main(["status", "--control", path]) == 0
        assert main(["status", "--control", path, "--json"]) == 0
        assert main(["xfrm", "--control", path, "state", "delete", *ID.split(), "spi",
                     "0x3003"]) == 0
        time.sleep(0.5)
    finally:
        for m in monitors:
            m.terminate()
    out, err = capsys.readouterr()
    assert "spi 0x00002002" in out and "0x<hidden>" in out and "3 SAs" in out
    assert err.count("\n") == len(FAILING)
    assert_hidden(out, "espdp xfrm / espdp status output")
    assert_hidden(err, "an espdp xfrm error")
    for m in monitors:
        events = m.communicate(timeout=10)[0]
        assert events.count("\n") >= 6, events         # newsa x3, updsa, delsa, policy
        assert_hidden(events, "espdp xfrm monitor")
    assert main(["xfrm", "--control", path, "--show-keys", "state", "list"]) == 0
    assert_shown(capsys.readouterr().out)


def _words(line: str) -> list:
    import shlex

    words = shlex.split(line)
    return words[2:] if words[:2] == ["ip", "xfrm"] else words


# ---------------------------------------------------------------- files with keys

KEYS_SA = (f"ip xfrm state add {ID} spi 0x1001 mode tunnel "
           f"aead 'rfc4106(gcm(aes))' 0x{GCM_KEY} 128\n" + CBC_SA + "\n")


@pytest.mark.parametrize("exists", [False, True], ids=["new", "existing-0644"])
def test_the_wireshark_key_export_is_0600_even_with_umask_000(tmp_path, exists):
    sas = tmp_path / "sas.xfrm"
    sas.write_text(KEYS_SA)
    with PcapWriter(str(tmp_path / "in.pcap")) as w:
        w.write(inner_packet(4, "udp", 30), 1.0)
    keys_out = tmp_path / "esp_sa"
    if exists:
        keys_out.write_text("old\n")
        keys_out.chmod(0o644)
    proc = subprocess.run(
        [sys.executable, "-m", "espdp", "pcap", "encrypt", "--xfrm", str(sas), "--spi",
         "0x1001", str(tmp_path / "in.pcap"), str(tmp_path / "out.pcap"), "--keys-out",
         str(keys_out)], capture_output=True, text=True, env=python_env(),
        preexec_fn=lambda: os.umask(0))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(keys_out.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "out.pcap").stat().st_mode) == 0o666   # umask 000 seen
    assert_shown(keys_out.read_text())                                     # it holds them
    assert_hidden(proc.stdout + proc.stderr, "espdp pcap encrypt's report")


def test_files_espdp_writes_for_itself_are_0600_with_umask_000(tmp_path):
    old = os.umask(0)
    try:
        x = Xfrm()
        x.execute(GCM_SA, 0)
        SequenceGuard(str(tmp_path / "g.json")).attach(x)
        server = ControlServer(str(tmp_path / "c.sock"), x)
        export = write_wireshark_esp_sa(tmp_path / "esp_sa", [st.info for st in x.sad.dump()])
    finally:
        os.umask(old)
    try:
        for name in ("g.json", "c.sock", "esp_sa"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        assert export.written == 1
    finally:
        server.close()

"""Faults (issue 8): what goes wrong around a running tunnel, for real.

* The peer disappears and returns: its daemon is SIGKILLed in the middle of
  a TCP stream and started again with the same configuration; the stream
  completes with the same SHA-256 at both ends and ping works again, while
  this side's daemon carried on throughout.
* The TUN device is removed under a daemon (``ip link del``): without it
  nothing can be carried, so the daemon says so in one line, removes what
  it made and exits 1 (see the README); the peer is unaffected.
* Control clients that go away mid-message, leave without reading, stall
  half-way, or monitor and get killed: the daemon keeps serving, and its
  file descriptors come back to where they were.
* A full disk: ``espdp pcap`` writing a capture or a key file to a small
  tmpfs (mounted in a private mount namespace) stops with one line naming
  the file, no traceback; a daemon whose state directory fills up refuses
  to send under a sequence number it could not reserve and stops, exit 1.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import inner_packet

from espdp.lab import INNER, Lab, keys, python_env, sh, tunnel_config
from espdp.pcap import PcapWriter

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root, network namespaces and /dev/net/tun")

MIB = 1 << 20


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait(predicate, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# ---------------------------------------------------------------- the peer

def test_the_peer_killed_and_restarted_traffic_resumes():
    with Lab("peer") as lab:
        k = keys()
        a = lab.start("a", tunnel_config("a", 4, True, *k))
        config_b = tunnel_config("b", 4, True, *k)
        lab.start("b", config_b)
        target = INNER["b"][0]
        assert lab.ping("a", target)
        result: dict = {}

        def stream():   # 6 MiB over at least 6 s, across the outage
            try:
                result["ok"] = lab.transfer("a", "b", target, 6 * MIB, port=5301, seconds=6,
                                            timeout=60)
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                result["error"] = e

        thread = threading.Thread(target=stream)
        thread.start()
        time.sleep(1.5)
        b = lab.daemons.pop()
        b.stop(signal.SIGKILL)                      # the peer is gone, nothing cleaned up
        assert not lab.ping("a", target, count=2)
        sent_before = a.status()["counters"]["sent"]
        time.sleep(1.0)
        assert a.proc.poll() is None                # this side carries on ...
        assert a.status()["counters"]["sent"] > sent_before   # ... still sending (TCP retries)
        lab.start("b", config_b)                    # the peer returns
        thread.join(90)
        assert not thread.is_alive()
        assert "error" not in result, result.get("error")
        assert result["ok"]["bytes"] == 6 * MIB     # the same SHA-256 at both ends
        assert lab.ping("a", target) and lab.ping("a", INNER["b"][1])
        assert a.proc.poll() is None and "Traceback" not in a.output()


# ---------------------------------------------------------------- the TUN device

def test_the_tun_device_removed_under_the_daemon_stops_it_cleanly():
    with Lab("tundel") as lab:
        k = keys()
        a = lab.start("a", tunnel_config("a", 4, True, *k))
        b = lab.start("b", tunnel_config("b", 4, True, *k))
        assert lab.ping("a", INNER["b"][0])
        sh("ip", "link", "del", "esp0", ns=a.ns)
        assert _wait(lambda: a.proc.poll() is not None, 10), "the daemon did not stop"
        log = a.output()
        assert a.proc.returncode == 1, log
        assert "espdp: tun esp0: the device went away (File descriptor in bad state): " \
               "stopping" in log, log
        assert "stopped; routes, addresses and devices removed" in log
        assert "Traceback" not in log
        assert not os.path.exists(a.control)
        state = sorted(p.name for p in (lab.dir / "a-state").iterdir())
        assert state == ["esp0.seq.json"], state      # what it installed is accounted for
        routes = sh("ip", "route", "show", "table", "all", ns=a.ns).stdout
        assert "10.9.2.0/24" not in routes
        assert b.proc.poll() is None and b.status()["tun"] == "esp0"   # the peer is fine


# ---------------------------------------------------------------- control clients

def _connect(path: str) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(path)
    return c


def _ask(path: str, request: dict) -> dict:
    with _connect(path) as c:
        c.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(65536)
            assert chunk, "the daemon closed the connection"
            data += chunk
    return json.loads(data)


def test_control_clients_that_vanish_or_stall_do_not_stop_the_daemon():
    with Lab("ctl") as lab:
        k = keys()
        a = lab.start("a", tunnel_config("a", 4, True, *k))
        path, pid = a.control, a.proc.pid
        assert "espdp" in Path(f"/proc/{pid}/cmdline").read_text()
        _ask(path, {"op": "status"})
        time.sleep(0.5)                               # the daemon has seen that one go
        fds = _fds(pid)
        stalled = _connect(path)                      # half a request, then nothing
        stalled.sendall(b'{"op": "xfrm", "line": "ip xfrm sta')
        for i in range(100):
            c = _connect(path)
            if i % 4 == 0:                            # half a request, then gone
                c.sendall(b'{"id": 1, "op": "xfrm", "li')
            elif i % 4 == 1:                          # a whole request, gone before the answer
                c.sendall(b'{"id": 2, "op": "xfrm", "line": "ip xfrm state list"}\n' * 50)
            elif i % 4 == 2:                          # a request, read a few bytes, gone
                c.sendall(b'{"id": 3, "op": "status"}\n')
                c.recv(5)
            c.close()                                 # (i % 4 == 3: connected, nothing said)
        # Monitors killed while events are produced.
        monitors = [subprocess.Popen(
            ["ip", "netns", "exec", a.ns, sys.executable, "-m", "espdp", "xfrm", "--control",
             path, "monitor"], stdout=subprocess.PIPE, env=python_env()) for _ in range(3)]
        time.sleep(1.0)
        spi = 0x7000
        for m in monitors:
            m.kill()
            m.wait()
            for _ in range(20):                       # events for a monitor that is gone
                spi += 1
                answer = _ask(path, {"op": "xfrm", "line": (
                    f"ip xfrm state add src 192.0.2.9 dst 192.0.2.1 proto esp spi {spi:#x} "
                    f"mode tunnel aead 'rfc4106(gcm(aes))' {keys(1)[0]} 128")})
                assert answer["ok"], answer
        # The stalled client does not hold up anyone else, and goes when it is closed.
        start = time.monotonic()
        assert _ask(path, {"op": "xfrm", "line": "ip xfrm state count"})["result"]["count"] \
            == 2 + 60
        assert time.monotonic() - start < 1.0
        stalled.close()
        assert _wait(lambda: _fds(pid) == fds, 5), (_fds(pid), fds)
        assert a.proc.poll() is None and "Traceback" not in a.output()
        assert lab.start("b", tunnel_config("b", 4, True, *k)) and lab.ping("a", INNER["b"][0])


# ---------------------------------------------------------------- a full disk

SAS = ("ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x10 mode tunnel "
       "aead 'rfc4106(gcm(aes))' 0x{key} 128\n")


def _on_small_tmpfs(mount: Path, argv: list, fill: bool = False) -> subprocess.CompletedProcess:
    """``argv`` in a private mount namespace where ``mount`` is a 256 KiB tmpfs
    (filled up first if ``fill``)."""
    script = f"mount -t tmpfs -o size=256k tmpfs {shlex.quote(str(mount))} && "
    if fill:
        script += f"(dd if=/dev/zero of={shlex.quote(str(mount / 'fill'))} bs=4k " \
                  "2>/dev/null; true) && "
    script += shlex.join(argv)
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, env=python_env(), timeout=60)


@pytest.mark.parametrize("case", ["encrypt-output", "keys-out", "decrypt-output"])
def test_a_full_disk_when_writing_a_capture_is_one_clear_line(tmp_path, case):
    key = keys(1)[0][2:]
    (tmp_path / "sas.xfrm").write_text(SAS.format(key=key))
    with PcapWriter(str(tmp_path / "plain.pcap")) as w:
        for i in range(600):                         # ~600 KiB: more than the tmpfs holds
            w.write(inner_packet(4, "udp", 1000, fill=i), 1.0 + i)
    small = tmp_path / "small"
    small.mkdir()
    espdp = [sys.executable, "-m", "espdp", "pcap"]
    sas, plain = str(tmp_path / "sas.xfrm"), str(tmp_path / "plain.pcap")
    if case == "encrypt-output":
        proc = _on_small_tmpfs(small, espdp + ["encrypt", "--xfrm", sas, "--spi", "0x10", plain,
                                               str(small / "out.pcap")])
        where = small / "out.pcap"
    elif case == "keys-out":
        proc = _on_small_tmpfs(small, espdp + ["encrypt", "--xfrm", sas, "--spi", "0x10", plain,
                                               str(tmp_path / "out.pcap"), "--keys-out",
                                               str(small / "esp_sa")], fill=True)
        where = small / "esp_sa"
    else:
        assert subprocess.run(espdp + ["encrypt", "--xfrm", sas, "--spi", "0x10", plain,
                                       str(tmp_path / "esp.pcap")], env=python_env(),
                              capture_output=True).returncode == 0
        proc = _on_small_tmpfs(small, espdp + ["decrypt", "--xfrm", sas,
                                               str(tmp_path / "esp.pcap"),
                                               str(small / "dec.pcap")])
        where = small / "dec.pcap"
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"espdp: {where}: No space left on device"), proc.stderr
    if case != "keys-out":
        assert "the capture written so far is incomplete" in proc.stderr
    assert key not in proc.stderr


def test_a_full_state_directory_stops_the_daemon_before_a_nonce_could_repeat():
    """The state directory is a 256 KiB tmpfs in the daemon's own mount namespace;
    once it is full, an SA added through the control socket cannot have its
    sequence numbers reserved: the daemon must not send with it, and stops."""
    with Lab("full") as lab:
        k = keys()
        config = lab.dir / "a.toml"
        config.write_text(tunnel_config("a", 4, True, *k))
        state = lab.dir / "a-state"
        state.mkdir()
        control = str(lab.dir / "a.sock")
        log = lab.dir / "a.log"
        script = (f"mount -t tmpfs -o size=256k tmpfs {state} && exec {sys.executable} -m "
                  f"espdp run --config {config} --control {control} --state-dir {state}")
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", lab.ns["a"], "unshare", "-m",
                                     "--propagation", "private", "sh", "-c", script],
                                    stdout=out, stderr=subprocess.STDOUT, env=python_env(),
                                    start_new_session=True)
        try:
            assert _wait(lambda: os.path.exists(control), 20), log.read_text()
            assert _ask(control, {"op": "status"})["ok"]
            sh("nsenter", "-t", str(proc.pid), "-m", "sh", "-c",
               f"dd if=/dev/zero of={state}/fill bs=4k 2>/dev/null; true")
            # A reservation is a line appended to the file: the first few fit in
            # its last page; SAs are added until one does not.
            answers = []
            for spi in range(0x5151, 0x5151 + 400):
                try:
                    answers.append(_ask(control, {"op": "xfrm", "line": (
                        f"ip xfrm state add src 192.0.2.1 dst 192.0.2.9 proto esp "
                        f"spi {spi:#x} mode tunnel aead 'rfc4106(gcm(aes))' "
                        f"{keys(1)[0]} 128")}))
                except OSError:
                    break                              # the daemon went while answering
                if proc.poll() is not None:
                    break
            assert answers and all(a["ok"] for a in answers), answers[-3:]  # as the kernel
            assert _wait(lambda: proc.poll() is not None, 10), "the daemon did not stop"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        text = log.read_text()
        assert proc.returncode == 1, text
        assert (f"espdp: {state}/esp0.seq.json: cannot write the sequence reservations (No "
                "space left on device); sending on could repeat a nonce after a restart: "
                "stopping") in text, text
        assert "Traceback" not in text and "stopped; routes" in text
        assert not os.path.exists(control)
        for key in k:
            assert key[2:] not in text

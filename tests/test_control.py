"""The control socket: JSON lines, errors that keep the connection, events,
keys only on request, and only root or the owner admitted."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile

import pytest

from espdp.control import MAX_LINE, ControlServer, ControlSession
from espdp.errors import ConfigError
from espdp.xfrm import Xfrm

KEY = "0x" + "ab" * 20
ADD = (f"ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1001 mode tunnel "
       f"aead 'rfc4106(gcm(aes))' {KEY} 128")


def ask(session: ControlSession, request, now: float = 0.0) -> dict:
    raw = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
    return json.loads(session.receive(raw, now))


def test_xfrm_requests_are_answered_in_order_with_their_ids():
    s = ControlSession(Xfrm())
    assert ask(s, {"id": 1, "op": "xfrm", "line": ADD}) == {"id": 1, "ok": True, "result": {}}
    listed = ask(s, {"id": 2, "op": "xfrm", "line": "ip xfrm state list"})
    assert listed["id"] == 2 and listed["result"]["states"][0]["spi"] == "0x00001001"


def test_keys_are_shown_only_when_asked():
    s = ControlSession(Xfrm())
    ask(s, {"op": "xfrm", "line": ADD})
    hidden = json.dumps(ask(s, {"op": "xfrm", "line": "ip xfrm state list"}))
    shown = json.dumps(ask(s, {"op": "xfrm", "line": "ip xfrm state list", "show_keys": True}))
    assert "abababab" not in hidden and "abababab" in shown


def test_kernel_errors_carry_their_errno_and_keep_the_connection():
    s = ControlSession(Xfrm())
    answer = ask(s, {"id": 7, "op": "xfrm",
                     "line": "ip xfrm state get src 192.0.2.1 dst 192.0.2.2 proto esp spi 9"})
    assert answer["ok"] is False and answer["errno"] == "ESRCH" and answer["id"] == 7
    assert not s.closed


@pytest.mark.parametrize("raw, message", [
    (b"{not json\n", "not a JSON object"),
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"op": "frobnicate"}\n', "unknown op"),
    (b'{"op": "xfrm"}\n', "needs a 'line'"),
    (b'{"op": "xfrm", "line": "ip xfrm state add src 1.2.3.4"}\n', "<xfrm>:1"),
    (b"[" * 60000 + b"\n", "not a JSON object"),                  # was a RecursionError
    (b'{"op": "status", "x": ' + b'{"a": ' * 10000 + b"\n", "not a JSON object"),
])
def test_malformed_requests_get_an_error_answer(raw, message):
    s = ControlSession(Xfrm())
    answer = ask(s, raw)
    assert answer["ok"] is False and message in answer["error"]
    assert not s.closed


def test_an_oversized_line_closes_the_connection():
    s = ControlSession(Xfrm())
    answer = json.loads(s.receive(b"x" * (MAX_LINE + 1), 0))
    assert answer["ok"] is False and s.closed


def test_an_oversized_line_closes_the_connection_even_when_it_arrives_whole():
    # A line that came with its newline in the same read used to be parsed
    # whatever its length; the requests after it are not answered.
    s = ControlSession(Xfrm())
    line = b'{"op": "xfrm", "line": "' + b"a" * MAX_LINE + b'"}\n'
    [answer] = s.receive(line + b'{"op": "monitor"}\n', 0).splitlines()
    assert "longer than" in json.loads(answer)["error"] and s.closed


def test_monitor_delivers_events_as_json_lines():
    x = Xfrm()
    s = ControlSession(x)
    ask(s, {"op": "monitor", "groups": ["expire"]})
    ask(s, {"op": "xfrm", "line": "ip xfrm state allocspi src 192.0.2.1 dst 192.0.2.2 "
                                  "proto esp min 0x2000 max 0x2000 limit time-hard 5"})
    x.tick(5)
    [line] = s.take_events().splitlines()
    event = json.loads(line)["event"]
    assert event["type"] == "expire" and event["hard"] and event["sa"]["spi"] == "0x00002000"
    s.close()
    x.tick(6)
    assert s.take_events() == b""


@pytest.fixture
def sock_dir():
    path = tempfile.mkdtemp(prefix="espdp-ctl-")
    os.chmod(path, 0o755)  # so that another user can reach the socket file itself
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _client(path: str) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    c.settimeout(5)
    return c


def test_server_socket_is_mode_0600_and_answers(sock_dir):
    path = os.path.join(sock_dir, "ctl.sock")
    server = ControlServer(path, Xfrm())
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        c = _client(path)
        server.poll(0, timeout=1)
        c.sendall(b'{"id": 1, "op": "xfrm", "line": "ip xfrm state count"}\n')
        server.poll(0, timeout=1)
        assert json.loads(c.recv(4096)) == {"id": 1, "ok": True, "result": {"count": 0}}
        c.close()
        server.poll(0, timeout=0.2)  # the client left: forgotten, nothing raised
    finally:
        server.close()
    assert not os.path.exists(path)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_is_refused_even_when_the_file_mode_would_let_it_in(sock_dir):
    path = os.path.join(sock_dir, "ctl.sock")
    server = ControlServer(path, Xfrm())
    try:
        os.chmod(path, 0o666)  # only SO_PEERCRED stands in the way now
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child becomes 'nobody' and tries
            try:
                os.close(read_end)
                os.setgid(65534)
                os.setuid(65534)
                c = _client(path)
                os.write(write_end, c.recv(4096) or b"closed")
            finally:
                os._exit(0)
        os.close(write_end)
        for _ in range(20):
            server.poll(0, timeout=0.1)
            if server.refused:
                break
        os.waitpid(pid, 0)
        answer = os.read(read_end, 4096)
        assert server.refused == 1
        assert json.loads(answer) == {"ok": False, "error": "permission denied"}
    finally:
        server.close()


def test_a_stale_socket_is_replaced_and_a_live_one_refused(sock_dir):
    path = os.path.join(sock_dir, "ctl.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()                      # the file stays, nobody listens: a crashed daemon
    server = ControlServer(path, Xfrm())
    try:
        with pytest.raises(ConfigError, match="another daemon"):
            ControlServer(path, Xfrm())
    finally:
        server.close()

"""The control socket: JSON lines that mirror the XFRM operations and events.

A Unix stream socket, mode 0600, whose peers must be root or the user that
owns the daemon (checked with SO_PEERCRED, not just by the file mode).  One
request per line, one answer per request, in order::

    -> {"id": 1, "op": "xfrm", "line": "ip xfrm state list"}
    <- {"id": 1, "ok": true, "result": {"states": [...]}}
    -> {"id": 2, "op": "xfrm", "line": "ip xfrm state get ... spi 0x99"}
    <- {"id": 2, "ok": false, "errno": "ESRCH", "error": "..."}
    -> {"id": 3, "op": "monitor", "groups": ["acquire", "expire"]}
    <- {"id": 3, "ok": true, "result": {}}
    <- {"event": {"type": "acquire", ...}}          (as they happen)

:class:`ControlSession` is the protocol without I/O (``receive(data, now)``
returns the bytes to send); :class:`ControlServer` is the socket around it,
driven by the daemon's loop through ``fileno()``/``poll(now)``.  A malformed
request gets an error answer and the connection stays; a line over
``MAX_LINE`` bytes closes it.  Keys appear only when a request asks with
``"show_keys": true``.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import struct
from collections.abc import Callable
from typing import Any, Optional

from .errors import ConfigError, XfrmError

logger = logging.getLogger(__name__)

MAX_LINE = 64 * 1024


class ControlSession:
    """One client's conversation with the XFRM model (sans-I/O)."""

    def __init__(self, xfrm: Any, handlers: Optional[dict[str, Callable]] = None) -> None:
        self.xfrm = xfrm
        self.handlers = handlers or {}   # extra ops, e.g. "status": lambda request, now: {...}
        self._buffer = b""
        self._monitor: Optional[int] = None
        self._pending: list[bytes] = []
        self.closed = False
        self.internal_errors = 0   # requests that failed on a bug, not on bad input

    def receive(self, data: bytes, now: float) -> bytes:
        """Feed bytes from the client; the bytes to send back."""
        self._buffer += data
        out = []
        while b"\n" in self._buffer and not self.closed:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if len(line) > MAX_LINE:
                self._too_long(out)
            elif line.strip():
                out.append(self._answer(line, now))
        if len(self._buffer) > MAX_LINE and not self.closed:
            self._too_long(out)
        return b"".join(out)

    def _too_long(self, out: list) -> None:
        out.append(_line({"ok": False, "error": f"request longer than {MAX_LINE} bytes"}))
        self._buffer = b""
        self.close()

    def take_events(self) -> bytes:
        """Event lines for a monitoring client, since the last call."""
        pending, self._pending = self._pending, []
        return b"".join(pending)

    def close(self) -> None:
        if self._monitor is not None:
            self.xfrm.unsubscribe(self._monitor)
            self._monitor = None
        self.closed = True

    def _answer(self, line: bytes, now: float) -> bytes:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: the last
            return _line({"ok": False, "error": "not a JSON object"})
        if not isinstance(request, dict):
            return _line({"ok": False, "error": "not a JSON object"})
        answer: dict = {"id": request["id"]} if "id" in request else {}
        try:
            answer.update(ok=True, result=self._dispatch(request, now))
        except XfrmError as e:
            answer.update(ok=False, errno=e.errno, error=str(e.args[0]))
        except ConfigError as e:
            answer.update(ok=False, error=str(e))
        except Exception:  # a bug: the daemon must go on; the log and the counter tell
            self.internal_errors += 1
            logger.exception("control: request failed")
            answer.update(ok=False, error="internal error (see the daemon's log)")
        return _line(answer)

    def _dispatch(self, request: dict, now: float) -> Any:
        op = request.get("op")
        if not isinstance(op, str):
            raise ConfigError("'op' must be a string")
        if op == "xfrm":
            line = request.get("line")
            if not isinstance(line, str):
                raise ConfigError("'xfrm' needs a 'line' string")
            return self.xfrm.execute(line, now, show_keys=request.get("show_keys") is True)
        if op == "monitor":
            groups = request.get("groups") or None
            if groups is not None and not (isinstance(groups, list)
                                           and all(isinstance(g, str) for g in groups)):
                raise ConfigError("'groups' must be a list of event group names")
            if self._monitor is not None:
                self.xfrm.unsubscribe(self._monitor)
            self._monitor = self.xfrm.subscribe(
                lambda event: self._pending.append(_line({"event": event.to_json()})), groups)
            return {}
        if op in self.handlers:
            return self.handlers[op](request, now)
        raise ConfigError(f"unknown op {op!r} (known: xfrm, monitor"
                          + "".join(f", {k}" for k in self.handlers) + ")")


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ControlServer:
    """The listening socket and its clients; call ``poll(now)`` when ``fileno()``
    is readable or after events were produced (it never blocks)."""

    def __init__(self, path: str, xfrm: Any, handlers: Optional[dict] = None,
                 owner_uid: Optional[int] = None) -> None:
        self.path = path
        self.xfrm, self.handlers = xfrm, handlers
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        self.refused = 0
        if os.path.exists(path):
            _remove_stale(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: no window with wider rights
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            self._listener.bind(path)
        except OSError as e:
            self._listener.close()
            why = "a path in it is not a directory" if isinstance(e, FileExistsError) \
                else e.strerror
            raise ConfigError(f"control socket {path}: {why}") from None
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._listener.listen(16)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._clients: dict[socket.socket, ControlSession] = {}

    def fileno(self) -> int:
        """Readable when a client connects or sends (the epoll selector's fd)."""
        return self._selector.fileno()

    def poll(self, now: float, timeout: float = 0) -> None:
        for key, _ in self._selector.select(timeout):
            if key.fileobj is self._listener:
                self._accept()
            else:
                self._read(key.fileobj, now)
        self.flush()

    def flush(self) -> None:
        """Send monitoring clients the events produced since the last call."""
        for conn, session in list(self._clients.items()):
            events = session.take_events()
            if events:
                self._send(conn, events)

    def close(self) -> None:
        for conn in list(self._clients):
            self._drop(conn)
        self._selector.close()
        self._listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        uid = peer_uid(conn)
        if uid not in (0, self.owner_uid):
            self.refused += 1
            logger.warning("control: refused a connection from uid %d", uid)
            try:
                conn.sendall(_line({"ok": False, "error": "permission denied"}))
            except OSError:
                pass
            conn.close()
            return
        conn.setblocking(False)
        self._clients[conn] = ControlSession(self.xfrm, self.handlers)
        self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket, now: float) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        session = self._clients[conn]
        if not data:  # the client went away, perhaps mid-request: forget it
            self._drop(conn)
            return
        reply = session.receive(data, now)
        if reply:
            self._send(conn, reply)
        if session.closed:
            self._drop(conn)

    def _send(self, conn: socket.socket, data: bytes) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)  # a client that does not read must not stall the daemon
            conn.sendall(data)
            conn.setblocking(False)
        except OSError:
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        session = self._clients.pop(conn, None)
        if session is not None:
            session.close()
            self._selector.unregister(conn)
        conn.close()


def _remove_stale(path: str) -> None:
    """A socket file left by a crashed daemon is removed; a live one is an error."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ConfigError(f"{path}: another daemon is listening there")

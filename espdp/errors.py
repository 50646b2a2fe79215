"""Errors, split as h11 splits them.

* :class:`ConfigError` -- the caller asked for something invalid (a bad
  ``ip xfrm`` line, a wrong key length, an unknown SPI on the command line).
  These are *local* errors: the message names what was wrong and is meant for
  a person.  Messages never contain key material.
* :class:`XfrmError` -- an XFRM operation failed the way the kernel's would
  (``EEXIST``, ``ESRCH``, ``EINVAL``); it carries the errno name.
* :class:`FatalError` -- a running tunnel cannot go on (its TUN device was
  removed): ``espdp run`` says why, cleans up and exits 1.

Bad packets are *remote* input and never raise: the engine counts and drops
them and reports a verdict per packet (see :mod:`espdp.engine`).
"""

from __future__ import annotations


class EspdpError(Exception):
    """Base of every error espdp raises on purpose."""


class ConfigError(EspdpError, ValueError):
    """Invalid configuration or API use (a local error)."""


class XfrmError(ConfigError):
    """An XFRM operation failed as the kernel's would; ``errno`` is its name."""

    def __init__(self, errno: str, message: str) -> None:
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return f"{self.errno}: {self.args[0]}"


class FatalError(EspdpError):
    """A running tunnel cannot go on; the message says why (never with a key)."""

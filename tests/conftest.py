"""Fixtures shared by the test modules."""

from __future__ import annotations

import itertools
import os
import subprocess

import pytest

_names = itertools.count(1)


@pytest.fixture
def netns():
    """A network namespace of the test's own (unique name), deleted afterwards."""
    name = f"espdp-t{os.getpid()}-{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)

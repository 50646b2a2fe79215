"""The examples in module docstrings run."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["espdp.engine", "espdp.xfrm", "espdp.pcap",
                                    "espdp._replay", "espdp.tunnel", "espdp.config",
                                    "espdp.cluster.hash", "espdp.cluster.config",
                                    "espdp.cluster.balance"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0

"""The fuzz targets run on their seeds and on every input kept in
fuzz/regressions/ (crashes once found, now fixed), without atheris: what a
fuzzer found stays found."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets  # noqa: E402


def _cases():
    for name in targets.TARGETS:
        for k, seed in enumerate(targets.SEEDS.get(name, [])):
            yield pytest.param(name, seed, id=f"{name}-seed{k}")
        folder = FUZZ / "regressions" / name
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            yield pytest.param(name, path.read_bytes(), id=f"{name}-{path.name}")


@pytest.mark.parametrize("name, data", list(_cases()))
def test_target_accepts_its_inputs(name, data):
    targets.TARGETS[name](data)
    for cut in range(0, len(data), max(1, len(data) // 16)):  # and their prefixes
        targets.TARGETS[name](data[:cut])


def test_every_target_has_seeds():
    assert set(targets.SEEDS) == set(targets.TARGETS)
    assert all(targets.SEEDS[name] for name in targets.TARGETS)

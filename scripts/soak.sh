#!/usr/bin/env bash
# The soak of tests/test_soak.py for longer than make test's 40 s:
#   scripts/soak.sh SECONDS        (default 600)
# Two namespaces with espdp run, UDP and TCP checked end to end, rekeys every
# 5 s and churn of 1,000 SAs; RSS and file descriptors sampled and bounded.
# Prints the figures as one JSON line ("soak: {...}").  Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
[[ $seconds =~ ^[0-9]+$ ]] || { echo "usage: scripts/soak.sh SECONDS" >&2; exit 2; }
ESPDP_SOAK_SECONDS=$seconds exec .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_soak.py

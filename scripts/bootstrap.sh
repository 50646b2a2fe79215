#!/usr/bin/env bash
# Set up what espdp needs on this machine, idempotently:
#   system packages (when root and missing), a virtualenv in .venv with the
#   Python dependencies, and the Cython extension built in place.
# Used by `make demo`, `make test` and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(libssl-dev pkg-config iproute2 tshark nftables iputils-ping conntrack)
# The interop peers (tests/interop/).  The kernel's: qemu, and what
# scripts/build-vm.sh builds its image with (the kernel and busybox themselves
# are fetched with apt-get download, never installed).  strongSwan's: charon
# with kernel-libipsec, swanctl, the openssl/gcm plugins; tshark brings dumpcap
# for the captures, ethtool turns UDP GSO off on a veth so that they show
# segmented datagrams.
DEBS+=(qemu-system-x86 gcc libc6-dev linux-libc-dev cpio kmod)
DEBS+=(ethtool strongswan-charon strongswan-swanctl libcharon-extra-plugins
       libstrongswan-standard-plugins)
# The cluster tests start their own etcd; iptables compares with -m cluster.
DEBS+=(etcd-server iptables)
missing=()
for pkg in "${DEBS[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        echo "bootstrap: installing ${missing[*]}" >&2
        # no recommends: qemu's would bring a GUI, UEFI firmware and more
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "bootstrap: please install ${missing[*]} (apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.espdp-deps
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    .venv/bin/python -m pip install -q "cython>=3.0" numpy
    .venv/bin/python -m pip install -q --no-build-isolation -e ".[test,bench]"
    touch "$stamp"
fi
# Rebuild the extension when a Cython source changed (cythonize skips unchanged ones).
.venv/bin/python setup.py -q build_ext --inplace 2>&1 | grep -v -E "^(Compiling|\[)|warning: .*sign-compare|In function|^\s" >&2 || true
.venv/bin/python -c "import espdp.engine" || { echo "bootstrap: the engine did not build" >&2; exit 1; }

#!/usr/bin/env bash
# What the end-to-end benchmark (bench/e2e.py) needs besides the project (root, Debian):
# iperf3 to measure; wireguard-go and wireguard-tools for the WireGuard peer;
# strongSwan's charon with the kernel-libipsec plugin (userland ESP through a TUN,
# in libcharon-extra-plugins), swanctl to configure it, and the openssl/gcm/aesni
# plugins (libstrongswan-standard-plugins) for AES-GCM.  Idempotent: installs only
# what is missing.  Debian's packages do not start a daemon without systemd; if one
# runs (systemd hosts), bench/e2e.py does not use it (own config, own vici socket).
set -euo pipefail
pkgs=(iperf3 wireguard-go wireguard-tools strongswan-charon strongswan-swanctl
      libcharon-extra-plugins libstrongswan-standard-plugins)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || { echo "bench-deps: please install ${missing[*]}" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

#!/usr/bin/env bash
# What the end-to-end benchmark needs besides the project (root, Debian):
# iperf3 to measure, wireguard-go and wireguard-tools for the peer tunnel.
set -euo pipefail
pkgs=(iperf3 wireguard-go wireguard-tools)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || { echo "bench-deps: please install ${missing[*]}" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

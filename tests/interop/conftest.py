"""Fixtures of the interop lab: the Linux kernel as ESP peer, in a qemu VM.

``kernel_peer`` (session scope) builds the VM image with scripts/build-vm.sh
(cached in .cache/vm), creates a network namespace holding tap device
``tap0`` (the espdp side: 192.0.2.1, 2001:db8:e5::1) and boots the VM with
its virtio NIC on that tap (the kernel side: 192.0.2.2, 2001:db8:e5::2).
Every test of the session runs on that one VM, replacing the SAs between
cases.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from . import vm as vmmod

NS_ADDR = {4: "192.0.2.1", 6: "2001:db8:e5::1"}     # espdp (the namespace, tap0)
VM_ADDR = {4: "192.0.2.2", 6: "2001:db8:e5::2"}     # the kernel (the VM, eth0)
ESPDP_INNER = {4: "10.9.1.1", 6: "fd09:1::1"}
VM_INNER = {4: "10.9.2.1", 6: "fd09:2::1"}
ESPDP_NET = {4: "10.9.1.0/24", 6: "fd09:1::/64"}
VM_NET = {4: "10.9.2.0/24", 6: "fd09:2::/64"}


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


class KernelPeer:
    """The booted VM and the namespace of espdp's side."""

    def __init__(self, ns: str, vm: vmmod.VM, workdir: Path, boot_seconds: float) -> None:
        self.ns = ns
        self.vm = vm
        self.dir = workdir
        self.boot_seconds = boot_seconds

    def ip(self, args: str, check: bool = True) -> str:
        """iproute2's ``ip ARGS`` in the VM."""
        return self.vm.run(f"{vmmod.IP} {args}", check=check)


@pytest.fixture(scope="session")
def kernel_peer():
    if os.geteuid() != 0:
        pytest.skip("interop: needs root (network namespaces, tap devices)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("interop: qemu-system-x86_64 not installed (apt-get install "
                    "qemu-system-x86)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("interop: no /dev/net/tun")
    t = time.monotonic()
    image = vmmod.build_image()
    build_seconds = time.monotonic() - t
    workdir = Path(tempfile.mkdtemp(prefix="espdp-interop-kernel-"))
    ns = f"espdp-kvm{os.getpid() % 100000}"
    _sh("ip", "netns", "add", ns)
    vm = None
    try:
        n = ("ip", "netns", "exec", ns)
        _sh(*n, "ip", "link", "set", "lo", "up")
        _sh(*n, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap")
        _sh(*n, "ip", "addr", "add", f"{NS_ADDR[4]}/24", "dev", "tap0")
        _sh(*n, "ip", "addr", "add", f"{NS_ADDR[6]}/64", "dev", "tap0", "nodad")
        _sh(*n, "ip", "link", "set", "tap0", "up")
        t = time.monotonic()
        vm = vmmod.boot(image, ns, "tap0", workdir / "console.log")
        peer = KernelPeer(ns, vm, workdir, time.monotonic() - t)
        peer.build_seconds = build_seconds
        peer.ip(f"addr add {VM_ADDR[4]}/24 dev eth0")
        peer.ip(f"addr add {VM_ADDR[6]}/64 dev eth0 nodad")
        peer.ip(f"addr add {VM_INNER[4]}/32 dev lo")
        peer.ip(f"addr add {VM_INNER[6]}/128 dev lo")
        peer.ip(f"route add {ESPDP_NET[4]} via {NS_ADDR[4]} src {VM_INNER[4]}")
        peer.ip(f"-6 route add {ESPDP_NET[6]} via {NS_ADDR[6]} src {VM_INNER[6]}")
        vm.run("/bin/espinudp 4500 > /tmp/espinudp.log 2>&1 &")
        vm.run("sleep 0.3; grep -q listening /tmp/espinudp.log || "
               "{ cat /tmp/espinudp.log; exit 1; }")
        # the link works before any SA: a failure later is ESP's
        vm.run(f"ping -c 1 -W 5 {NS_ADDR[4]} >/dev/null || ping -c 2 -W 5 {NS_ADDR[4]}")
        yield peer
    finally:
        if vm is not None:
            vm.close()
        pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        _sh("ip", "netns", "del", ns, check=False)
        if os.environ.get("ESPDP_INTEROP_KEEP"):
            print(f"\ninterop: kernel peer files kept in {workdir}")
        else:
            failed = list(workdir.glob("*.pcap"))
            if not failed:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                print(f"\ninterop: captures of failed cases kept in {workdir}")

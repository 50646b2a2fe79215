"""A Linux VM under qemu (TCG) as an ESP peer, driven over its serial console.

The image comes from ``scripts/build-vm.sh`` (cached under ``.cache/vm``).
Its ``/init`` loads the ESP modules and then serves commands on ttyS0: the
host writes ``ID BASE64(shell text)`` lines and reads back
``@@BEGIN ID@@ output @@END ID RC@@``.  Everything the console printed is
kept (``console_log``) and shown in errors.
"""

from __future__ import annotations

import base64
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
IP = "/iproute2/ip"   # iproute2's ip inside the VM (busybox's has no xfrm)


class VMError(RuntimeError):
    pass


def build_image(timeout: float = 600) -> Path:
    """Run scripts/build-vm.sh (a no-op when cached); the image directory."""
    proc = subprocess.run([str(ROOT / "scripts" / "build-vm.sh")], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise VMError(f"scripts/build-vm.sh failed ({proc.returncode}):\n{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1])


class VM:
    """One qemu process in namespace ``ns`` with its NIC on tap ``tap``."""

    def __init__(self, image: Path, ns: str, tap: str, log: Path, mem: int = 256) -> None:
        self.log_path = log
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._seq = 0
        argv = ["ip", "netns", "exec", ns, "qemu-system-x86_64", "-accel", "tcg",
                "-cpu", "qemu64", "-m", str(mem), "-smp", "1", "-nodefaults",
                "-display", "none", "-no-reboot",
                "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
                "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd"),
                "-append", "console=ttyS0 quiet loglevel=3 panic=-1",
                "-netdev", f"tap,id=n,ifname={tap},script=no,downscript=no",
                "-device", "virtio-net-pci,netdev=n,mac=52:54:00:e5:00:02"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log_path, "ab") as log:
            while True:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                with self._cond:
                    if not chunk:
                        self._buf += b"\n@@QEMU-EXITED@@\n"
                        self._cond.notify_all()
                        return
                    self._buf += chunk
                    self._cond.notify_all()
                log.write(chunk)
                log.flush()

    def console_log(self, tail: int = 4000) -> str:
        with self._cond:
            return bytes(self._buf[-tail:]).decode(errors="replace")

    def _wait_for(self, marker: bytes, start: int, timeout: float,
                  also: Optional[bytes] = None) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                pos = self._buf.find(marker, start)
                if pos >= 0:
                    return pos
                if also is not None and self._buf.find(also, start) >= 0:
                    return -1
                if b"@@QEMU-EXITED@@" in self._buf[start:]:
                    raise VMError(f"qemu exited ({self.proc.poll()}) waiting for "
                                  f"{marker.decode()}; console:\n{self.console_log()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMError(f"VM: no {marker.decode()} within {timeout:.0f}s; "
                                  f"console:\n{self.console_log()}")
                self._cond.wait(min(left, 1.0))

    def wait_ready(self, timeout: float = 120) -> float:
        t = time.monotonic()
        self._wait_for(b"@@READY@@", 0, timeout)
        return time.monotonic() - t

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise VMError(f"VM console closed ({e}); console:\n{self.console_log()}") from None

    def _exchange(self, line: str, good: str, what: str, tries: int = 24) -> None:
        """Send ``line`` until the VM answers ``good`` (a lost byte costs a retry)."""
        for _ in range(tries):
            with self._cond:
                start = len(self._buf)
            self._send(line)
            try:
                # A lost line is sent again after a second (resending is harmless:
                # the server acknowledges a chunk it has and runs a command once).
                if self._wait_for(good.encode(), start, 1, also=b"@@NAK ") >= 0:
                    return
            except VMError as e:
                if "qemu exited" in str(e):
                    raise
            time.sleep(0.1)
        raise VMError(f"VM: {what} not acknowledged after {tries} tries; console:\n"
                      f"{self.console_log()}")

    def run(self, text: str, timeout: float = 60, check: bool = True) -> str:
        """Run shell ``text`` in the VM; its output (VMError when rc != 0 and check)."""
        self._seq += 1
        ident = f"c{self._seq}"
        data = base64.b64encode(text.encode()).decode()
        chunks = [data[i:i + 60] for i in range(0, len(data), 60)]
        for n, chunk in enumerate(chunks):
            self._exchange(f"{ident} D {n} {len(chunk)} {chunk}", f"@@ACK {ident} {n}@@",
                           f"chunk {n} of `{text}`")
        with self._cond:
            start = len(self._buf)
        self._exchange(f"{ident} R {len(chunks)}", f"@@RUNNING {ident}@@", f"`{text}`")
        begin = self._wait_for(f"@@BEGIN {ident}@@".encode(), start, timeout)
        end_marker = f"@@END {ident} ".encode()
        end = self._wait_for(end_marker, begin, timeout)
        eol = self._wait_for(b"@@", end + len(end_marker), timeout)
        with self._cond:
            rc_text = bytes(self._buf[end + len(end_marker):eol]).decode().strip()
            out = bytes(self._buf[begin + len(f"@@BEGIN {ident}@@"):end])
        out_text = out.decode(errors="replace").replace("\r", "").strip("\n")
        rc = int(rc_text) if rc_text.lstrip("-").isdigit() else -1
        if check and rc != 0:
            raise VMError(f"in the VM, `{text}` failed ({rc}):\n{out_text}")
        self.last_rc = rc
        return out_text

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send("c0 D 0 16 cG93ZXJvZmYgLWY=")   # poweroff -f
                self._send("c0 R 1")
                self.proc.wait(3)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def boot(image: Path, ns: str, tap: str, log: Path, timeout: float = 120) -> VM:
    vm = VM(image, ns, tap, log)
    try:
        vm.wait_ready(timeout)
    except BaseException:
        vm.close()
        raise
    return vm

"""A capture (pcap) of one interop case, kept only when the case failed."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Optional


class Capture:
    """dumpcap on ``dev`` in namespace ``ns`` (pcap) for the duration of one case."""

    def __init__(self, ns: str, dev: str, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "dumpcap", "-q", "-i", dev,
                                      "-w", str(path), "-P"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not path.exists() and self.proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)

    def stop(self, keep: bool) -> Optional[Path]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if keep:
            return self.path
        self.path.unlink(missing_ok=True)
        return None

"""End to end: espdp against the tunnels people would otherwise use, in one run.

    scripts/bench-deps.sh                     (iperf3, wireguard-go, wireguard-tools)
    python bench/e2e.py [--runs 3] [--seconds 5] [--only veth,espdp,wireguard-go]

Two network namespaces joined by a veth pair (espdp.lab.Lab); in each round
every implementation is set up in turn, measured with iperf3 from a to b
(TCP with 1 and with 4 streams, UDP at full speed with 1400-byte
datagrams) and torn down, so that the machine's noise falls on all of them
alike.  Rounds alternate; the figures are medians with min and max.

* ``veth``: no tunnel, to the outer address: the wire.
* ``espdp``: ``espdp run`` on each side, AES-128-GCM, tunnel mode, ESP in UDP.
* ``wireguard-go``: Debian's userspace WireGuard (ChaCha20-Poly1305 in UDP).

strongSwan's userland ESP (charon with kernel-libipsec) is not measured yet.
Writes ``e2e.json`` (every run, the machine, the versions) and ``e2e.png``
into --out, and prints espdp's ratio to each peer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from espdp.lab import INNER, OUTER, Lab, keys, sh, tunnel_config  # noqa: E402

HERE = Path(__file__).resolve().parent
TESTS = {"tcp1": [], "tcp4": ["-P", "4"], "udp": ["-u", "-b", "0", "-l", "1400"]}
IMPLEMENTATIONS = ("veth", "espdp", "wireguard-go")
WG_DEV = {"a": "espdpwg-a", "b": "espdpwg-b"}


def measure(lab: Lab, addr: str, test: str, seconds: float) -> dict:
    """One iperf3 run from a to ``addr`` in b: Mbit/s received, and TCP
    retransmissions or UDP loss."""
    server = subprocess.Popen(["ip", "netns", "exec", lab.ns["b"], "iperf3", "-s", "-1", "-B",
                               addr, "-p", "5301"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        out = None
        for _ in range(50):  # until the server listens
            proc = sh("iperf3", "-c", addr, "-p", "5301", "-t", str(seconds), "-J", *TESTS[test],
                      ns=lab.ns["a"], check=False, timeout=seconds + 30)
            if proc.returncode == 0 and "error" not in json.loads(proc.stdout):
                out = json.loads(proc.stdout)
                break
            time.sleep(0.1)
        if out is None:
            raise RuntimeError(f"iperf3 to {addr}: {proc.stdout[-300:]} {proc.stderr[-300:]}")
    finally:
        server.kill()
        server.wait()
    end = out["end"]
    if test == "udp":  # what arrived: the rate sent less what the receiver counted lost
        s = end["sum"]
        lost = s.get("lost_percent", 0)
        return {"mbit_s": s["bits_per_second"] * (1 - lost / 100) / 1e6,
                "sent_mbit_s": s["bits_per_second"] / 1e6, "lost_percent": lost}
    return {"mbit_s": end["sum_received"]["bits_per_second"] / 1e6,
            "retransmits": end["sum_sent"].get("retransmits", 0)}


# ---------------------------------------------------------------- the implementations

def start_espdp(lab: Lab) -> str:
    k = keys()
    lab.start("a", tunnel_config("a", 4, True, *k))
    lab.start("b", tunnel_config("b", 4, True, *k))
    return INNER["b"][0]


def stop_espdp(lab: Lab) -> None:
    for d in lab.daemons:
        d.stop()
    lab.daemons.clear()


def start_wireguard(lab: Lab) -> str:
    privs = {s: sh("wg", "genkey").stdout.strip() for s in ("a", "b")}
    pubs = {s: sh("wg", "pubkey", input=privs[s]).stdout.strip() for s in ("a", "b")}
    for side, other in (("a", "b"), ("b", "a")):
        ns = lab.ns[side]
        key_file = lab.dir / f"wg-{side}.key"
        key_file.write_text(privs[side])
        key_file.chmod(0o600)
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
        # The UAPI socket is /var/run/wireguard/NAME.sock, shared by all namespaces:
        # one name per side.
        dev = WG_DEV[side]
        subprocess.run(["ip", "netns", "exec", ns, "wireguard-go", dev], check=True,
                       capture_output=True, env=env)
        kind = sh("ip", "-d", "link", "show", dev, ns=ns).stdout
        if "tun" not in kind:
            raise RuntimeError(f"{dev} in {side} is not wireguard-go's TUN: {kind}")
        endpoint = OUTER[4][0 if other == "a" else 1]
        sh("wg", "set", dev, "private-key", str(key_file), "listen-port", "51820", "peer",
           pubs[other], "allowed-ips", f"{INNER[other][2]}", "endpoint", f"{endpoint}:51820",
           ns=ns)
        sh("ip", "addr", "add", f"{INNER[side][0]}/24", "dev", dev, ns=ns)
        sh("ip", "link", "set", dev, "up", ns=ns)
        sh("ip", "route", "add", INNER[other][2], "dev", dev, ns=ns)
    return INNER["b"][0]


def stop_wireguard(lab: Lab) -> None:
    for side in ("a", "b"):
        sh("ip", "link", "del", WG_DEV[side], ns=lab.ns[side], check=False)
    time.sleep(0.3)


SETUP = {"veth": (lambda lab: OUTER[4][1], lambda lab: None),
         "espdp": (start_espdp, stop_espdp),
         "wireguard-go": (start_wireguard, stop_wireguard)}


def version(cmd: list) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"uname": " ".join(platform.uname()), "cpu": cpu, "nproc": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "versions": {"iperf3": version(["iperf3", "--version"]),
                         "wireguard-go": version(["dpkg-query", "-W", "wireguard-go"]),
                         "python": platform.python_version()}}


def run(runs: int, seconds: float, only: list) -> dict:
    results: dict = {"machine": machine(), "seconds": seconds, "runs": runs, "raw": []}
    with Lab("bench") as lab:
        for r in range(runs):
            for name in only:
                start, stop = SETUP[name]
                addr = start(lab)
                try:
                    for test in TESTS:
                        print(f"\rround {r + 1}/{runs}  {name:>13}  {test:<5}", end="",
                              file=sys.stderr, flush=True)
                        figures = measure(lab, addr, test, seconds)
                        results["raw"].append({"round": r + 1, "impl": name, "test": test,
                                               **figures})
                finally:
                    stop(lab)
    print(file=sys.stderr)
    summary: dict = {}
    for name in only:
        for test in TESTS:
            values = [x["mbit_s"] for x in results["raw"]
                      if x["impl"] == name and x["test"] == test]
            summary.setdefault(name, {})[test] = {
                "median_mbit_s": statistics.median(values), "min": min(values),
                "max": max(values)}
            if test != "udp":
                summary[name][test]["retransmits"] = [
                    x["retransmits"] for x in results["raw"]
                    if x["impl"] == name and x["test"] == test]
    results["summary"] = summary
    if "espdp" in summary:
        results["espdp_ratio"] = {
            peer: {t: summary["espdp"][t]["median_mbit_s"] / summary[peer][t]["median_mbit_s"]
                   for t in TESTS} for peer in summary if peer != "espdp"}
    return results


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    names, tests = list(summary), list(TESTS)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        med = [summary[name][t]["median_mbit_s"] / 1000 for t in tests]
        lo = [m - summary[name][t]["min"] / 1000 for m, t in zip(med, tests, strict=True)]
        hi = [summary[name][t]["max"] / 1000 - m for m, t in zip(med, tests, strict=True)]
        ax.bar([i + k * width for i in range(len(tests))], med, width, yerr=[lo, hi],
               capsize=3, label=name)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(tests))])
    ax.set_xticklabels(["TCP, 1 stream", "TCP, 4 streams", "UDP 1400 B"])
    ax.set_yscale("log")
    ax.set_ylabel("Gbit/s (median, min-max; log)")
    ax.set_title(f"Two namespaces, {results['runs']} alternating rounds of "
                 f"{results['seconds']:g} s each")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--only", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(SETUP))
    if unknown:
        parser.error(f"unknown implementation {unknown[0]} (known: {', '.join(SETUP)})")
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, TUN devices)")
    results = run(args.runs, args.seconds, only)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.out / "e2e.png")
    for name, tests in results["summary"].items():
        print(f"{name:>13}: " + "  ".join(
            f"{t} {v['median_mbit_s']:8.0f} Mbit/s" for t, v in tests.items()))
    for peer, ratios in results.get("espdp_ratio", {}).items():
        print(f"espdp / {peer}: " + "  ".join(f"{t} {r:.2f}" for t, r in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

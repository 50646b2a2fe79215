"""End to end with 1, 1,000 and 100,000 SAs installed: throughput and memory per SA.

    python bench/scale.py [--sas 1,1000,100000] [--runs 3] [--seconds 4]

The lab of ``espdp lab`` (two namespaces, ``espdp run`` on each side,
AES-128-GCM tunnel mode in UDP) with N - 1 more SAs on each side, loaded at
start from an ``--xfrm`` file: SAs of 250 other peers (distinct SPIs,
random keys) that sit in the SAD and the engine's table beside
the one the traffic uses.  For each N, in alternating rounds: iperf3 TCP with
one stream (bench/e2e.py's measure), and the resident memory of each daemon
(VmRSS) once the SAs are in.  Memory per SA is (RSS(N) - RSS(1)) / (N - 1);
the throughput ratio to N = 1 and the ratio of CPU per Gbit/s (both tunnel
processes: the per-packet cost, steadier than throughput on a shared machine)
say what the SAs cost at that scale.
Writes ``scale.json`` and ``scale.png`` beside it (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import check_reachable, log, machine, measure  # noqa: E402

from espdp.lab import INNER, Lab, keys, tunnel_config  # noqa: E402

HERE = Path(__file__).resolve().parent


def extra_sas(n: int) -> str:
    """``n`` SAs of other peers as ``ip xfrm state add`` lines (both directions):
    250 peers on the lab's outer subnet (espdp run pins each peer's route, so
    they must be reachable), many SAs each, every SPI distinct."""
    lines = []
    for i in range(n):
        a, b = f"192.0.2.{3 + i % 250}", "192.0.2.1"
        src, dst = (a, b) if i % 2 else (b, a)
        lines.append(f"ip xfrm state add src {src} dst {dst} proto esp spi {0x01000000 + i:#x} "
                     f"reqid {100 + i} mode tunnel replay-window 64 "
                     f"aead 'rfc4106(gcm(aes))' 0x{os.urandom(20).hex()} 128 "
                     "encap espinudp 4500 4500 0.0.0.0")
    return "\n".join(lines) + "\n"


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and its children (``ip netns exec`` execs the daemon in place)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run(sizes: list[int], runs: int, seconds: float) -> dict:
    results: dict = {"machine": machine(), "sizes": sizes, "runs": runs, "seconds": seconds,
                     "raw": []}
    with Lab("scale") as lab:
        files = {}
        for n in sizes:
            path = lab.dir / f"sas-{n}.xfrm"
            path.write_text(extra_sas(n - 1))
            path.chmod(0o600)
            files[n] = path
        for r in range(runs):
            for n in sizes:
                k = keys()
                t = time.monotonic()
                for side in ("a", "b"):
                    lab.start(side, tunnel_config(side, 4, True, *k), "--xfrm", str(files[n]),
                              wait=600)
                load_s = time.monotonic() - t
                try:
                    check_reachable(lab, "espdp", INNER["b"][0])
                    rss = {d.ns: rss_kib(d.proc.pid) for d in lab.daemons}
                    figures = measure(lab, INNER["b"][0], "tcp1", seconds)
                finally:
                    for d in lab.daemons:
                        d.stop()
                    lab.daemons.clear()
                row = {"round": r + 1, "sas": n, "load_s": round(load_s, 1),
                       "rss_kib": list(rss.values()), **figures}
                # the per-packet cost: CPU of both tunnel processes per Gbit/s carried
                row["cpu_percent_per_gbit"] = round(
                    (figures["cpu_a_percent"] + figures["cpu_b_percent"])
                    / max(figures["mbit_s"], 1) * 1000, 2)
                results["raw"].append(row)
                log(f"round {r + 1}/{runs}  {n:>7} SAs  loaded in {load_s:5.1f}s  "
                    f"RSS {max(rss.values()) / 1024:7.1f} MiB  {figures['mbit_s']:8.1f} Mbit/s  "
                    f"retr {figures['retransmits']}")
    summary = {}
    for n in sizes:
        rows = [x for x in results["raw"] if x["sas"] == n]
        summary[n] = {"median_mbit_s": statistics.median(x["mbit_s"] for x in rows),
                      "min": min(x["mbit_s"] for x in rows),
                      "max": max(x["mbit_s"] for x in rows),
                      "median_rss_kib": statistics.median(max(x["rss_kib"]) for x in rows),
                      "median_load_s": statistics.median(x["load_s"] for x in rows),
                      "median_cpu_percent_per_gbit": statistics.median(
                          x["cpu_percent_per_gbit"] for x in rows)}
    base = summary[sizes[0]]
    for n in sizes[1:]:
        s = summary[n]
        s["throughput_ratio_to_1"] = s["median_mbit_s"] / base["median_mbit_s"]
        s["cost_ratio_to_1"] = (s["median_cpu_percent_per_gbit"]
                                / base["median_cpu_percent_per_gbit"])
        s["bytes_per_sa"] = round((s["median_rss_kib"] - base["median_rss_kib"]) * 1024
                                  / (n - sizes[0]))
    results["summary"] = {str(n): v for n, v in summary.items()}
    return results


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    sizes = [int(n) for n in summary]
    med = [summary[str(n)]["median_mbit_s"] for n in sizes]
    lo = [m - summary[str(n)]["min"] for m, n in zip(med, sizes, strict=True)]
    hi = [summary[str(n)]["max"] - m for m, n in zip(med, sizes, strict=True)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    ax.errorbar(sizes, med, yerr=[lo, hi], marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("SAs installed (each side)")
    ax.set_ylabel("Mbit/s, TCP 1 stream (median, min-max)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax2.plot(sizes, [summary[str(n)]["median_rss_kib"] / 1024 for n in sizes], marker="o")
    ax2.set_xscale("log")
    ax2.set_xlabel("SAs installed (each side)")
    ax2.set_ylabel("daemon RSS, MiB")
    ax2.grid(alpha=0.3)
    last = summary[str(sizes[-1])]
    fig.suptitle(f"espdp with many SAs: {sizes[-1]:,} SAs give "
                 f"{last.get('throughput_ratio_to_1', 1):.2f} of the throughput with 1 "
                 f"at {last.get('cost_ratio_to_1', 1):.2f} times its CPU per bit, "
                 f"{last.get('bytes_per_sa', 0)} bytes per SA", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sas", default="1,1000,100000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    args = parser.parse_args()
    sizes = sorted({int(x) for x in args.sas.split(",") if x})
    if not sizes or sizes[0] < 1:
        parser.error("--sas: positive counts, e.g. 1,1000,100000")
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, TUN devices)")
    try:
        results = run(sizes, args.runs, args.seconds)
    except KeyboardInterrupt:
        log("\ninterrupted: namespaces and daemons removed, nothing written")
        return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.out.with_suffix(".png"))
    for n, s in results["summary"].items():
        extra = (f"  x{s['throughput_ratio_to_1']:.2f} of 1 SA's throughput, "
                 f"x{s['cost_ratio_to_1']:.2f} its CPU per bit, {s['bytes_per_sa']} B/SA"
                 if "bytes_per_sa" in s else "")
        print(f"{int(n):>7} SAs: {s['median_mbit_s']:8.1f} Mbit/s ({s['min']:.0f}-{s['max']:.0f}),"
              f" RSS {s['median_rss_kib'] / 1024:.1f} MiB, loaded in {s['median_load_s']}s{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Engine throughput against the crypto ceiling, measured in the same run.

    python bench/engine.py [--seconds 1] [--rounds 3] [--out bench/results]

For AES-128-GCM (and more transforms with --all) at 64, 512 and 1400-byte
inner packets, one core: the engine's batch API (64 packets a call, the
copy that refills the batch included) against a C loop calling OpenSSL with
a reused context (bench/ceiling.c, built here with the system's cc).  The
two alternate, several rounds; the ratio of medians is the figure that
counts, because these machines are shared and noisy.  Writes
``engine.json`` and ``engine.png`` into --out.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from espdp.engine import SA, PacketBatch  # noqa: E402
from espdp.sa import AlgoKey, SAInfo  # noqa: E402

HERE = Path(__file__).resolve().parent
SIZES = (64, 512, 1400)
TRANSFORMS = {
    "aes128gcm16": dict(aead=AlgoKey("rfc4106(gcm(aes))", bytes(range(20)), 128)),
    "aes256gcm16": dict(aead=AlgoKey("rfc4106(gcm(aes))", bytes(range(36)), 128)),
    "chacha20poly1305": dict(aead=AlgoKey("rfc7539esp(chacha20,poly1305)", bytes(range(36)), 128)),
    "aes128-sha256": dict(enc=AlgoKey("cbc(aes)", bytes(range(16))),
                          auth=AlgoKey("hmac(sha256)", bytes(range(32)), 128)),
}


def build_ceiling(workdir: str) -> str:
    exe = os.path.join(workdir, "ceiling")
    subprocess.run(["cc", "-O2", "-o", exe, str(HERE / "ceiling.c"), "-lcrypto"], check=True)
    return exe


def ceiling_pps(exe: str, size: int, seconds: float) -> float:
    out = subprocess.run([exe, "128", str(size), str(seconds)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["pps"]


def inner_packet(size: int) -> bytes:
    """An IPv4/UDP packet of exactly ``size`` bytes."""
    header = bytearray.fromhex("4500000000004000401100000a0000010a000002")
    header[2:4] = size.to_bytes(2, "big")
    return bytes(header) + bytes(size - len(header))


def engine_pps(sa: SA, size: int, seconds: float) -> float:
    template, work = PacketBatch(64), PacketBatch(64)
    for _ in range(64):
        template.add(inner_packet(size))
    packets, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            work.copy_from(template)
            packets += sa.encrypt(work)
    return packets / (time.perf_counter() - start)


def make_sa(transform: str) -> SA:
    return SA(SAInfo(src=ipaddress.ip_address("192.0.2.1"), dst=ipaddress.ip_address("192.0.2.2"),
                     spi=0x1000, mode="tunnel", **TRANSFORMS[transform]))


def run(seconds: float, rounds: int, transforms: list[str]) -> dict:
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "python": platform.python_version()},
                     "seconds_per_point": seconds, "rounds": rounds, "points": []}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_ceiling(tmp)
        for transform in transforms:
            sa = make_sa(transform)
            for size in SIZES:
                eng, ceil = [], []
                for r in range(rounds):
                    print(f"\r{transform:>18} {size:>5} B  round {r + 1}/{rounds}", end="",
                          file=sys.stderr, flush=True)
                    eng.append(engine_pps(sa, size, seconds))
                    if transform == "aes128gcm16":
                        ceil.append(ceiling_pps(exe, size, seconds))
                point = {"transform": transform, "size": size,
                         "engine_pps": statistics.median(eng), "engine_runs": eng}
                if ceil:
                    point.update(ceiling_pps=statistics.median(ceil), ceiling_runs=ceil,
                                 ratio=statistics.median(eng) / statistics.median(ceil))
                results["points"].append(point)
    print(file=sys.stderr)
    return results


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_transform: dict = {}
    for p in results["points"]:
        by_transform.setdefault(p["transform"], []).append(p)
    for name, pts in by_transform.items():
        ax.plot([p["size"] for p in pts], [p["engine_pps"] * p["size"] * 8 / 1e9 for p in pts],
                marker="o", label=f"espdp {name}")
    ceil = [p for p in results["points"] if "ceiling_pps" in p]
    ax.plot([p["size"] for p in ceil], [p["ceiling_pps"] * p["size"] * 8 / 1e9 for p in ceil],
            "k--", marker="x", label="C + OpenSSL ceiling (aes128gcm16)")
    ax.set_xlabel("inner packet size (bytes)")
    ax.set_ylabel("Gbit/s of inner packets, one core")
    ax.set_title("espdp engine (batch API) against the crypto ceiling")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--all", action="store_true", help="all transforms, not only AES-128-GCM")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    transforms = list(TRANSFORMS) if args.all else ["aes128gcm16"]
    results = run(args.seconds, args.rounds, transforms)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.out / "engine.png")
    for p in results["points"]:
        extra = (f"  ceiling {p['ceiling_pps'] / 1e6:6.2f} Mpps  ratio {p['ratio']:.2f}"
                 if "ratio" in p else "")
        espdp = p["engine_pps"] / 1e6
        print(f"{p['transform']:>18} {p['size']:>5} B  espdp {espdp:6.2f} Mpps{extra}")


if __name__ == "__main__":
    main()

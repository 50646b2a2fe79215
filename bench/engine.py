"""Engine throughput against the crypto ceiling, measured in the same run.

    python bench/engine.py [--seconds 1] [--rounds 3] [--out bench/results]

For AES-128-GCM (and more transforms with --all) at 64, 512 and 1400-byte
inner packets and IMIX (7:4:1 of 64, 576, 1400), one core: the engine's
batch API (64 packets a call; between calls the batch gets its packets'
first 64 bytes back, their headers: the cipher's work does not depend on
what the payload holds, and the dataplane's packets arrive in the batch by
the read that fills it, not by a copy)
against a C loop calling OpenSSL with a reused context (bench/ceiling.c,
built here with the system's cc), and for AES-128-GCM also against
``cryptography``'s AESGCM called once per packet and scapy's ESP, and the
engine on two worker threads (each with its own SA and batch; the GIL is
released while a batch is encrypted).  They alternate, several rounds; the
ratio of medians is the figure that counts, because these machines are
shared and noisy.  The ceiling for IMIX is derived from its per-size
figures (the mean time per packet).  Writes ``engine.json`` and
``engine.png`` into --out.
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

from espdp.engine import SA, PacketBatch, SATable  # noqa: E402
from espdp.sa import AlgoKey, SAInfo  # noqa: E402

HERE = Path(__file__).resolve().parent
SIZES = (64, 512, 1400, "imix")
IMIX = (64,) * 7 + (576,) * 4 + (1400,)
HEAD = 64   # bytes of each packet restored between batches (see above)
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


def packets_of(size) -> list[bytes]:
    """64 packets of ``size`` bytes, or the IMIX mix."""
    sizes = IMIX if size == "imix" else (size,)
    return [inner_packet(sizes[i % len(sizes)]) for i in range(64)]


def engine_pps(sa: SA, size, seconds: float, table: SATable = None, worker: int = 0) -> float:
    """Packets/s encrypting batches of 64 with ``sa`` (through ``table`` as
    ``worker`` when given: the dataplane's path)."""
    template, work = PacketBatch(64), PacketBatch(64)
    for packet in packets_of(size):
        template.add(packet, sa=sa.index if table is not None else -1)
    encrypt = sa.encrypt if table is None else (lambda b: table.encrypt(b, worker))
    packets, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            work.copy_from(template, HEAD)
            packets += encrypt(work)
    return packets / (time.perf_counter() - start)


def threads_pps(transform: str, size, seconds: float, workers: int = 2,
                shared: bool = False) -> float:
    """Total packets/s of ``workers`` threads, each with its own batches and its
    own SA, or (``shared``) all on one SA of one ``SATable(workers=N)``: one
    sequence number handed out atomically, a crypto context per worker."""
    import threading

    counts = [0.0] * workers
    barrier = threading.Barrier(workers)
    table = SATable(workers=workers) if shared else None
    one = make_sa(transform, spi=0x3000) if shared else None
    if shared:
        table.add(one)

    def work(k: int) -> None:
        sa = one if shared else make_sa(transform, spi=0x2000 + k)
        barrier.wait()
        counts[k] = engine_pps(sa, size, seconds, table, k if shared else 0)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def cryptography_pps(size, seconds: float) -> float:
    """AES-128-GCM with ``cryptography``, one Python call per packet (ESP's nonce
    layout: 4-byte salt + 8-byte IV, the ESP header as AAD)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = bytes(range(20))
    aead, salt = AESGCM(key[:16]), key[16:]
    packets_in = packets_of(size)
    packets, seq, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for packet in packets_in:
            seq += 1
            iv = seq.to_bytes(8, "big")
            aead.encrypt(salt + iv, packet + b"\x01\x02\x04", b"\0\0\x10\0" + iv[4:])
        packets += len(packets_in)
    return packets / (time.perf_counter() - start)


def scapy_pps(size, seconds: float) -> float:
    """scapy's ESP (tunnel mode, AES-128-GCM), one packet at a time."""
    from scapy.all import IP
    from scapy.layers.ipsec import ESP, SecurityAssociation

    sa = SecurityAssociation(proto=ESP, spi=0x1000, crypt_algo="AES-GCM",
                             crypt_key=bytes(range(20)),
                             tunnel_header=IP(src="192.0.2.1", dst="192.0.2.2"))
    packets_in = [IP(p) for p in packets_of(size)]
    packets, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for packet in packets_in[:8]:
            sa.encrypt(packet)
        packets += 8
    return packets / (time.perf_counter() - start)


def make_sa(transform: str, spi: int = 0x1000) -> SA:
    return SA(SAInfo(src=ipaddress.ip_address("192.0.2.1"), dst=ipaddress.ip_address("192.0.2.2"),
                     spi=spi, mode="tunnel", **TRANSFORMS[transform]))


def _imix_ceiling(points: list) -> float:
    """Packets/s of the IMIX mix from the per-size figures: the mean time per packet."""
    by_size = {p["size"]: p["ceiling_pps"] for p in points if p["size"] != "imix"}
    need = {s: by_size.get(s) for s in set(IMIX)}
    if 576 not in by_size and 512 in by_size and 1400 in by_size:  # between the two measured
        t512, t1400 = 1 / by_size[512], 1 / by_size[1400]
        need[576] = 1 / (t512 + (t1400 - t512) * (576 - 512) / (1400 - 512))
    if None in need.values():
        return 0.0
    return len(IMIX) / sum(1 / need[s] for s in IMIX)


def run(seconds: float, rounds: int, transforms: list[str]) -> dict:
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "python": platform.python_version()},
                     "seconds_per_point": seconds, "rounds": rounds, "points": []}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_ceiling(tmp)
        for transform in transforms:
            sa = make_sa(transform)
            for size in SIZES:
                runs: dict = {"engine": []}
                main = transform == "aes128gcm16"
                for r in range(rounds):
                    print(f"\r{transform:>18} {size:>5} B  round {r + 1}/{rounds}", end="",
                          file=sys.stderr, flush=True)
                    runs["engine"].append(engine_pps(sa, size, seconds))
                    if not main:
                        continue
                    if size != "imix":
                        runs.setdefault("ceiling", []).append(ceiling_pps(exe, size, seconds))
                    runs.setdefault("engine_2_workers", []).append(
                        threads_pps(transform, size, seconds))
                    runs.setdefault("engine_2_workers_shared_sa", []).append(
                        threads_pps(transform, size, seconds, shared=True))
                    runs.setdefault("cryptography", []).append(cryptography_pps(size, seconds))
                    runs.setdefault("scapy", []).append(scapy_pps(size, min(seconds, 0.5)))
                point = {"transform": transform, "size": size,
                         "engine_pps": statistics.median(runs["engine"]), "runs": runs}
                for name in ("ceiling", "engine_2_workers", "engine_2_workers_shared_sa",
                             "cryptography", "scapy"):
                    if name in runs:
                        point[f"{name}_pps"] = statistics.median(runs[name])
                if size == "imix" and main:
                    point["ceiling_pps"] = _imix_ceiling(results["points"])
                    point["ceiling_derived"] = True
                if point.get("ceiling_pps"):
                    point["ratio"] = point["engine_pps"] / point["ceiling_pps"]
                if main:
                    point["two_workers_ratio"] = point["engine_2_workers_pps"] / point["engine_pps"]
                    point["two_workers_shared_sa_ratio"] = (
                        point["engine_2_workers_shared_sa_pps"] / point["engine_pps"])
                    point["vs_cryptography"] = point["engine_pps"] / point["cryptography_pps"]
                    point["vs_scapy"] = point["engine_pps"] / point["scapy_pps"]
                results["points"].append(point)
    print(file=sys.stderr)
    return results


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    points = [p for p in results["points"] if p["size"] != "imix"]
    by_transform: dict = {}
    for p in points:
        by_transform.setdefault(p["transform"], []).append(p)

    def gbit(pts, key):
        return [p[key] * p["size"] * 8 / 1e9 for p in pts]

    for name, pts in by_transform.items():
        ax.plot([p["size"] for p in pts], gbit(pts, "engine_pps"), marker="o",
                label=f"espdp {name}")
    main = by_transform.get("aes128gcm16", [])
    for key, style, label in (("ceiling_pps", "k--", "C + OpenSSL ceiling (aes128gcm16)"),
                              ("engine_2_workers_pps", "g-.", "espdp aes128gcm16, 2 workers"),
                              ("engine_2_workers_shared_sa_pps", "c-.",
                               "espdp aes128gcm16, 2 workers on one SA"),
                              ("cryptography_pps", "m:", "cryptography, a call per packet"),
                              ("scapy_pps", "r:", "scapy ESP")):
        pts = [p for p in main if key in p]
        if pts:
            ax.plot([p["size"] for p in pts], gbit(pts, key), style, marker="x", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("inner packet size (bytes)")
    ax.set_ylabel("Gbit/s of inner packets (log)")
    ax.set_title("espdp engine (batch API) against the crypto ceiling and per-packet peers")
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
        if "vs_scapy" in p:
            extra += (f"  2 workers x{p['two_workers_ratio']:.2f} "
                      f"(one SA x{p['two_workers_shared_sa_ratio']:.2f})  "
                      f"x{p['vs_cryptography']:.1f} cryptography  x{p['vs_scapy']:.0f} scapy")
        espdp = p["engine_pps"] / 1e6
        print(f"{p['transform']:>18} {p['size']:>5} B  espdp {espdp:6.2f} Mpps{extra}")


if __name__ == "__main__":
    main()

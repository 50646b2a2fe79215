"""Lookup cost with 1, 1,000 and 100,000 SAs, measured in the same run.

    python bench/lookup.py [--sizes 1,1000,100000] [--lookups 20000] [--rounds 3]
                           [--out bench/results]

For each table size: the SAD's lookups (``getsa`` by (daddr, SPI, proto,
mark) and ``find_outbound`` for a template, both Python), the engine's
``SATable.lookup`` (the C hash behind a Python call) and the engine's batch
decryption of 64 packets addressed to SAs spread over the table (the C
lookup on the hot path, crypto included).  Each figure is the median of
--rounds; the SAD's probe count (candidate states examined per lookup) is
printed too: it must not grow with the table.  Writes ``lookup.json``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from espdp.engine import SA, PacketBatch  # noqa: E402
from espdp.sa import AlgoKey, SAInfo, Selector  # noqa: E402
from espdp.xfrm.policy import Flow, Policy, Template  # noqa: E402
from espdp.xfrm.sad import SecurityAssociationDatabase  # noqa: E402

SRC = ipaddress.ip_address("192.0.2.1")
KEY = AlgoKey("rfc4106(gcm(aes))", bytes(range(20)), 128)
FLOW = Flow(ipaddress.ip_address("10.1.0.1"), ipaddress.ip_address("10.2.0.1"), 17, 1, 2)
POLICY = Policy(Selector(ipaddress.ip_network("10.1.0.0/16"),
                         ipaddress.ip_network("10.2.0.0/16")), "out")
INNER = bytes.fromhex("4500004000004000401100000a0000010a000002") + bytes(44)


def info(i: int) -> SAInfo:
    """SA number i: its own SPI, one of 60,000 destinations, one of 997 reqids."""
    dst = ipaddress.ip_address(0xC6120000 + i % 60000)
    return SAInfo(SRC, dst, 0x10000 + i, mode="tunnel", reqid=i % 997 + 1, replay_window=0,
                  aead=KEY)


def build(n: int) -> SecurityAssociationDatabase:
    sad = SecurityAssociationDatabase(rng=random.Random(1), replay_maxdiff=0, replay_maxage=0)
    for i in range(n):
        sad.newsa(info(i), now=0)
    return sad


def per_call_ns(fn, args: list, rounds: int) -> float:
    runs = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for a in args:
            fn(*a)
        runs.append((time.perf_counter_ns() - start) / len(args))
    return statistics.median(runs)


def decrypt_pps(sad: SecurityAssociationDatabase, n: int, rounds: int) -> float:
    rng = random.Random(2)
    source = PacketBatch(64)
    for _ in range(64):
        out = SA(info(rng.randrange(n)))
        source.add(out.encrypt_packet(INNER)[1])
    batch = PacketBatch(64)
    runs = []
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.3:
            batch.copy_from(source)
            assert sad.table.decrypt(batch) == 64
            count += 64
        runs.append(count / (time.perf_counter() - start))
    return statistics.median(runs)


def measure(n: int, lookups: int, rounds: int) -> dict:
    t0 = time.perf_counter()
    sad = build(n)
    built = time.perf_counter() - t0
    rng = random.Random(3)
    picks = [rng.randrange(n) for _ in range(lookups)]
    ids = [(info(i).dst, 0x10000 + i) for i in picks]
    templates = [(Template(dst=info(i).dst, src=SRC, mode="tunnel", reqid=i % 997 + 1),
                  POLICY, FLOW) for i in picks]
    sad.probes = 0
    getsa = per_call_ns(sad.getsa, ids, rounds)
    outbound = per_call_ns(sad.find_outbound, templates, rounds)
    probes = sad.probes / (2 * lookups * rounds)
    engine = per_call_ns(sad.table.lookup, ids, rounds)
    return {"sas": n, "build_s": round(built, 2), "sad_getsa_ns": round(getsa),
            "sad_find_outbound_ns": round(outbound), "sad_probes_per_lookup": probes,
            "engine_lookup_ns": round(engine),
            "engine_decrypt_pps_batch64": round(decrypt_pps(sad, n, rounds)),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,1000,100000")
    parser.add_argument("--lookups", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    points = []
    for n in (int(s) for s in args.sizes.split(",")):
        point = measure(n, args.lookups, args.rounds)
        points.append(point)
        print(json.dumps(point), flush=True)
    base = points[0]
    for p in points:
        p["getsa_vs_smallest"] = round(p["sad_getsa_ns"] / base["sad_getsa_ns"], 2)
        p["engine_lookup_vs_smallest"] = round(p["engine_lookup_ns"] / base["engine_lookup_ns"],
                                               2)
        p["decrypt_vs_smallest"] = round(p["engine_decrypt_pps_batch64"]
                                         / base["engine_decrypt_pps_batch64"], 2)
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version()},
              "lookups": args.lookups, "rounds": args.rounds, "points": points}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lookup.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'SAs':>8} {'getsa ns':>9} {'outbound ns':>12} {'probes':>7} {'engine ns':>10} "
          f"{'decrypt pps':>12}")
    for p in points:
        print(f"{p['sas']:>8} {p['sad_getsa_ns']:>9} {p['sad_find_outbound_ns']:>12} "
              f"{p['sad_probes_per_lookup']:>7.2f} {p['engine_lookup_ns']:>10} "
              f"{p['engine_decrypt_pps_batch64']:>12}")


if __name__ == "__main__":
    main()

"""End to end: espdp against the tunnels people would otherwise use, in one run.

    scripts/bench-deps.sh          (iperf3, wireguard-go, wireguard-tools, strongSwan)
    python bench/e2e.py [--runs 3] [--seconds 5] [--only veth,espdp,wireguard-go,...]

Two network namespaces joined by a veth pair (espdp.lab.Lab); in each round
every implementation is set up in turn, measured with iperf3 from a to b
(TCP with 1 and with 4 streams, UDP at full speed with 1400-byte
datagrams) and torn down, so that the machine's noise falls on all of them
alike.  Rounds alternate; the figures are medians with min and max.  The CPU
time of the tunnel processes (every process in the two namespaces other than
iperf3) is read from /proc before and after each measurement.

* ``veth``: no tunnel, to the outer address: the wire.
* ``espdp``: ``espdp run`` on each side, AES-128-GCM, tunnel mode, ESP in UDP.
* ``wireguard-go``: Debian's userspace WireGuard (ChaCha20-Poly1305 in UDP).
* ``strongswan-libipsec``: Debian's charon with the kernel-libipsec plugin
  (userland ESP through a TUN), one charon per namespace (each in its own
  mount namespace with a private /run for its fixed pid file, its own
  strongswan.conf and vici socket), IKEv2 with a PSK, ESP AES-128-GCM in UDP
  4500 (``encap = yes``), configured with swanctl.

An implementation whose setup fails is dropped from the later rounds and its
error is kept in the JSON.  Writes ``e2e.json`` (every run, the machine, the
versions) and ``e2e.png`` into --out, and prints espdp's ratio to each peer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from espdp.lab import INNER, OUTER, Lab, keys, sh, tunnel_config  # noqa: E402

HERE = Path(__file__).resolve().parent
TESTS = {"tcp1": [], "tcp4": ["-P", "4"], "udp": ["-u", "-b", "0", "-l", "1400"]}
IMPLEMENTATIONS = ("veth", "espdp", "wireguard-go", "strongswan-libipsec")
WG_DEV = {"a": "espdpwg-a", "b": "espdpwg-b"}


def tunnel_pids(lab: Lab) -> dict:
    """The processes in each namespace (before iperf3 starts: the tunnel's)."""
    return {side: [int(x) for x in sh("ip", "netns", "pids", lab.ns[side],
                                      check=False).stdout.split()]
            for side in ("a", "b")}


def cpu_ticks(pids: list) -> int:
    """utime + stime of these processes (all their threads), in clock ticks."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(lab: Lab, addr: str, test: str, seconds: float) -> dict:
    """One iperf3 run from a to ``addr`` in b: Mbit/s received, TCP
    retransmissions or UDP loss, and the CPU use of the tunnel processes on
    each side (percent of one core over the measurement)."""
    pids = tunnel_pids(lab)
    before = {side: cpu_ticks(p) for side, p in pids.items()}
    t0 = time.monotonic()
    server = subprocess.Popen(["ip", "netns", "exec", lab.ns["b"], "iperf3", "-s", "-1", "-B",
                               addr, "-p", "5301"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        out = None
        for _ in range(50):  # until the server listens
            proc = sh("iperf3", "-c", addr, "-p", "5301", "-t", str(seconds), "-J", *TESTS[test],
                      ns=lab.ns["a"], check=False, timeout=seconds + 30)
            try:
                parsed = json.loads(proc.stdout)
            except json.JSONDecodeError:
                parsed = {"error": proc.stdout[-300:]}
            if proc.returncode == 0 and "error" not in parsed:
                out = parsed
                break
            time.sleep(0.1)
        if out is None:
            raise RuntimeError(f"iperf3 to {addr}: {proc.stdout[-300:]} {proc.stderr[-300:]}")
    finally:
        server.kill()
        server.wait()
    wall = time.monotonic() - t0
    hz = os.sysconf("SC_CLK_TCK")
    cpu = {f"cpu_{side}_percent": round((cpu_ticks(p) - before[side]) / hz / wall * 100, 1)
           for side, p in pids.items() if p}
    end = out["end"]
    if test == "udp":  # what arrived: the rate sent less what the receiver counted lost
        s = end["sum"]
        lost = s.get("lost_percent", 0)
        return {"mbit_s": s["bits_per_second"] * (1 - lost / 100) / 1e6,
                "sent_mbit_s": s["bits_per_second"] / 1e6, "lost_percent": lost, **cpu}
    return {"mbit_s": end["sum_received"]["bits_per_second"] / 1e6,
            "retransmits": end["sum_sent"].get("retransmits", 0), **cpu}


def check_reachable(lab: Lab, name: str, addr: str) -> None:
    for _ in range(20):
        if lab.ping("a", addr, count=1):
            return
        time.sleep(0.25)
    raise RuntimeError(f"{name}: {addr} does not answer ping through the tunnel")


# ---------------------------------------------------------------- the implementations

def start_espdp(lab: Lab) -> str:
    k = keys()
    lab.start("a", tunnel_config("a", 4, True, *k))
    lab.start("b", tunnel_config("b", 4, True, *k))
    check_reachable(lab, "espdp", INNER["b"][0])
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
                       capture_output=True, env=env, timeout=30)
        # Really the userspace implementation: a TUN device served by a
        # wireguard-go process in this namespace (not the kernel's "wireguard" link).
        kind = sh("ip", "-d", "link", "show", dev, ns=ns).stdout
        if "tun" not in kind or "wireguard" in kind.split("link/")[-1]:
            raise RuntimeError(f"{dev} in {side} is not wireguard-go's TUN: {kind}")
        if not any(comm(pid) == "wireguard-go" for pid in tunnel_pids(lab)[side]):
            raise RuntimeError(f"no wireguard-go process in namespace {side}")
        endpoint = OUTER[4][0 if other == "a" else 1]
        sh("wg", "set", dev, "private-key", str(key_file), "listen-port", "51820", "peer",
           pubs[other], "allowed-ips", f"{INNER[other][2]}", "endpoint", f"{endpoint}:51820",
           ns=ns)
        sh("ip", "addr", "add", f"{INNER[side][0]}/24", "dev", dev, ns=ns)
        sh("ip", "link", "set", dev, "up", ns=ns)
        sh("ip", "route", "add", INNER[other][2], "dev", dev, ns=ns)
    check_reachable(lab, "wireguard-go", INNER["b"][0])
    return INNER["b"][0]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def stop_wireguard(lab: Lab) -> None:
    for side in ("a", "b"):
        sh("ip", "link", "del", WG_DEV[side], ns=lab.ns[side], check=False)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
            comm(pid) == "wireguard-go" for pids in tunnel_pids(lab).values() for pid in pids):
        time.sleep(0.1)
    for side in ("a", "b"):
        for pid in tunnel_pids(lab)[side]:
            if comm(pid) == "wireguard-go":
                os.kill(pid, signal.SIGKILL)
        Path(f"/var/run/wireguard/{WG_DEV[side]}.sock").unlink(missing_ok=True)


# strongSwan: one charon per namespace.  Its pid file is fixed (/var/run/charon.pid),
# so each runs in a mount namespace of its own with a private tmpfs on /run; the
# vici socket lives in the lab's directory so that swanctl reaches the right one.
SWAN_PLUGINS = ("random nonce openssl aesni gcm aes sha1 sha2 hmac kdf pem pkcs1 pubkey x509 "
                "kernel-libipsec kernel-netlink socket-default vici")
STRONGSWAN_CONF = """charon {{
  load = {plugins}
  install_routes = yes
  install_virtual_ip = no
  filelog {{
    log {{
      path = {dir}/charon.log
      default = 1
      chd = 2
      knl = 2
      flush_line = yes
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
  plugins {{
    kernel-libipsec {{
      allow_peer_ts = yes
    }}
    vici {{
      socket = unix://{dir}/charon.vici
    }}
  }}
}}
"""
SWANCTL_CONF = """connections {{
  bench {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    encap = yes
    proposals = aes128gcm16-prfsha256-x25519
    local {{
      auth = psk
      id = {local}
    }}
    remote {{
      auth = psk
      id = {remote}
    }}
    children {{
      bench {{
        local_ts = {local_ts}
        remote_ts = {remote_ts}
        esp_proposals = aes128gcm16
        mode = tunnel
      }}
    }}
  }}
}}
secrets {{
  ike-bench {{
    id-1 = {local}
    id-2 = {remote}
    secret = "{psk}"
  }}
}}
"""
CHARONS: dict = {}


def charon_path() -> str:
    for path in ("/usr/lib/ipsec/charon", "/usr/libexec/ipsec/charon",
                 shutil.which("charon") or ""):
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError("no charon (scripts/bench-deps.sh installs strongswan-charon)")


def start_strongswan(lab: Lab) -> str:
    charon = charon_path()
    if not shutil.which("swanctl"):
        raise RuntimeError("no swanctl (scripts/bench-deps.sh installs strongswan-swanctl)")
    psk = os.urandom(24).hex()
    for side, other in (("a", "b"), ("b", "a")):
        d = lab.dir / f"strongswan-{side}"
        d.mkdir(exist_ok=True)
        (d / "strongswan.conf").write_text(STRONGSWAN_CONF.format(plugins=SWAN_PLUGINS, dir=d))
        swanctl = d / "swanctl.conf"
        swanctl.write_text(SWANCTL_CONF.format(
            local=OUTER[4][0 if side == "a" else 1], remote=OUTER[4][1 if side == "a" else 0],
            local_ts=INNER[side][2], remote_ts=INNER[other][2], psk=psk))
        swanctl.chmod(0o600)
        (d / "charon.log").unlink(missing_ok=True)
        # The inner address: charon routes the remote subnet through its TUN
        # (ipsec0) with a source address from the local traffic selector.
        sh("ip", "addr", "add", f"{INNER[side][0]}/32", "dev", "lo", ns=lab.ns[side])
        env = dict(os.environ, STRONGSWAN_CONF=str(d / "strongswan.conf"))
        with open(d / "charon.out", "ab") as out:
            CHARONS[side] = subprocess.Popen(
                ["ip", "netns", "exec", lab.ns[side], "unshare", "-m", "--propagation",
                 "private", "sh", "-c", f"mount -t tmpfs none /run && exec {charon}"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    for side in ("a", "b"):
        d = lab.dir / f"strongswan-{side}"
        uri = f"unix://{d}/charon.vici"
        deadline = time.monotonic() + 20
        while True:
            if CHARONS[side].poll() is not None:
                raise RuntimeError(f"charon in {side} exited {CHARONS[side].returncode}: "
                                   f"{(d / 'charon.out').read_text()[-600:]}")
            proc = sh("swanctl", "--load-all", "--file", str(d / "swanctl.conf"), "--uri", uri,
                      ns=lab.ns[side], check=False)
            if proc.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"swanctl --load-all in {side}: {proc.stdout}{proc.stderr}")
            time.sleep(0.2)
    d = lab.dir / "strongswan-a"
    proc = sh("swanctl", "--initiate", "--child", "bench", "--timeout", "20", "--uri",
              f"unix://{d}/charon.vici", ns=lab.ns["a"], check=False, timeout=40)
    if proc.returncode != 0:
        log = (d / "charon.log").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"swanctl --initiate: {proc.stdout[-600:]}{proc.stderr}\n{log}")
    if "kernel-libipsec" not in (d / "charon.log").read_text(errors="replace") and \
            "ipsec0" not in sh("ip", "link", ns=lab.ns["a"]).stdout:
        raise RuntimeError("charon is not using kernel-libipsec (no ipsec0 TUN)")
    check_reachable(lab, "strongswan-libipsec", INNER["b"][0])
    return INNER["b"][0]


def stop_strongswan(lab: Lab) -> None:
    for side, proc in list(CHARONS.items()):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        del CHARONS[side]
    for side in ("a", "b"):
        ns = lab.ns[side]
        sh("ip", "addr", "del", f"{INNER[side][0]}/32", "dev", "lo", ns=ns, check=False)
        sh("ip", "link", "del", "ipsec0", ns=ns, check=False)
        while sh("ip", "rule", "del", "table", "220", ns=ns, check=False).returncode == 0:
            pass
        sh("ip", "route", "flush", "table", "220", ns=ns, check=False)


SETUP = {"veth": (lambda lab: OUTER[4][1], lambda lab: None),
         "espdp": (start_espdp, stop_espdp),
         "wireguard-go": (start_wireguard, stop_wireguard),
         "strongswan-libipsec": (start_strongswan, stop_strongswan)}


def version(cmd: list) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def espdp_version() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        from importlib.metadata import version as dist_version
        v = dist_version("espdp")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        v = "unknown"
    rev = version(["git", "-C", str(root), "describe", "--always", "--dirty"])
    return f"{v} ({rev})"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dpkg = ["dpkg-query", "-W", "-f", "${Package} ${Version}"]
    return {"uname": " ".join(platform.uname()), "cpu": cpu, "nproc": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "versions": {"espdp": espdp_version(),
                         "iperf3": version(["iperf3", "--version"]),
                         "wireguard-go": version(dpkg + ["wireguard-go"]),
                         "wireguard-tools": version(dpkg + ["wireguard-tools"]),
                         "strongswan-charon": version(dpkg + ["strongswan-charon"]),
                         "libcharon-extra-plugins": version(dpkg + ["libcharon-extra-plugins"]),
                         "kernel": platform.release(),
                         "python": platform.python_version()}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(runs: int, seconds: float, only: list) -> dict:
    results: dict = {"machine": machine(), "seconds": seconds, "runs": runs,
                     "tests": {"tcp1": "iperf3 TCP, 1 stream", "tcp4": "iperf3 TCP, 4 streams",
                               "udp": f"iperf3 {' '.join(TESTS['udp'])} (received rate)"},
                     "raw": [], "errors": []}
    started = time.monotonic()
    active = list(only)
    total = runs * len(only) * len(TESTS)
    done = 0
    with Lab("bench") as lab:
        results["namespaces"] = dict(lab.ns)
        for r in range(runs):
            for name in list(active):
                start, stop = SETUP[name]
                log(f"round {r + 1}/{runs}  {name}: setting up")
                try:
                    try:
                        addr = start(lab)
                    except Exception as exc:  # noqa: BLE001 - keep measuring the others
                        log(f"round {r + 1}/{runs}  {name}: setup failed, dropped: {exc}")
                        results["errors"].append({"round": r + 1, "impl": name,
                                                  "stage": "setup", "error": str(exc)})
                        active.remove(name)
                        done += len(TESTS) * (runs - r)
                        continue
                    for test in TESTS:
                        done += 1
                        prefix = (f"[{done:>3}/{total}] {time.monotonic() - started:6.0f}s  "
                                  f"round {r + 1}/{runs}  {name:>19}  {test:<4}")
                        try:
                            figures = measure(lab, addr, test, seconds)
                        except Exception as exc:  # noqa: BLE001
                            log(f"{prefix}  failed: {exc}")
                            results["errors"].append({"round": r + 1, "impl": name,
                                                      "test": test, "error": str(exc)})
                            continue
                        extra = (f"lost {figures['lost_percent']:5.1f}%" if test == "udp"
                                 else f"retr {figures['retransmits']:>6}")
                        cpu = "  ".join(f"cpu {k[4]} {v:5.1f}%" for k, v in figures.items()
                                        if k.startswith("cpu_"))
                        log(f"{prefix}  {figures['mbit_s']:9.1f} Mbit/s  {extra}  {cpu}")
                        results["raw"].append({"round": r + 1, "impl": name, "test": test,
                                               **figures})
                finally:
                    stop(lab)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    summary: dict = {}
    for name in only:
        for test in TESTS:
            rows = [x for x in results["raw"] if x["impl"] == name and x["test"] == test]
            if not rows:
                continue
            values = [x["mbit_s"] for x in rows]
            entry = {"median_mbit_s": statistics.median(values), "min": min(values),
                     "max": max(values), "n": len(values)}
            if test != "udp":
                entry["retransmits"] = [x["retransmits"] for x in rows]
                entry["median_retransmits"] = statistics.median(entry["retransmits"])
            else:
                entry["median_lost_percent"] = statistics.median(
                    x["lost_percent"] for x in rows)
            for side in ("a", "b"):
                cpu = [x[f"cpu_{side}_percent"] for x in rows if f"cpu_{side}_percent" in x]
                if cpu:
                    entry[f"median_cpu_{side}_percent"] = statistics.median(cpu)
            summary.setdefault(name, {})[test] = entry
    results["summary"] = summary
    if "espdp" in summary:
        results["espdp_ratio"] = {
            peer: {t: summary["espdp"][t]["median_mbit_s"] / summary[peer][t]["median_mbit_s"]
                   for t in TESTS if t in summary["espdp"] and t in summary[peer]
                   and summary[peer][t]["median_mbit_s"] > 0}
            for peer in summary if peer != "espdp"}
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
        row = [summary[name].get(t, {"median_mbit_s": 0, "min": 0, "max": 0}) for t in tests]
        med = [x["median_mbit_s"] / 1000 for x in row]
        lo = [m - x["min"] / 1000 for m, x in zip(med, row, strict=True)]
        hi = [x["max"] / 1000 - m for m, x in zip(med, row, strict=True)]
        ax.bar([i + k * width for i in range(len(tests))], med, width, yerr=[lo, hi],
               capsize=3, label=name)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(tests))])
    ax.set_xticklabels(["TCP, 1 stream", "TCP, 4 streams", f"UDP {TESTS['udp'][-1]} B"])
    ax.set_yscale("log")
    ax.set_ylabel("Gbit/s (median, min-max; log)")
    ratios = results.get("espdp_ratio", {})
    note = "; ".join(f"espdp/{peer} TCP1 {r['tcp1']:.2f}" for peer, r in ratios.items()
                     if "tcp1" in r)
    ax.set_title(f"Two namespaces, iperf3, {results['runs']} alternating rounds of "
                 f"{results['seconds']:g} s\n{note}", fontsize=9)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--only", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--udp-len", type=int, default=1400,
                        help="UDP datagram size (1400 exceeds every tunnel's inner MTU "
                             "by the IP/UDP headers, so the datagrams fragment; 1300 does not)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "e2e.json",
                        help="the JSON file (the PNG goes beside it); or a directory")
    args = parser.parse_args()
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(SETUP))
    if unknown:
        parser.error(f"unknown implementation {unknown[0]} (known: {', '.join(SETUP)})")
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, TUN devices)")
    # Ctrl-C raises KeyboardInterrupt; SIGTERM likewise ends through the Lab's
    # cleanup (daemons, wireguard-go, charons, namespaces).
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    TESTS["udp"] = ["-u", "-b", "0", "-l", str(args.udp_len)]
    try:
        results = run(args.runs, args.seconds, only)
    except KeyboardInterrupt:
        log("\ninterrupted: namespaces and tunnel processes removed, nothing written")
        return 130
    out = args.out if args.out.suffix == ".json" else args.out / "e2e.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if results["summary"]:
        chart(results, out.with_suffix(".png"))
    print(f"{'median Mbit/s (min-max)':>24}  " + "  ".join(f"{t:>22}" for t in TESTS))
    for name, tests in results["summary"].items():
        print(f"{name:>24}  " + "  ".join(
            f"{tests[t]['median_mbit_s']:8.0f} ({tests[t]['min']:.0f}-{tests[t]['max']:.0f})"
            .rjust(22) if t in tests else f"{'-':>22}" for t in TESTS))
    for peer, ratios in results.get("espdp_ratio", {}).items():
        print(f"{'espdp / ' + peer:>24}  " + "  ".join(
            f"{ratios[t]:22.2f}" if t in ratios else f"{'-':>22}" for t in TESTS))
    for err in results["errors"]:
        print(f"error: {err['impl']} round {err['round']}: {err['error'][:300]}")
    print(f"{results['elapsed_s']:.0f} s; {out}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``espdp`` command.

    espdp demo                                   the engine on a generated capture
    espdp algs [--json] [--measure] [--proposal] the ESP transforms this build really has
    espdp pcap decrypt --xfrm SAS IN OUT [--json]
    espdp pcap encrypt --xfrm SAS [--spi SPI] IN OUT [--keys-out FILE] [--json]
    espdp run [--config FILE.toml] [--tun NAME] [--address CIDR]... [--route CIDR]...
              [--xfrm FILE] [--udp-port N] [--control PATH] [--metrics HOST:PORT] ...
    espdp xfrm [--control PATH] [--json] [--show-keys] state|policy ...   (ip xfrm words)
    espdp xfrm [--control PATH] [--json] monitor [acquire expire SA policy aevent mapping]
    espdp status [--control PATH] [--json]
    espdp cluster status [--control PATH] [--json]    nodes, segments, checkpoints, takeovers
    espdp lab [--mbytes N] [--json]     two namespaces, two daemons, traffic, a summary (root)

Exit status: 0 when the work was done (dropped packets are reported, not
fatal), 2 with a one-line message for bad arguments or a bad file, 1 when a
running tunnel had to stop (its TUN device was removed; the log says why).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .errors import ConfigError, EspdpError, XfrmError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other bad input
        self.exit(EXIT_USAGE, f"espdp: {message}\n")


def _spi(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid SPI {text!r}") from None
    if not 0 < value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"SPI {text} is out of range")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="espdp", description="A userspace ESP (IPsec) dataplane.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="run the engine on a generated capture and report")
    demo.add_argument("--packets", type=int, default=3000)
    demo.add_argument("--json", action="store_true")
    algs = sub.add_parser("algs", add_help=False,
                          help="list the ESP transforms that pass their known-answer tests")
    algs.add_argument("algs_args", nargs=argparse.REMAINDER)
    pcap = sub.add_parser("pcap", help="decrypt or encrypt a capture offline")
    actions = pcap.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dec = actions.add_parser("decrypt", help="decrypt the ESP packets of a capture")
    enc = actions.add_parser("encrypt", help="encrypt every IP packet of a capture with one SA")
    for p in (dec, enc):
        p.add_argument("--xfrm", type=Path, required=True, metavar="FILE",
                       help="SAs (and policies) as 'ip xfrm state|policy add' lines")
        p.add_argument("input", type=Path, metavar="IN.pcap")
        p.add_argument("output", type=Path, metavar="OUT.pcap")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
    enc.add_argument("--spi", type=_spi,
                     help="encrypt everything with this SA (default: choose by 'dir out' policy)")
    enc.add_argument("--keys-out", type=Path, metavar="FILE",
                     help="write the SAs as a Wireshark esp_sa file (mode 0600)")
    run = sub.add_parser("run", help="run a tunnel (TUN device, sockets, control socket)")
    run.add_argument("--config", type=Path, metavar="FILE.toml")
    run.add_argument("--tun", metavar="NAME", help="the TUN device to create")
    run.add_argument("--fd", type=int, help="adopt this open TUN file descriptor")
    run.add_argument("--address", action="append", metavar="CIDR", default=[],
                     help="an address for the TUN device (repeatable)")
    run.add_argument("--route", action="append", metavar="CIDR", default=[],
                     help="a remote subnet routed into the tunnel (repeatable)")
    run.add_argument("--xfrm", type=Path, metavar="FILE", help="'ip xfrm' lines to apply")
    run.add_argument("--udp-port", type=int, metavar="N")
    run.add_argument("--control", metavar="PATH", help="the control socket")
    run.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics")
    run.add_argument("--mtu", type=int, help="TUN MTU (default: what fits the path)")
    run.add_argument("--path-mtu", type=int, help="MTU of the path to the peers (1500)")
    run.add_argument("--nat-keepalive", type=float, metavar="SECONDS")
    run.add_argument("--raw-esp", action="store_true", default=None,
                     help="also open raw ESP (IP protocol 50) sockets")
    run.add_argument("--state-dir", metavar="DIR")
    run.add_argument("-v", "--verbose", action="store_true")
    status = sub.add_parser("status", help="the SAs of a running tunnel and their counters")
    status.add_argument("--control", metavar="PATH")
    status.add_argument("--json", action="store_true")
    cluster = sub.add_parser("cluster", help="the active-active cluster a tunnel belongs to")
    cluster_actions = cluster.add_subparsers(dest="action", required=True, parser_class=_Parser)
    cluster_status = cluster_actions.add_parser(
        "status", help="nodes, segments and owners, checkpoint age, takeovers")
    cluster_status.add_argument("--control", metavar="PATH")
    cluster_status.add_argument("--json", action="store_true")
    sub.add_parser("lab", add_help=False, help="two namespaces, one tunnel, traffic, a summary")
    sub.add_parser("bench", add_help=False,
                   help="the benchmark suite of a checkout: engine|lookup|e2e|scale|micro|all")
    sub.add_parser("xfrm", add_help=False, help="ip xfrm state|policy|monitor, on a running "
                   "tunnel (options: --control PATH, --json, --show-keys)")
    return parser


def _control_path(given: Optional[str]) -> str:
    """The socket named, or the only one in the runtime directory."""
    from .daemon import runtime_dir

    if given:
        return given
    try:
        socks = sorted(f for f in os.listdir(runtime_dir()) if f.endswith(".sock"))
    except OSError:
        socks = []
    if len(socks) != 1:
        raise ConfigError(f"{len(socks)} control sockets in {runtime_dir()}: "
                          "name one with --control PATH")
    return os.path.join(runtime_dir(), socks[0])


def _xfrm_command(argv: list) -> int:
    """``espdp xfrm [--control P] [--json] [--show-keys] WORDS...`` (options anywhere:
    no ``ip xfrm`` word starts with ``--``)."""
    from .client import ControlClient, format_answer, format_event

    words, control, as_json, show_keys = [], None, False, False
    it = iter(argv)
    for word in it:
        if word == "--control":
            control = next(it, None)
            if control is None:
                raise ConfigError("--control needs a PATH")
        elif word in ("--json", "-j"):
            as_json = True
        elif word in ("--show-keys", "-s"):
            show_keys = True
        else:
            words.append(word)
    if not words or words[0] not in ("state", "policy", "monitor"):
        raise ConfigError("usage: espdp xfrm [--control PATH] [--json] "
                          "state|policy|monitor ...")
    with ControlClient(_control_path(control)) as client:
        if words[0] == "monitor":
            groups = [w.lower() for w in words[1:] if w != "all"]  # ip says SA
            for event in client.events(groups):
                print(json.dumps(event) if as_json else format_event(event), flush=True)
            return 0
        result = client.xfrm(shlex.join(words), show_keys=show_keys)
    text = json.dumps(result, indent=2) if as_json else format_answer(result)
    if text:
        print(text)
    return 0


def _run_command(args) -> int:
    import logging

    from . import config, daemon

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="espdp: %(message)s")
    base = config.load(args.config) if args.config else config.Config()
    if base.tunnel.tun is None and base.tunnel.fd is None and args.tun is None \
            and args.fd is None:
        raise ConfigError("espdp run needs --tun NAME, --fd N or a config file with [tunnel]")
    cfg = config.override(base, xfrm=args.xfrm, tun=args.tun, fd=args.fd,
                          address=args.address, route=args.route, udp_port=args.udp_port,
                          control=args.control, metrics=args.metrics, mtu=args.mtu,
                          path_mtu=args.path_mtu, nat_keepalive=args.nat_keepalive,
                          raw_esp=args.raw_esp, state_dir=args.state_dir)
    return daemon.run(cfg)


def _print_report(report, action: str, as_json: bool) -> None:
    from .pcaptool import format_report

    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report, action))


BENCHES = {"engine": ["bench/engine.py"], "lookup": ["bench/lookup.py"],
           "e2e": ["bench/e2e.py"], "scale": ["bench/scale.py"],
           "micro": ["-m", "pytest", "-q", "bench/test_micro.py"]}


def _bench_command(argv: list) -> int:
    """``espdp bench NAME [ARGS...]``: a script of bench/ (a checkout's: the
    suite is not installed with the package), its options passed on."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    names = list(BENCHES) if argv[:1] in ([], ["all"]) else argv[:1]
    if names[0] not in BENCHES or argv[:1] in (["-h"], ["--help"]):
        print(f"usage: espdp bench {{{'|'.join(BENCHES)}|all}} [options of the script]",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    if not (root / "bench").is_dir():
        print(f"espdp: the benchmark suite is in a checkout of espdp (bench/), not in "
              f"{root}", file=sys.stderr)
        return 2
    for name in names:
        code = subprocess.call([sys.executable, *BENCHES[name], *argv[1:]], cwd=root)
        if code:
            return code
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["algs"]:  # its own options, parsed by espdp.algs
            from .algs import main as algs_main

            return algs_main(argv[1:])
        if argv[:1] == ["lab"]:  # the two-namespace lab, its own options
            from .lab import main as lab_main

            return lab_main(argv[1:])
        if argv[:1] == ["xfrm"]:
            return _xfrm_command(argv[1:])
        if argv[:1] == ["bench"]:
            return _bench_command(argv[1:])
        args = _parser().parse_args(argv)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.packets, args.json)
        if args.command == "run":
            return _run_command(args)
        if args.command in ("status", "cluster"):
            from .client import ControlClient, format_cluster, format_status

            op = "status" if args.command == "status" else "cluster"
            with ControlClient(_control_path(args.control)) as client:
                result = client.request(op)
            text = format_status(result) if op == "status" else format_cluster(result)
            print(json.dumps(result, indent=2) if args.json else text)
            return 0
        from . import pcaptool

        if args.action == "decrypt":
            report = pcaptool.decrypt_capture(args.xfrm, args.input, args.output)
        else:
            report = pcaptool.encrypt_capture(args.xfrm, args.spi, args.input, args.output,
                                              args.keys_out)
        _print_report(report, args.action, args.json)
        return 0
    except XfrmError as e:  # as ip xfrm reports a refused request
        print(f"espdp: {e.args[0]} ({e.errno})", file=sys.stderr)
        return EXIT_USAGE
    except EspdpError as e:
        print(f"espdp: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `espdp ... | head`: the reader left, nothing to report
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter quiet at exit
        return 0
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"espdp: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``espdp`` command.

    espdp demo                                   the engine on a generated capture
    espdp algs [--json] [--measure] [--proposal] the ESP transforms this build really has
    espdp pcap decrypt --xfrm SAS IN OUT [--json]
    espdp pcap encrypt --xfrm SAS [--spi SPI] IN OUT [--keys-out FILE] [--json]

Exit status: 0 when the work was done (dropped packets are reported, not
fatal), 2 with a one-line message for bad arguments or a bad file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .errors import EspdpError

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
    return parser


def _print_report(report, action: str, as_json: bool) -> None:
    from .pcaptool import format_report

    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report, action))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["algs"]:  # its own options, parsed by espdp.algs
            from .algs import main as algs_main

            return algs_main(argv[1:])
        args = _parser().parse_args(argv)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.packets, args.json)
        from . import pcaptool

        if args.action == "decrypt":
            report = pcaptool.decrypt_capture(args.xfrm, args.input, args.output)
        else:
            report = pcaptool.encrypt_capture(args.xfrm, args.spi, args.input, args.output,
                                              args.keys_out)
        _print_report(report, args.action, args.json)
        return 0
    except EspdpError as e:
        print(f"espdp: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `espdp ... | head`: the reader left, nothing to report
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter quiet at exit
        return 0
    except OSError as e:
        print(f"espdp: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

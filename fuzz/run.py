"""Run one fuzz target with atheris (coverage-guided, libFuzzer's engine).

    python fuzz/run.py TARGET [--seconds 60] [--corpus DIR]   (see fuzz/targets.py)
    scripts/fuzz.sh [SECONDS]       every target, then its corpus under ASan/UBSan

The seeds of the target start the corpus (``--corpus`` keeps what it finds).
A crash leaves ``crash-*`` with the input in the current directory: turn it
into a regression test (tests/test_fuzz_targets.py reads fuzz/regressions/).
The Python code is instrumented for coverage; the extension is not (it is
built with gcc), so its paths are found through the Python-visible
behaviour.  gcc's ASan runtime cannot be loaded beside atheris's libFuzzer
(whose coverage hooks it would replace), so scripts/fuzz.sh fuzzes on the
normal build and then replays every input found (``--seconds 0``) on the
sanitized one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# espdp's Python code (and the targets) instrumented for coverage, not the whole
# interpreter: instrument_all() would take a minute to start under ASan.
with atheris.instrument_imports(include=["espdp", "targets", "helpers"]):
    import targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(targets.TARGETS))
    parser.add_argument("--seconds", type=int, default=60,
                        help="how long to fuzz; 0: run the corpus once (a replay)")
    parser.add_argument("--corpus", type=Path)
    args, rest = parser.parse_known_args()
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix=f"fuzz-{args.target}-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for k, seed in enumerate(targets.SEEDS.get(args.target, [])):
        (corpus / f"seed-{k}").write_bytes(seed)
    regressions = HERE / "regressions" / args.target
    if regressions.is_dir():
        for path in regressions.iterdir():
            (corpus / f"regression-{path.name}").write_bytes(path.read_bytes())
    limit = f"-max_total_time={args.seconds}" if args.seconds > 0 else "-runs=0"
    argv = [sys.argv[0], limit, "-print_final_stats=1", "-rss_limit_mb=4096", *rest,
            str(corpus)]
    atheris.Setup(argv, targets.TARGETS[args.target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()

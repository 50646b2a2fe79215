#!/usr/bin/env bash
# The engine's tests under AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   scripts/sanitize.sh [pytest arguments]     (default: the engine and parser tests)
#   scripts/sanitize.sh --run COMMAND...       any command, e.g. a fuzz target
#
# Builds the extension with ESPDP_SANITIZE=1 into build/asan (a copy of the
# package, so the normal in-place build stays as it is), then runs pytest
# with that copy first on the path and the sanitizer runtimes preloaded
# into Python.  Any invalid access or undefined behaviour aborts the run.
# Leak detection is off: CPython's own allocations would drown it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/asan
mkdir -p "$out/espdp"
# A fresh copy of the Python files; the sanitized extension is rebuilt only
# when a Cython source is newer than it (or it is missing).
find "$out/espdp" -type f ! -name '*.so' -delete
tar -C espdp --exclude='*.so' --exclude=__pycache__ -cf - . | tar -C "$out/espdp" -xf -
stamp=$(ls "$out"/espdp/_engine*.so 2>/dev/null | head -1 || true)
if [[ -z $stamp || -n $(find src_cython setup.py -newer "$stamp" -print -quit) ]]; then
    rm -f "$out"/espdp/*.so
    ESPDP_SANITIZE=1 .venv/bin/python setup.py -q build_ext --build-lib "$out" \
        --build-temp "$out/tmp" 2>&1 | grep -E "error|Error" >&2 || true
fi
ls "$out"/espdp/_engine*.so >/dev/null
# The editable install's import hook would find the normal build first: drop it.
cat > "$out/sitecustomize.py" <<'PY'
import os
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
PY
runtime="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
run=()
if [[ ${1:-} == --run ]]; then
    shift
    run=("$@")
    set --
fi
tests=("$@")
if ((${#tests[@]} == 0)); then
    tests=(tests/test_bad_packets.py tests/test_engine_semantics.py tests/test_engine_state.py
           tests/test_known_answers.py tests/test_replay.py tests/test_scapy_interop.py
           tests/test_pcap.py tests/test_io_mmsg.py tests/test_pmtu.py tests/test_flow_key.py
           tests/test_flow_cache.py tests/test_fuzz_targets.py tests/test_seqguard.py
           tests/test_dataplane.py tests/test_workers.py)
fi
export LD_PRELOAD="$runtime" PYTHONPATH="$out"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
root=$PWD
cd "$out"   # not the checkout: its espdp/ would come first on the path
where=$("$root/.venv/bin/python" -c "import espdp._esp as m; print(m.__file__)")
case "$where" in
    "$root/$out/"*) ;;
    *) echo "sanitize: the sanitized build is not the one imported ($where)" >&2; exit 1 ;;
esac
if ((${#run[@]})); then
    echo "sanitize: $where; ${run[*]}" >&2
    exec "${run[@]}"
fi
echo "sanitize: $where; ${tests[*]}" >&2
"$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]/#/$root/}"

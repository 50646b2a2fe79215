#!/usr/bin/env bash
# Every fuzz target of fuzz/targets.py: SECONDS of coverage-guided fuzzing
# each (default 15: the CI run) on the normal build, then every input it kept
# replayed once on the ASan/UBSan build (scripts/sanitize.sh; see fuzz/run.py
# for why in two steps).  A crash stops the run, with the input in
# fuzz/crashes/.  The executions per target are printed at the end.
#   scripts/fuzz.sh 600           a longer run
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
seconds=${1:-15}
mkdir -p fuzz/crashes
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
targets=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'fuzz'); import targets; \
print(' '.join(targets.TARGETS))")
summary=()
for t in $targets; do
    for phase in fuzz replay; do
        if [[ $phase == fuzz ]]; then
            cmd=(.venv/bin/python fuzz/run.py "$t" --seconds "$seconds")
        else
            cmd=(scripts/sanitize.sh --run "$root/.venv/bin/python" "$root/fuzz/run.py" "$t"
                 --seconds 0)
        fi
        if ! "${cmd[@]}" --corpus "$work/$t" -artifact_prefix="$root/fuzz/crashes/$t-" \
                >"$work/$t.$phase.log" 2>&1; then
            tail -40 "$work/$t.$phase.log" >&2
            echo "fuzz: $t failed in the $phase phase; the input is in fuzz/crashes/" >&2
            exit 1
        fi
    done
    runs=$(grep -o 'number_of_executed_units: [0-9]*' "$work/$t.fuzz.log" | grep -o '[0-9]*$')
    kept=$(find "$work/$t" -type f | wc -l)
    summary+=("$t: $runs executions, $kept inputs replayed under ASan/UBSan")
done
printf 'fuzz: %s\n' "${summary[@]}"

#!/usr/bin/env bash
# The test suite N times in a row (default 5) beside a CPU-bound burner that
# keeps one core busy, stopping at the first failing run. Tests that wait for
# real readiness signals pass on a loaded box; a test that leans on how fast
# something ran (a sleep as readiness, a tight clock comparison) fails here
# first. Runs as CI does (CI=true: nothing may skip), so it needs root.
#
# Usage: scripts/stress-suite.sh [N] [pytest args...]
#   scripts/stress-suite.sh              # the whole suite, 5 times
#   scripts/stress-suite.sh 1 -k tracker # one run of a subset
# Environment: STRESS_CPU=k pins the burner to CPU k (default: unpinned, the
# scheduler moves it); STRESS_TIMEOUT=s ends a run after s seconds (default 3600).
set -euo pipefail
cd "$(dirname "$0")/.."

n=${1:-5}
if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
    echo "stress-suite: error: N must be a positive whole number, got '$n'" >&2
    exit 2
fi
[[ $# -gt 0 ]] && shift
limit=${STRESS_TIMEOUT:-3600}
[[ -x .venv/bin/python ]] || { echo "stress-suite: error: no .venv (run scripts/setup.sh)" >&2; exit 2; }

burn=(python3 -c 'while True: pass')
[[ -n ${STRESS_CPU:-} ]] && burn=(taskset -c "$STRESS_CPU" "${burn[@]}")
"${burn[@]}" &
burner=$!
# only the burner this script started, whatever way the script ends
trap 'kill "$burner" 2>/dev/null || true; wait "$burner" 2>/dev/null || true' EXIT

logs=$(mktemp -d /tmp/stress-suite.XXXXXX)
summary=()
status=0
echo "stress-suite: $n run(s) of pytest $* beside a CPU burner (pid $burner); logs in $logs"
for ((i = 1; i <= n; i++)); do
    if ! kill -0 "$burner" 2>/dev/null; then
        echo "stress-suite: error: the CPU burner died; the runs would not be under load" >&2
        status=2
        break
    fi
    log="$logs/run-$i.log"
    t0=$SECONDS
    rc=0
    CI=true timeout --signal=INT --kill-after=60 "$limit" \
        .venv/bin/python -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1 || rc=$?
    last=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$log" | tail -n 1 || true)
    summary+=("run $i/$n: exit $rc in $((SECONDS - t0)) s: ${last:-no pytest summary}")
    echo "${summary[-1]}"
    if ((rc != 0)); then
        status=1
        [[ $rc -eq 124 ]] && echo "stress-suite: run $i hit STRESS_TIMEOUT=$limit s" >&2
        echo "---- run $i: failures (full log $log) ----"
        grep -E '^(FAILED|ERROR) ' "$log" || tail -n 40 "$log"
        break
    fi
done

echo "==== stress-suite summary ===="
printf '%s\n' "${summary[@]}"
if ((status == 0)); then
    echo "all $n run(s) passed under load"
else
    echo "stopped after ${#summary[@]} of $n run(s): FAILED"
fi
exit "$status"

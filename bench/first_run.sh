#!/usr/bin/env bash
# A newcomer's first run, timed on a fresh clone of this checkout's HEAD (a benchmark, not a
# test): `make setup`, then `make iterate N=10` with no base (it installs the shipped one), then
# `make iterate N=10` again into another run directory (the base present). Prints one line per
# step with its seconds and the ratio to the times an earlier newcomer measured before the
# shipped base and the in-process engine (issue "The same numbers on every machine": 18 min
# for base + iterate, 3 min 41 s for iterate alone).
#
#   bench/first_run.sh [WORK_DIR]      (default: a new temporary directory, removed at the end)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
[ -n "${1:-}" ] || trap 'rm -rf "$work"' EXIT
git clone --quiet "$repo" "$work/tapo"
cd "$work/tapo"
step() {  # NAME BEFORE_SECONDS COMMAND...: runs it, prints seconds and the ratio to BEFORE
    local name=$1 before=$2 t0=$SECONDS
    shift 2
    "$@" > "$work/$name.log" 2>&1 || { tail -30 "$work/$name.log"; exit 1; }
    local s=$((SECONDS - t0))
    printf '%-34s %5d s' "$name" "$s"
    [ "$before" = - ] && echo || awk -v s="$s" -v b="$before" \
        'BEGIN { printf "   (before: %d s, ratio %.2f)\n", b, s / b }'
}
step "make setup" - make setup
step "make iterate N=10 (base included)" 1090 make iterate N=10
step "make iterate N=10 (base present)" 221 make iterate N=10 RUN=second

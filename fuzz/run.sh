#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (default 30 s each) from the seed corpus;
# exits non-zero on the first crash, leak, sanitizer report or broken invariant, leaving
# the input that caused it in fuzz/build/artifacts/. Build first with fuzz/build.sh.
#   fuzz/run.sh [seconds per target]
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${1:-30}
B=fuzz/build
mkdir -p "$B/artifacts"
for target in footer load; do
  # New inputs go to a scratch corpus; the committed seeds are only read.
  work="$B/corpus_$target"
  mkdir -p "$work"
  echo "fuzz_$target: ${SECONDS_EACH}s"
  # NOTE: 2 GiB of RSS and 4 KiB footers / 64 KiB files keep each run fast and far from
  # the limits of a CI machine while still covering every branch of the parser.
  max_len=$([ "$target" = footer ] && echo 4096 || echo 65536)
  log="$B/fuzz_$target.log"
  status=0
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$B/fuzz_$target" -max_total_time="$SECONDS_EACH" -max_len="$max_len" -rss_limit_mb=2048 -timeout=10 \
    -dict=fuzz/flashpack.dict -artifact_prefix="$B/artifacts/${target}-" -print_final_stats=1 \
    "$work" "fuzz/corpus/$target" > "$log" 2>&1 || status=$?
  grep -E "^INFO: seed corpus|^stat::number_of_executed_units|^#[0-9]+ +DONE" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log"
    echo "fuzz_$target failed (exit $status); the input is in $B/artifacts/"
    exit 1
  fi
done
echo "fuzzing passed"

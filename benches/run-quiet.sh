#!/bin/sh
# The record run of issue 18 on a quiet machine: every bench the issue needs, then
# bench-report's tables and verdicts. Nothing else may run meanwhile (check `uptime`).
#
#   benches/run-quiet.sh            # about 12 minutes on the 2-core VM (+ build time)
#
# Results go to a fresh directory, target/criterion-record/ (CRITERION_HOME), so no
# figure of an older or partial run can end up in the tables; the report is printed and
# saved as target/criterion-record/report.md. Set TOKENFLIGHT_BENCH_PIN=1 to pin the
# end-to-end bench's loopback server to its own CPU (a measurement check, not the record).
set -eu
cd "$(dirname "$0")/.."
CRITERION_HOME="$(pwd)/target/criterion-record"
export CRITERION_HOME
rm -rf "$CRITERION_HOME"
mkdir -p "$CRITERION_HOME"
cargo bench -p tokenflight-benches --no-run
cargo build --release -p tokenflight-benches --bin bench-report
{
    echo "started: $(date -u '+%Y-%m-%d %H:%M UTC'), $(uptime)"
} > "$CRITERION_HOME/load.txt"
# fast_path ~1 min, storm ~5 min, end_to_end ~5 min (criterion + interleaved rounds),
# middleware_overhead ~30 s.
cargo bench -p tokenflight-benches --bench fast_path --bench storm --bench end_to_end \
    --bench middleware_overhead
echo "ended: $(date -u '+%Y-%m-%d %H:%M UTC'), $(uptime)" >> "$CRITERION_HOME/load.txt"
cat "$CRITERION_HOME/load.txt"
target/release/bench-report | tee "$CRITERION_HOME/report.md"

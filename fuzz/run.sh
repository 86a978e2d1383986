#!/bin/bash
# Runs each fuzz target for a while with its seed corpus and dictionary, and prints the totals.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 600 s, all three targets)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and a nightly toolchain; without
# nightly, RUSTC_BOOTSTRAP=1 lets the stable compiler take the sanitizer flags. The working
# corpus grows in fuzz/corpus/<target> (not committed); crashes land in fuzz/artifacts/<target>.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(control_request config_load notify_datagram)
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    log="artifacts/$target/last-run.log"
    echo "== $target: ${seconds}s" >&2
    cargo "${toolchain[@]}" fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -dict="dict/$target.dict" -max_total_time="$seconds" -max_len=65536 \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tee "$log" |
        grep -E '^(#[0-9]+.*(DONE|pulse)|stat::number_of_executed_units|.*ERROR|==[0-9]+==)' || true
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    edges=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    echo "$target: ${execs:-?} executions, ${edges:-?} coverage edges, corpus $(ls "corpus/$target" | wc -l) inputs" >&2
    if grep -q 'ERROR: libFuzzer\|deadly signal\|panicked' "$log"; then
        echo "$target: FINDING, see $log and artifacts/$target/" >&2
        exit 1
    fi
done

#!/usr/bin/env bash
# make fuzz: builds the libFuzzer targets (--sanitize=fuzzer alone: adding address to the same
# SwiftPM build loses coverage feedback), runs each for FUZZ_SECONDS (default 60) from the seed
# corpus in Fuzz/corpus, then replays the corpus and whatever was found in a separate
# AddressSanitizer build. A crash leaves its input in Fuzz/crashes/ and fails the run: add that
# file to Fuzz/corpus/<target>/ and it becomes a regression test (ArmoryProtocolTests replays the
# message corpus; `make fuzz` replays them all).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
TARGETS=(${FUZZ_TARGETS:-fuzz-frames fuzz-messages fuzz-journal})
export ARMORY_FUZZ=1
# The runtime's backtracer hangs on the first crash under libFuzzer.
export SWIFT_BACKTRACE=enable=no

build() {  # build-path, sanitizers…
    local path="$1"; shift
    for target in "${TARGETS[@]}"; do
        swift build --build-path "$path" "$@" --product "$target" >/dev/null
    done
}

echo "fuzz: building ${TARGETS[*]} with --sanitize=fuzzer"
build .build-fuzz --sanitize=fuzzer
mkdir -p Fuzz/crashes
status=0
for target in "${TARGETS[@]}"; do
    work="Fuzz/work/$target"
    mkdir -p "$work"
    echo "fuzz: $target for ${SECONDS_PER_TARGET}s"
    if ! ".build-fuzz/debug/$target" -max_total_time="$SECONDS_PER_TARGET" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
            -print_final_stats=1 -artifact_prefix="Fuzz/crashes/$target-" "$work" "Fuzz/corpus/$target" 2>"Fuzz/work/$target.log"; then
        echo "fuzz: $target FOUND A CRASH (Fuzz/crashes/, log in Fuzz/work/$target.log)"
        tail -20 "Fuzz/work/$target.log"
        status=1
    fi
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb' "Fuzz/work/$target.log" | sed "s/^/fuzz: $target /" || true
done

echo "fuzz: replaying every corpus under AddressSanitizer"
build .build-fuzz-asan --sanitize=fuzzer --sanitize=address
for target in "${TARGETS[@]}"; do
    inputs=("Fuzz/corpus/$target" "Fuzz/work/$target")
    compgen -G "Fuzz/crashes/$target-*" >/dev/null && inputs+=(Fuzz/crashes/"$target"-*)
    if ! ".build-fuzz-asan/debug/$target" -runs=0 "${inputs[@]}" 2>"Fuzz/work/$target.asan.log"; then
        echo "fuzz: $target fails under AddressSanitizer (Fuzz/work/$target.asan.log)"
        tail -30 "Fuzz/work/$target.asan.log"
        status=1
    fi
done
[ "$status" = 0 ] && echo "fuzz: no crash"
exit "$status"

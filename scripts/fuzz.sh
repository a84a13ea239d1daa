#!/usr/bin/env bash
# Fuzzes every parser of untrusted input (the cargo-fuzz targets in fuzz/), each for a
# bounded time, starting from the committed seed corpus. Exits non-zero if any target
# crashes, hangs or leaks, and prints the path of the input that did it.
#
#   bash scripts/fuzz.sh                 # every target, FUZZ_SECONDS (30) each
#   FUZZ_SECONDS=300 bash scripts/fuzz.sh svid csr
#
# Environment:
#   FUZZ_SECONDS    time per target (default 30)
#   FUZZ_TOOLCHAIN  toolchain for cargo-fuzz (default nightly; installed with rustup if missing)
#   FUZZ_SANITIZER  address (default) or none: none builds faster, finds only panics
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a hang (default 30)
#
# The committed corpus (fuzz/corpus/<target>) is never written: each run starts from a
# scratch copy in fuzz/corpus-run/<target> (git-ignored), which keeps what the run found
# for the next local run. Crashing inputs land in fuzz/artifacts/<target>/; reproduce one
# with `cd fuzz && cargo +nightly fuzz run <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-30}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
sanitizer=${FUZZ_SANITIZER:-address}
timeout=${FUZZ_TIMEOUT:-30}

# libFuzzer needs the nightly compiler (-Z sanitizer flags, sancov passes).
if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
  echo "== installing the $toolchain toolchain"
  rustup toolchain install "$toolchain" --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

cd fuzz
build_flags=(--sanitizer "$sanitizer")
mapfile -t all_targets < <(cargo "+$toolchain" fuzz list)
if [ $# -gt 0 ]; then
  targets=("$@")
else
  targets=("${all_targets[@]}")
fi

echo "== cargo fuzz build (${#all_targets[@]} targets, sanitizer $sanitizer)"
start=$SECONDS
cargo "+$toolchain" fuzz build "${build_flags[@]}"
echo "built in $((SECONDS - start)) s"

failed=()
for target in "${targets[@]}"; do
  if [ ! -d "corpus/$target" ]; then
    echo "fuzz.sh: no seed corpus at fuzz/corpus/$target" >&2
    exit 2
  fi
  scratch="corpus-run/$target"
  mkdir -p "$scratch" "artifacts/$target"
  cp -f "corpus/$target"/* "$scratch"/
  marker=$(mktemp)
  echo "== $target: ${seconds} s"
  log="artifacts/$target/last-run.log"
  start=$SECONDS
  status=0
  cargo "+$toolchain" fuzz run "${build_flags[@]}" "$target" "$scratch" -- \
    -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb=4096 \
    -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" |
    sed 's/^/   /' || true
  echo "   exit $status after $((SECONDS - start)) s; log: fuzz/$log"
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    # What libFuzzer said, and the input(s) it saved.
    grep -E 'ERROR: |panicked at|SUMMARY|Test unit written to' "$log" | head -20 | sed 's/^/   /' || true
    find "artifacts/$target" -type f -newer "$marker" ! -name last-run.log -printf '   crashing input: fuzz/%p\n'
  fi
  rm -f "$marker"
done

echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: failed: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi

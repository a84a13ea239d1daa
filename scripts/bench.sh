#!/usr/bin/env bash
# Benchmarks the zmesh data path on this machine: direct TCP vs. client -> zmesh proxy A
# -> HBONE/mTLS -> zmesh proxy B -> server, both proxies as separate processes, all on
# 127.0.0.0/8. Prints a table of figures, mesh/direct ratios and the targets (see
# BENCHMARKS.md). Arguments go to zmesh-bench, e.g.:
#   scripts/bench.sh --rounds 3 --seconds 5 --json /tmp/bench.json
set -euo pipefail
cd "$(dirname "$0")/.."

# The `dist` profile is what a node runs (fat LTO); the first build takes several minutes.
cargo build --profile dist -p zmesh -p zmesh-bench
exec target/dist/zmesh-bench --zmesh target/dist/zmesh "$@"

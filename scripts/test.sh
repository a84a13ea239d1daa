#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every test of every crate,
# including the ones that need root, network namespaces, cgroups and eBPF, and the ones
# against a real Kubernetes API server.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# The Kubernetes control plane of tests/kube_apiserver.rs: built once per machine (~6 min
# cold), cached in /var/cache/zmesh; a no-op afterwards.
bash scripts/control-plane.sh >/dev/null

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --features zmesh/demo --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --features zmesh/demo --locked

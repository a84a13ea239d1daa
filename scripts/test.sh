#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every test of every crate,
# including the ones that need root, network namespaces, cgroups and eBPF, and the ones
# against a real Kubernetes API server.
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-off build gains nothing from incremental state, and it doubles target/ on disk.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

bash scripts/setup.sh
# The Kubernetes control plane of tests/kube_apiserver.rs: built once per machine (~6 min
# cold), cached in /var/cache/zmesh; a no-op afterwards.
bash scripts/control-plane.sh >/dev/null
# The container runtime of tests/node_runtime.rs (containerd, runc, CNI plugins, two local
# images): extracted once per machine (seconds) into /var/cache/zmesh; a no-op afterwards.
bash scripts/node-runtime.sh >/dev/null

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --features zmesh/demo --locked -- -D warnings
echo "== cargo test"
if [ -z "${ZTUNNEL_BIN:-}" ]; then
  echo "   (tests/ztunnel_inpod.rs and tests/ztunnel_interop.rs are skipped: ZTUNNEL_BIN is not set; README, \"A stock ztunnel in the tests\")"
fi
cargo test --workspace --features zmesh/demo --locked
# The Dockerfile's build stage, run outside a container (no container builder here): the
# same build script, and the runtime stage's libraries and programs checked. The dist build
# is cached in /var/cache/zmesh/dist-target (cold: 10-14 min on 2 cores).
echo "== image build stage (no image is built: scripts/image-check.sh)"
bash scripts/image-check.sh
# Debian's own kernels booted in QEMU (TCG): the redirection tests and the demo on Debian
# 12's 6.1 (clsact filters, no TCX), and Debian 11's 5.10 refused up front. Kernels, qemu and
# the guest's base are cached in /var/cache/zmesh/vm (~1.5 min warm).
echo "== kernels in VMs"
bash scripts/vm-test.sh
# Every parser of untrusted input, fuzzed briefly from the committed corpus (longer by
# hand: FUZZ_SECONDS=600 FUZZ_SANITIZER=address bash scripts/fuzz.sh). The fuzz build is
# kept outside the clone so that a machine pays it once.
echo "== fuzz (${FUZZ_SECONDS:-30} s per target)"
CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-/var/cache/zmesh/fuzz-target} \
  FUZZ_SECONDS=${FUZZ_SECONDS:-30} FUZZ_SANITIZER=${FUZZ_SANITIZER:-none} \
  bash scripts/fuzz.sh

# syntax=docker/dockerfile:1
# The zmesh image: `zmesh` (the CA, the node agent and the CLI), `zmesh-datapath` (the node
# proxy's process, the proxy alone) and `zmesh-cni` (the CNI plugin the agent copies onto
# its node), on Debian 12 slim.
#
#   docker build -t ghcr.io/zmesh/zmesh:dev .
#
# The build stage runs scripts/build-dist.sh, the script scripts/image-check.sh runs outside
# a container in CI (which has no container builder): the same cargo command, profile and
# features. That check also takes RUST_VERSION, DEBIAN and the two package lists below
# from this file, so keep their `ARG NAME=value` form.
#
# The image's user is 65532 (not root): the CA runs as it. The node agent must run as root
# (its DaemonSet sets runAsUser: 0) with BPF, NET_ADMIN, SYS_ADMIN, ... capabilities: it
# loads eBPF programs, enters pods' network namespaces and writes the host's CNI files.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN} AS build
# clang-19 compiles the eBPF programs (redirect-bpf/build.rs) against libbpf's headers.
ARG BUILD_PACKAGES="clang-19 libbpf-dev"
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${BUILD_PACKAGES} \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    bash scripts/build-dist.sh /out

FROM docker.io/library/debian:${DEBIAN}-slim
# libc6 and libgcc-s1: what the binaries link (ldd; scripts/image-check.sh checks that every
# library comes from a package listed here). iproute2 and nftables: the agent runs `ip`
# (interfaces, policy routes) and, with dataPlane ztunnel, `nft` in pods' namespaces.
ARG RUNTIME_PACKAGES="libc6 libgcc-s1 iproute2 nftables"
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${RUNTIME_PACKAGES} \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/zmesh /out/zmesh-datapath /out/zmesh-cni /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/zmesh"]

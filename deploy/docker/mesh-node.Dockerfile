# The node daemon's image, eBPF programs included. From the repository's root:
#   docker build -f deploy/docker/mesh-node.Dockerfile -t REGISTRY/mycel/mesh-node:TAG .
FROM docker.io/library/rust:1.95-bookworm AS build
# The eBPF programs build with nightly's rust-src and bpf-linker against LLVM 22 (see
# DESIGN.md's toolchain facts). mesh-node's build script runs `cargo +nightly`, so the pinned
# nightly is linked under that name.
ARG NIGHTLY=nightly-2026-05-20
RUN apt-get update \
 && apt-get install -y --no-install-recommends llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
 && rustup toolchain link nightly "$(rustc +"$NIGHTLY" --print sysroot)"
RUN LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
    cargo install bpf-linker@0.13.0 --locked --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mesh-node

# Runs as root with the capabilities the DaemonSet grants, nothing more.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/mesh-node /usr/local/bin/mesh-node
ENTRYPOINT ["/usr/local/bin/mesh-node"]

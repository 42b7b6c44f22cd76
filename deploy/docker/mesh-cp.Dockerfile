# The control plane's image. From the repository's root:
#   docker build -f deploy/docker/mesh-cp.Dockerfile -t REGISTRY/mycel/mesh-cp:TAG .
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mesh-cp

# glibc and libgcc only; runs as an unprivileged user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/mesh-cp /usr/local/bin/mesh-cp
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mesh-cp"]

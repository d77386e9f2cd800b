# syntax=docker/dockerfile:1.7
# The mailroom controller image, as the Helm chart (charts/mailroom) runs it:
#   docker build -t ghcr.io/mailroom-dev/mailroom:0.1.0 .
# Multi-stage: the release binary is built in the Rust image, then copied alone into
# distroless/cc (glibc and CA certificates, no shell, no package manager), run as the
# distroless "nonroot" user 65532 (the chart's runAsUser). It is the binary the test suite
# runs, from the same sources and Cargo.lock (--locked), in release mode. Not a static
# (musl) binary on distroless/static: that would be a second build, for another libc's
# DNS resolver and allocator, that no test here runs; distroless/cc adds only glibc.

ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the build folder between builds on one machine.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin mailroom \
 && install -D -m 0755 target/release/mailroom /out/mailroom

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="mailroom" \
      org.opencontainers.image.description="Keeps testing POP3 and IMAP mailboxes declared as IncomingMailProvider resources" \
      org.opencontainers.image.source="https://github.com/mailroom-dev/mailroom" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/mailroom /mailroom
USER 65532:65532
# /metrics, /healthz and /readyz
EXPOSE 8080
ENTRYPOINT ["/mailroom"]
CMD ["controller"]

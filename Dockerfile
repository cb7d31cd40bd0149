# syntax=docker/dockerfile:1
# The floe image: one static-ish binary (glibc only, rustls for TLS) on a
# distroless base, running as a non-root user. The Helm chart's default
# image (ghcr.io/floe-rtc/floe:<appVersion>) is built from this file:
#   docker build -t ghcr.io/floe-rtc/floe:0.1.0 .

FROM docker.io/library/rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin floe \
    && install -D -m 0755 target/release/floe /out/floe

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="floe" \
      org.opencontainers.image.description="ICE infrastructure for WebRTC: signaling, STUN, metered TURN, control plane" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/floe /usr/local/bin/floe
USER 65532:65532
# signal 8080, control plane 8090, STUN/TURN 3478 (UDP+TCP) and 5349 (TLS),
# TURN's ops endpoints 9478. Relay ports are a configured UDP range.
EXPOSE 8080 8090 3478/udp 3478/tcp 5349 9478
ENTRYPOINT ["/usr/local/bin/floe"]
CMD ["--help"]

# syntax=docker/dockerfile:1
# meshbridge container image: `docker build -t meshbridge .`
# Runtime: distroless (glibc, CA certificates, no shell), as the nonroot user 65532.

ARG RUST_VERSION=1.89

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /build

# Dependencies first: this layer is rebuilt only when Cargo.toml or Cargo.lock change.
# Stub targets stand in for the sources (every target Cargo.toml declares must exist).
COPY Cargo.toml Cargo.lock ./
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && for b in translate ads_load consul_load kube_load webhook_load access_load; do echo 'fn main() {}' > "benches/$b.rs"; done \
    && cargo build --release --locked --bin meshbridge \
    && rm -rf src benches \
    && rm -f target/release/meshbridge target/release/deps/meshbridge-* target/release/deps/libmeshbridge-*

# Then meshbridge itself.
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin meshbridge \
    && install -D -m 0755 target/release/meshbridge /out/meshbridge

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="meshbridge" \
      org.opencontainers.image.description="Kubernetes operator and Envoy xDS control plane bridging a Consul service mesh into Kubernetes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=builder /out/meshbridge /meshbridge
USER 65532:65532
# xDS (gRPC ADS), admin API (/healthz, /readyz, /metrics), admission webhooks (HTTPS).
EXPOSE 18000 9090 9443
ENTRYPOINT ["/meshbridge"]
CMD ["run"]

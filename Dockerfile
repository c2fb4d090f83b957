# keywatch: a multi-stage build, a small non-root runtime.
#
#   docker build -t keywatch .
#   docker run --rm -v "$PWD/deploy:/etc/keywatch:ro" keywatch check-config /etc/keywatch/keywatch.toml
#
# The builder compiles the bundled librdkafka (rdkafka-sys: configure + make, zlib) and the
# bundled SQLite; the runtime only needs glibc, zlib, OpenSSL (for kafka-tls) and CA
# certificates.

ARG RUST_VERSION=1.89
ARG DEBIAN=bookworm
# Cargo features: `kafka-tls` (TLS and SASL to Kafka, librdkafka with OpenSSL) by default;
# `--build-arg FEATURES=` for a build without OpenSSL.
ARG FEATURES=kafka-tls

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS builder
ARG FEATURES
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config python3 perl zlib1g-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them: a stub crate with the
# real manifest and lock file.
# (The benches are only there because the manifest names them; they are not built.)
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --locked --release --features "$FEATURES" --bin keywatch \
 && rm -rf src
COPY src ./src
# Compiled in: the built-in templates (include_str!) and the chart's font (include_bytes!).
COPY rules ./rules
COPY assets ./assets
# Make cargo see the real sources as newer than the stub's build.
RUN touch src/main.rs src/lib.rs \
 && cargo build --locked --release --features "$FEATURES" --bin keywatch \
 && cp target/release/keywatch /keywatch \
 && strip /keywatch

FROM debian:${DEBIAN}-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g libssl3 tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 keywatch \
 && useradd --system --uid 10001 --gid keywatch --home-dir /var/lib/keywatch \
      --shell /usr/sbin/nologin keywatch \
 && install -d -o keywatch -g keywatch -m 0750 /var/lib/keywatch
COPY --from=builder /keywatch /usr/local/bin/keywatch
# Rules and templates as shipped; mount your own over /etc/keywatch.
COPY rules /etc/keywatch/rules
COPY examples /usr/share/keywatch/examples
USER keywatch:keywatch
WORKDIR /var/lib/keywatch
# Metrics and health (server.listen must be 0.0.0.0:9464 inside a container).
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/keywatch"]
CMD ["run", "--config", "/etc/keywatch/keywatch.toml"]

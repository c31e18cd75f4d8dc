# syntax=docker/dockerfile:1

# One image for the whole system: the orchestrator and the four example participants. The
# container's command picks the binary (docker-compose.yml does), e.g. `orchestrator run` or
# `payments`. Build with BuildKit (the default of `docker build` and `docker compose`).
#
#   docker build -t saga .
#   docker run --rm saga orchestrator validate /etc/saga/sagas.yaml

ARG RUST_VERSION=1.95

# --- builder -------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src
COPY . .
# The registry and the target directory are cache mounts: they survive between builds but are
# not part of any layer, so the binaries are copied out of the target directory in the same
# step. Only the five binaries the image ships are built (not the demo, the benchmark or the
# schema generator).
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN --mount=type=cache,id=saga-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=saga-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=saga-target,target=/src/target,sharing=locked \
    cargo build --release --locked \
        --bin orchestrator --bin orders --bin inventory --bin payments --bin shipping \
    && mkdir -p /out \
    && cp target/release/orchestrator target/release/orders target/release/inventory \
          target/release/payments target/release/shipping /out/

# --- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# ca-certificates for TLS brokers and databases, curl for the health check; nothing else.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# A non-root user; /data is its working directory, where SQLite files land when no
# DATABASE_URL is given (e.g. `orders.db`).
RUN groupadd --gid 10001 saga \
    && useradd --uid 10001 --gid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin saga \
    && mkdir -p /data /etc/saga \
    && chown 10001:10001 /data
COPY --from=builder /out/orchestrator /out/orders /out/inventory /out/payments /out/shipping \
    /usr/local/bin/
# The example saga definitions, as a default; mount your own over it (or set SAGA_CONFIG).
COPY orchestrator/sagas.yaml /etc/saga/sagas.yaml
# Defaults for `orchestrator run` (the participants ignore them): the definitions above, and
# the HTTP API on every interface, since 127.0.0.1 would be unreachable from outside.
ENV SAGA_CONFIG=/etc/saga/sagas.yaml \
    HTTP_ADDR=0.0.0.0:8080
WORKDIR /data
USER 10001:10001
EXPOSE 8080
# The orchestrator's liveness endpoint. The participants serve no HTTP: containers running
# them disable this check (see docker-compose.yml).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
CMD ["orchestrator", "run"]

# Kura node image. Build: docker build --build-arg KURA_GIT_SHA=$(git rev-parse --short=12 HEAD) -t kura .
# (the build context has no .git: without the argument the image reports git_sha="unknown")
# Run (auth "none" refuses a public address, so give it tokens):
#   docker run -p 4000:4000 -p 50051:50051 -v kura-data:/var/lib/kura -v $PWD/tokens.toml:/etc/kura/tokens.toml:ro \
#     -e KURA_AUTH_MODE=static -e KURA_AUTH_STATIC_TOKENS_FILE=/etc/kura/tokens.toml kura

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang libclang-dev protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY proto ./proto
COPY benches ./benches
# Seen by build.rs (a build argument is in RUN's environment); not a config variable at run time.
ARG KURA_GIT_SHA=""
RUN cargo build --release --locked --bin kura \
 && install -m 0755 target/release/kura /usr/local/bin/kura

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 kura \
 && useradd --system --uid 10001 --gid kura --home-dir /var/lib/kura --shell /usr/sbin/nologin kura \
 && install -d -o kura -g kura /var/lib/kura /etc/kura
COPY --from=build /usr/local/bin/kura /usr/local/bin/kura
COPY config/kura.toml /etc/kura/kura.example.toml
# Numeric, so that Kubernetes' runAsNonRoot can verify it (deploy/statefulset.yaml runs as 10001).
USER 10001:10001
ENV KURA_SERVER_HTTP=0.0.0.0:4000 \
    KURA_SERVER_GRPC=0.0.0.0:50051 \
    KURA_SERVER_INTERNAL=0.0.0.0:7443 \
    KURA_STORAGE_DATA_DIR=/var/lib/kura \
    KURA_LOG_FORMAT=json
VOLUME ["/var/lib/kura"]
EXPOSE 4000 50051 7443
# curl is installed in the runtime image for this. `|| exit 1` maps curl's exit codes (22 on an
# HTTP error, 7 when nothing listens) to the 1 ("unhealthy") that Docker documents.
HEALTHCHECK --interval=10s --timeout=2s --start-period=10s --retries=3 \
  CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:4000/up || exit 1"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/kura"]
CMD ["serve"]

# The image the Helm chart runs: `kiln` on a minimal Debian base, as a
# non-root user. Build: docker build -t <registry>/kiln:<version> .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin kiln

# libssl, libcrypto and zlib (libgit2's HTTPS and SSH), CA certificates.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kiln /usr/local/bin/kiln
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kiln"]

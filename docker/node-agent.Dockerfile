# syntax=docker/dockerfile:1
# The flotilla-node-agent image, for linux/amd64 and linux/arm64:
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/node-agent.Dockerfile \
#     -t ghcr.io/flotilla-dev/flotilla-node-agent:0.1.0 .
# Each platform compiles natively (under QEMU when it is not the builder's own); Cranelift
# generates the sandbox code for whichever architecture the binary runs on.
FROM rust:1.95-bookworm AS build
ARG TARGETPLATFORM
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=target-$TARGETPLATFORM \
    cargo build --profile dist --locked -p flotilla-node-agent --bin flotilla-node-agent \
    && install -D target/dist/flotilla-node-agent /out/flotilla-node-agent

# glibc and libgcc only; runs as the distroless nonroot user (65532), as the chart expects.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/flotilla-node-agent /usr/local/bin/flotilla-node-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/flotilla-node-agent"]

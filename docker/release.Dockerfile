# syntax=docker/dockerfile:1
# Both images, for linux/amd64 and linux/arm64 at once, from the binaries `.ci/release`
# cross-built (no compiling under QEMU, which the from-source Dockerfiles beside this one do for
# the platform that is not the builder's own). The build context is the release directory:
#   bash .ci/release dist
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/release.Dockerfile \
#     --target control-plane -t ghcr.io/flotilla-dev/flotilla-control-plane:0.1.0 --push dist
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/release.Dockerfile \
#     --target node-agent -t ghcr.io/flotilla-dev/flotilla-node-agent:0.1.0 --push dist
# buildx pushes each tag as one manifest list with an image per platform, which is what the
# chart's `image.repository` expects: every node pulls its own architecture.

# glibc and libgcc only; runs as the distroless nonroot user (65532), as the chart expects.
FROM gcr.io/distroless/cc-debian12:nonroot AS control-plane
ARG TARGETARCH
COPY --chmod=0755 ${TARGETARCH}/flotilla-control-plane /usr/local/bin/flotilla-control-plane
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/flotilla-control-plane"]

FROM gcr.io/distroless/cc-debian12:nonroot AS node-agent
ARG TARGETARCH
COPY --chmod=0755 ${TARGETARCH}/flotilla-node-agent /usr/local/bin/flotilla-node-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/flotilla-node-agent"]

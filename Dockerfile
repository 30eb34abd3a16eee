# The lcic-guard image: the sidecar (`serve`) and the reconciler (`reconcile`)
# in one image, run as a non-root user on a read-only root filesystem.
#
#   docker build -t lcic-guard:0.1.0 .
#   docker run --read-only --tmpfs /tmp lcic-guard:0.1.0 serve --redis-url redis://redis:6379/0
#
# Every third-party package comes from requirements/runtime.txt, a lock with
# hashes (scripts/lock refreshes it): the same image on any day. Offline
# builds (no package index reachable from inside the build): download the
# locked wheels beforehand, next to this file, and they are used instead of
# the index:
#
#   pip download --no-deps --require-hashes -r requirements/runtime.txt -d wheelhouse
#   docker build -t lcic-guard:0.1.0 .
#
# BASE_IMAGE must provide python3 (3.11) with its venv module, the same in
# both stages (the virtual environment is copied from one to the other).

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# Marks what only the build needs, for `docker image prune --filter label=...`.
LABEL org.lcic-guard.stage="build"
WORKDIR /src
COPY . .
# One virtual environment holding the server, its client (a distribution of
# its own, built from client/), the locked dependencies and the OpenTelemetry
# extra; pip and the build backend leave it before it is copied.
RUN python3 -m venv /opt/lcic-guard \
 && if [ -d wheelhouse ]; then set -- --no-index --find-links wheelhouse; fi \
 && /opt/lcic-guard/bin/pip install --no-cache-dir "$@" --require-hashes --no-deps \
        -r requirements/runtime.txt \
 && /opt/lcic-guard/bin/pip install --no-cache-dir --no-index --no-deps --no-build-isolation \
        ./client . \
 && /opt/lcic-guard/bin/pip check \
 && /opt/lcic-guard/bin/pip uninstall --yes --quiet pip setuptools wheel \
 && /opt/lcic-guard/bin/lcic-guard --help >/dev/null

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="lcic-guard" \
      org.opencontainers.image.description="gRPC enforcement sidecar for the billing policy of a cloud classroom platform" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/lcic-guard /opt/lcic-guard
# Bytecode was compiled at install time: a read-only root cannot take more.
# HOME points at the tmpfs, the only place the process may write.
ENV PATH=/opt/lcic-guard/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LCIC_GUARD_LISTEN=0.0.0.0:50051 \
    LCIC_GUARD_LOG_FORMAT=json
# A numeric user, so that orchestrators can verify it is not root.
USER 10001:10001
EXPOSE 50051 9464
# The sidecar's own gRPC health (SERVING once its statuses are fresh). For the
# reconciler, probe its HTTP endpoint instead: `lcic-guard probe --http HOST:PORT`.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["lcic-guard", "probe"]
ENTRYPOINT ["lcic-guard"]
CMD ["serve"]

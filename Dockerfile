# One image for every sidemesh component: `sidemesh controlplane|sidecar|service|status ...`.
#
# Online (what users get):   docker compose build      (or: docker build -t sidemesh:latest .)
#   BASE defaults to the official Python slim image; dependencies come from PyPI.
# Offline (no registry, CI): scripts/offline-build
#   BASE=sidemesh-base:bookworm (imported from a debootstrap of Debian's own packages) and
#   WHEELS=wheels (sidemesh and every dependency built on the host with `pip wheel`), so the
#   build installs with `pip --no-index` and reaches no registry at all.
#
# Both bases have `python3` with venv support (Debian's minbase has no pip and no `python`),
# so sidemesh always lives in a virtualenv at /opt/sidemesh created by `python3 -m venv`.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
LABEL sidemesh.stage=build
# Directory of prebuilt wheels inside the build context; empty = install from the index.
ARG WHEELS=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/sidemesh
COPY . /src
RUN set -eu; \
    if [ -n "${WHEELS}" ]; then \
        ls /src/${WHEELS}/sidemesh-*.whl >/dev/null 2>&1 \
            || { echo "no sidemesh wheel in ${WHEELS}/ (run scripts/offline-build)" >&2; exit 1; }; \
        /opt/sidemesh/bin/pip install --no-index --find-links "/src/${WHEELS}" sidemesh; \
    else \
        /opt/sidemesh/bin/pip install /src; \
    fi; \
    /opt/sidemesh/bin/sidemesh --help >/dev/null

FROM ${BASE}
LABEL sidemesh.stage=final \
      org.opencontainers.image.title="sidemesh" \
      org.opencontainers.image.description="A service mesh whose sidecars keep services talking when the control plane dies"
COPY --from=build /opt/sidemesh /opt/sidemesh
ENV PATH=/opt/sidemesh/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# app 8080; sidecar outbound 15001, inbound 15006 (mutual TLS), admin 15000; control plane gRPC 15010
# (mutual TLS), identity 15012 (join tokens), HTTP 15014; dashboard 15080 (and song's front door)
EXPOSE 8080 15000 15001 15006 15010 15012 15014 15080
ENTRYPOINT ["sidemesh"]
CMD ["--help"]

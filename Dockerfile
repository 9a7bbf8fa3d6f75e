# syntax=docker/dockerfile:1
# One image for every Kairos process; the command picks the process (k8s/base):
#   python -m gateway | python -m services.<profile|selection|decision|dispatch|feedback>
#   kairos migrate    | kairos <any CLI command>
# The base is pinned by digest (python:3.11-slim-bookworm, the multi-platform index). Refresh
# it deliberately: `docker buildx imagetools inspect python:3.11-slim-bookworm`.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:b18992999dbe963a45a8a4da40ac2b1975be1a776d939d098c647482bcad5cba

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A compiler only here, for any dependency without a wheel for the build's platform.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/kairos
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared shared
COPY gateway gateway
COPY services services
RUN /opt/kairos/bin/pip install --upgrade pip \
 && /opt/kairos/bin/pip install . \
 && /opt/kairos/bin/python -m compileall -q /opt/kairos/lib

FROM ${PYTHON_IMAGE}
# The same uid/gid the manifests run as (runAsUser 10001); no home, no shell login.
RUN groupadd --gid 10001 kairos \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin kairos
COPY --from=build /opt/kairos /opt/kairos
ENV PATH=/opt/kairos/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KAIROS_RUN_DIR=/tmp/kairos
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 8181 8182 8183 8184 8185
# Whichever process runs answers /healthz on its own port (gateway 8080, services 8181-8185);
# KAIROS_HEALTH_URL overrides. Kubernetes uses its own probes (k8s/base).
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 CMD ["python", "-c", "import os, sys, urllib.request as u\nurls = [os.environ['KAIROS_HEALTH_URL']] if os.environ.get('KAIROS_HEALTH_URL') else [f'http://127.0.0.1:{p}/healthz' for p in (8080, 8181, 8182, 8183, 8184, 8185)]\ndef ok(url):\n    try:\n        return u.urlopen(url, timeout=2).status == 200\n    except Exception:\n        return False\nsys.exit(0 if any(ok(x) for x in urls) else 1)"]
CMD ["python", "-m", "gateway"]

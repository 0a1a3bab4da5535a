# The codex workspace image for the Molecule platform: the Molecule runtime hosts adapter.py, which
# drives the pinned native codex binary (from the openai-codex-cli-bin wheel; no Node in the image).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gosu: start.sh drops from root to the agent user. git: codex works inside git repositories.
# Debian package versions are not pinned: the slim base moves with security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gosu git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# The runtime runs as uid 1000; /workspace must exist and be writable before it starts, because
# the runtime (as the agent) cannot create directories under /.
RUN useradd -u 1000 -m -s /bin/bash agent \
    && install -d -o agent -g agent -m 0755 /workspace

WORKDIR /app

# The runtime first, in its own layer. Runtime releases rebuild with RUNTIME_VERSION set; the ARG
# is part of this layer's cache key, so a new version is never served from a stale layer.
ARG RUNTIME_VERSION=
COPY requirements.txt ./
RUN if [ -n "${RUNTIME_VERSION}" ]; then \
        pip install --no-cache-dir -r requirements.txt "molecule-ai-workspace-runtime==${RUNTIME_VERSION}"; \
    else \
        pip install --no-cache-dir -r requirements.txt; \
    fi

# The project: the package is installed (with its dependencies, the pinned codex wheel among them);
# the root adapter.py/executor.py/app_server.py stay importable from /app (ADAPTER_MODULE=adapter,
# PYTHONPATH=/app) as aliases of the package's modules.
COPY pyproject.toml README.md config.yaml start.sh adapter.py executor.py app_server.py ./
COPY molecule_codex/ ./molecule_codex/
RUN pip install --no-cache-dir /app \
    && rm -rf /app/build /app/*.egg-info \
    && chmod 0755 /app/start.sh

ENV ADAPTER_MODULE=adapter \
    PYTHONPATH=/app \
    CODEX_HOME=/home/agent/.codex

ENTRYPOINT ["/app/start.sh"]

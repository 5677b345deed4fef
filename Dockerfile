# syntax=docker/dockerfile:1
# One image for every role (ROLE=ingest | live | all) and for migrations.
#   docker build -t ingest:0.1.0 .
#   docker run --rm -p 8080:8080 --env-file .env ingest:0.1.0            # python -m ingest serve
#   docker run --rm --env-file .env ingest:0.1.0 migrate                 # python -m ingest migrate
# The install steps are the ones `make install` runs (tests/test_deploy.py checks that they
# match), so the dependency set built here is the one the test suite ran against.

# --- build: the full Python image has a compiler and headers, in case a dependency has no
# wheel for the target platform. Nothing of this stage but /opt/venv reaches the final image.
FROM python:3.11.14-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Pinned runtime dependencies first: this layer stays cached until the lock changes.
COPY requirements.lock ./
RUN pip install -r requirements.lock

# Then the package itself, without resolving anything new: every dependency comes from the lock.
# pip byte-compiles what it installs, so the read-only runtime never needs to write .pyc files.
COPY pyproject.toml README.md ./
COPY ingest/ ingest/
RUN pip install --no-deps .

# --- base: slim Python, no compiler, no build tools, non-root. The image is `runtime` below.
FROM python:3.11.14-slim-bookworm AS base

LABEL org.opencontainers.image.title="ingest" \
      org.opencontainers.image.description="GPS ingestion: HTTP ingest, PostgreSQL group commit, live WebSocket fan-out" \
      org.opencontainers.image.licenses="MIT"

# A real passwd entry: libraries look the user up (asyncpg's default user, getpass).
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin app

COPY --from=build /opt/venv /opt/venv
WORKDIR /app

# The root filesystem is read-only in Kubernetes: never try to write .pyc files at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=8080

# Numeric ids, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080

# Exec form: python is PID 1 and receives SIGTERM itself (stop listening, close WebSockets
# with 1001, final flush, exit 0). `docker run IMAGE migrate` runs the migrations.
ENTRYPOINT ["python", "-m", "ingest"]
CMD ["serve"]

# --- dev: the production image plus devtools/ (the driver simulator), for docker compose's
# simulator only: `docker build --target dev`. Never deployed.
FROM base AS dev
COPY devtools/ /app/devtools/

# --- runtime, the default target (the last stage): exactly the base image, no devtools.
FROM base AS runtime

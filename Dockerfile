# One image for every stkpush process (web, worker, beat, flower, migrate); docker-compose.yml picks the command.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY worker ./worker
COPY producers ./producers
# constraints.txt pins every package, so the image runs exactly what the tests ran. Editable, because the
# Alembic migrations live beside the worker package (/app/migrations), not inside it.
RUN pip install -c constraints.txt -e .

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin stkpush
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY pyproject.toml constraints.txt README.md alembic.ini Procfile ./
COPY worker ./worker
COPY producers ./producers
COPY migrations ./migrations
USER stkpush
EXPOSE 8000 5555
CMD ["stkpush", "web", "--host", "0.0.0.0", "--port", "8000"]

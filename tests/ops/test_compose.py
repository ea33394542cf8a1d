"""docker-compose.yml, the Dockerfile, .env.example and the Procfile, checked by reading them (no Docker here).

What they promise: Redis persists (AOF) and never evicts; PostgreSQL keeps its data in a volume; nothing starts
before what it needs is healthy (and migrated); Flower needs a password and cannot start tasks; no secret is
written in any of them; every Procfile command exists.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.ops.conftest import BIN, REPO, clean_environ
from worker.settings import Settings

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
APP_SERVICES = ("migrate", "web", "worker", "beat", "flower")
LONG_RUNNING = ("redis", "postgres", "web", "worker", "beat", "flower")
SECRET_NAMES = (
    "UPESIPAY_AUTH_TOKEN",
    "CALLBACK_SECRET",
    "API_KEYS",
    "POSTGRES_PASSWORD",
    "FLOWER_BASIC_AUTH",
)
QUEUES = "maintenance,single,bulk,webhooks"


def command_text(service: str) -> str:
    command = SERVICES[service]["command"]
    return command if isinstance(command, str) else " ".join(command)


def procfile() -> dict[str, str]:
    lines = (REPO / "Procfile").read_text().splitlines()
    entries = [line.split(":", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip(): command.strip() for name, command in entries}


def test_compose_has_every_service() -> None:
    assert set(SERVICES) == {"redis", "postgres", "migrate", "web", "worker", "beat", "flower"}


def test_redis_persists_with_aof_and_never_evicts() -> None:
    command = command_text("redis")
    assert re.search(r"--appendonly yes\b", command)
    assert re.search(r"--maxmemory-policy noeviction\b", command)
    assert any(volume.endswith(":/data") for volume in SERVICES["redis"]["volumes"])
    assert "ports" not in SERVICES["redis"], "Redis has no password: it must stay on the project network"


def test_postgres_keeps_its_data_in_a_volume() -> None:
    volumes = SERVICES["postgres"]["volumes"]
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in volumes)
    named = {volume.split(":", 1)[0] for volume in volumes + SERVICES["redis"]["volumes"]}
    assert named <= set(COMPOSE["volumes"])


def test_every_long_running_service_has_a_health_check() -> None:
    for service in LONG_RUNNING:
        test = SERVICES[service]["healthcheck"]["test"]
        assert test and test[0] in ("CMD", "CMD-SHELL"), service


def test_nothing_starts_before_what_it_needs() -> None:
    def conditions(service: str) -> dict[str, str]:
        return {name: spec["condition"] for name, spec in SERVICES[service]["depends_on"].items()}

    assert conditions("migrate") == {"postgres": "service_healthy"}
    for service in ("web", "worker", "beat"):
        assert conditions(service) == {
            "redis": "service_healthy",
            "postgres": "service_healthy",
            "migrate": "service_completed_successfully",
        }, service
    assert conditions("flower") == {"redis": "service_healthy"}
    assert SERVICES["migrate"]["command"] == ["stkpush", "db", "upgrade"]
    assert SERVICES["migrate"]["restart"] == "no"


def test_flower_needs_basic_auth_and_is_read_only() -> None:
    command = command_text("flower")
    assert "--read-only=true" in command
    assert re.search(r'--basic-auth="\$\$\{FLOWER_BASIC_AUTH:\?', command), "credentials from .env, required"
    compose_text = (REPO / "docker-compose.yml").read_text()
    assert "FLOWER_UNAUTHENTICATED_API" not in compose_text
    flower = procfile()["flower"]
    assert "--read-only=true" in flower and '--basic-auth="${FLOWER_BASIC_AUTH:?' in flower


def test_no_secret_is_written_in_the_compose_file() -> None:
    for spec in SERVICES.values():
        environment = spec.get("environment") or {}
        for name, value in environment.items():
            text = str(value)
            if name in SECRET_NAMES:
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", text), f"{name} must come from .env"
            password = re.search(r"://[^:/@]+:([^@]+)@", text)
            if password:
                assert password.group(1).startswith("${"), f"{name} holds a literal password"
    for service in APP_SERVICES:
        assert SERVICES[service]["env_file"] == [".env"], service


def test_compose_runs_the_same_commands_as_the_procfile() -> None:
    processes = procfile()
    assert f"-Q {QUEUES}" in processes["worker"] and f"-Q {QUEUES}" in command_text("worker")
    assert command_text("web").startswith("stkpush web --host 0.0.0.0")
    assert command_text("beat").startswith("celery -A worker beat")
    assert SERVICES["worker"]["stop_grace_period"] == "180s"  # the hard task time limit is 150 s


def test_dockerfile_installs_the_pinned_project_as_a_non_root_user() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install -c constraints.txt" in dockerfile
    assert "COPY migrations ./migrations" in dockerfile
    assert re.search(r"^USER (?!root)\S+", dockerfile, re.MULTILINE)


def test_env_example_names_every_required_setting_and_holds_no_secret() -> None:
    values: dict[str, str] = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    required = {name.upper() for name, info in Settings.model_fields.items() if info.is_required()}
    assert required <= set(values), required - set(values)
    for name in SECRET_NAMES:
        assert values.get(name) == "", f"{name} must be empty in the example"


def test_procfile_has_the_four_processes() -> None:
    processes = procfile()
    assert set(processes) == {"web", "worker", "beat", "flower"}
    assert processes["web"] == "stkpush web --host 0.0.0.0 --port ${PORT:-8000}"
    assert processes["worker"].startswith(f"celery -A worker worker -Q {QUEUES}")
    assert processes["beat"].startswith("celery -A worker beat")
    assert processes["flower"].startswith("celery -A worker flower")


@pytest.mark.parametrize("name", ["web", "worker", "beat", "flower"])
def test_every_procfile_command_resolves(name: str) -> None:
    # The program is on PATH (the venv's), and the command line parses: `--help` on the same program and
    # subcommand with the same leading arguments.
    argv = shlex.split(procfile()[name])
    program = shutil.which(argv[0], path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert program, f"{argv[0]} not found"
    head = argv[:4] if argv[0] == "celery" else argv[:2]
    env = {
        **clean_environ(),
        "UPESIPAY_BASE_URL": "http://127.0.0.1:9",
        "UPESIPAY_AUTH_TOKEN": "sbx_resolve_token",
        "UPESIPAY_CHANNEL_ID": "1",
        "CALLBACK_BASE_URL": "http://127.0.0.1:1",
        "CALLBACK_SECRET": "resolve-secret-0123456789",
        "REDIS_URL": "redis://127.0.0.1:1/0",
    }
    if head[-1] == "flower":
        # Flower's own options are Tornado options, which click's --help does not list: ask Tornado.
        from flower.options import options

        for option in re.findall(r"--([a-z][a-z-]+)=", procfile()[name]):
            assert option.replace("-", "_") in options, f"flower has no --{option}"
        return
    result = subprocess.run(
        [program, *head[1:], "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for option in re.findall(r"(--[a-z][a-z-]+)", procfile()[name]):
        assert option in result.stdout, f"{name}: {option} is not an option of {' '.join(head)}"


def test_the_procfile_shell_refuses_flower_without_credentials() -> None:
    env = {k: v for k, v in clean_environ().items() if k != "FLOWER_BASIC_AUTH"}
    line = procfile()["flower"].replace("celery ", f"{sys.executable} -c 'raise SystemExit(0)' ", 1)
    result = subprocess.run(["sh", "-c", line], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "set FLOWER_BASIC_AUTH" in result.stderr


def test_every_setting_is_documented_and_in_the_example() -> None:
    operations = (REPO / "docs" / "operations.md").read_text()
    example = (REPO / ".env.example").read_text()
    for name in Settings.model_fields:
        variable = name.upper()
        assert f"`{variable}`" in operations, f"{variable} is missing from docs/operations.md"
        if not variable.startswith("FAULT_"):  # reliability-test fail-points stay out of the example
            assert re.search(rf"^#? ?{variable}=", example, re.MULTILINE), (
                f"{variable} is missing from .env.example"
            )

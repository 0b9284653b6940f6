"""The serving images and the compose file, read (no Docker engine runs where the tests run)."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import Settings

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def test_images_run_as_an_unprivileged_user():
    for image in ("Dockerfile.cpu", "Dockerfile.cuda"):
        users = re.findall(r"^USER (\S+)$", (DOCKER / image).read_text(), flags=re.MULTILINE)
        assert users and users[-1] not in ("root", "0"), image


def test_the_build_context_leaves_out_the_venv_runs_and_results():
    ignored = (DOCKER.parent / ".dockerignore").read_text().split()
    assert {".venv", "runs", "bench/results", ".git"} <= set(ignored)


def test_compose_needs_an_admin_token_and_nginx_publishes_neither_admin_nor_metrics():
    compose = (DOCKER / "compose.yaml").read_text()
    assert "${PRUNEREC_ADMIN_TOKEN:?" in compose and "change-me" not in compose
    assert re.search(r"replicas:\s*2", compose) and "prometheus" in compose
    nginx = (DOCKER / "nginx.conf").read_text()
    proxied = re.findall(r"location\s+=?\s*(\S+)\s*\{\s*proxy_pass", nginx)
    assert proxied and not any(p.startswith(("/admin", "/metrics")) or p == "/" for p in proxied)
    assert re.search(r"location / \{ return 404; \}", nginx)
    timeout = int(re.search(r"proxy_read_timeout (\d+)s;", nginx).group(1))
    assert timeout * 1000 > Settings().max_deadline_ms  # nginx never cuts off a request the service still answers


def test_image_tags_are_pinned():
    for image in ("Dockerfile.cpu", "Dockerfile.cuda"):
        base = re.search(r"^FROM (\S+)", (DOCKER / image).read_text(), flags=re.MULTILINE).group(1)
        assert re.search(r":\d+\.\d+\.\d+", base), base
    for tag in re.findall(r"image: (\S+)", (DOCKER / "compose.yaml").read_text()):
        assert re.search(r":v?\d+\.\d+\.\d+", tag), tag

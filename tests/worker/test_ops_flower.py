"""Flower sees the broker as the workers do: `celery -A worker.ops.flower:app flower` against the real Redis,
with a key prefix, reports the messages waiting in our queues. (Flower is not a dependency of the project; the
Flower test runs where it is installed.)"""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from intake_support import RedisSpace, redis_space, wait_for  # noqa: F401  (fixture)
from orthanc import free_port

import worker.ops.flower as flower_app
from worker.queue.celery_app import QUEUES, TASK_RUN_JOB

REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, space: RedisSpace) -> dict[str, str]:
    return {"CCFNET_BROKER_URL": space.url, "CCFNET_REDIS_KEY_PREFIX": space.prefix,
            "CCFNET_DATA_DIR": str(tmp_path / "var")}


def test_the_app_is_built_from_the_settings_on_first_access_only(
    tmp_path: Path, redis_space: RedisSpace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(vars(flower_app), "app", raising=False)
    for name, value in _env(tmp_path, redis_space).items():
        monkeypatch.setenv(name, value)
    assert "app" not in vars(flower_app)  # importing built nothing
    app: Any = flower_app.app
    monkeypatch.delitem(vars(flower_app), "app")
    assert app.conf.broker_transport_options["global_keyprefix"] == redis_space.prefix
    assert {q.name for q in app.conf.task_queues} == set(QUEUES)
    with pytest.raises(AttributeError):
        flower_app.nothing  # noqa: B018


@pytest.mark.services
@pytest.mark.skipif(importlib.util.find_spec("flower") is None, reason="Flower is not installed")
def test_flower_reports_the_messages_waiting_in_our_queues(tmp_path: Path, redis_space: RedisSpace) -> None:
    env = {**os.environ, **_env(tmp_path, redis_space), "FLOWER_UNAUTHENTICATED_API": "1"}
    publish = (f"from worker.ops.flower import app\n"
               f"for i in range(3): app.send_task({TASK_RUN_JOB!r}, args=[i], queue='batch')\n"
               f"app.send_task({TASK_RUN_JOB!r}, args=[9], queue='inference')\n")
    subprocess.run([sys.executable, "-c", publish], env=env, cwd=REPO, check=True, timeout=60)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.ops.flower:app", "flower", f"--port={port}",
         "--address=127.0.0.1"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        def lengths() -> dict[str, int] | None:
            if process.poll() is not None:
                raise AssertionError(process.stderr.read().decode()[-2000:] if process.stderr else "flower exited")
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/api/queues/length", timeout=5).json()
            except httpx.HTTPError:
                return None
            return {q["name"]: q["messages"] for q in body["active_queues"]}

        assert wait_for(lengths, timeout=40, interval=0.5) == {"inference": 1, "export": 0, "batch": 3}
    finally:
        process.terminate()
        process.wait(10)

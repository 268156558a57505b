"""Start-up refuses what cannot run, in one line naming the setting: `ccfnet worker` with a model device this
host does not have, `ccfnet serve` with a TLS file that is not there; `ccfnet config check` reports both as
FAIL. A worker says which checkpoint runs on which device, resolved as inference resolves it. Each command runs
as its own process, as systemd starts it (exit code and stderr as the unit sees them)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME, read_card
from ccfnet_core.inference import Predictor
from worker import core_bridge
from worker.cli import app

CCFNET = [sys.executable, "-c", "from worker.cli import main; main()"]
REPO = Path(__file__).resolve().parents[2]
MODEL = MODELS_DIR / PHANTOM_MODEL_NAME
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA: the failing case cannot happen")


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """Only these CCFNET_ settings (an embedded SQLite and on-disk broker under tmp_path unless overridden)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCFNET_")}
    env.update({"CCFNET_DATA_DIR": str(tmp_path / "var"), "CCFNET_MODEL_PATH": str(MODEL),
                "PYTHONPATH": str(REPO)})
    env.update({f"CCFNET_{name.upper()}": value for name, value in settings.items()})
    return env


def _run(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CCFNET, *args], env=_env(tmp_path, **settings), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


@contextmanager
def _running(tmp_path: Path, *args: str, **settings: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = tmp_path / "process.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*CCFNET, *args], env=_env(tmp_path, **settings), cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_line(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in log.read_text(errors="replace").splitlines() if text in line]
        if found:
            return found[0]
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


def _checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: str) -> dict[str, dict[str, object]]:
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("CCFNET_")]:
        monkeypatch.delenv(key)
    for key, value in _env(tmp_path, **settings).items():
        if key.startswith("CCFNET_"):
            monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["config", "check", "--json"])
    return {c["name"]: c for c in json.loads(result.stdout)}


# --- the model device ------------------------------------------------------------------------------------


def test_auto_resolves_to_the_device_the_predictor_uses() -> None:
    expected = Predictor.from_checkpoint(MODEL, "auto").device.type
    assert core_bridge.resolve_device("auto") == expected == ("cuda" if torch.cuda.is_available() else "cpu")
    assert core_bridge.resolve_device("cpu") == "cpu"


def test_the_worker_says_which_model_runs_on_which_device(tmp_path: Path) -> None:
    with _running(tmp_path, "worker", "-Q", "inference,batch", "--pool", "solo", model_device="auto") as (proc, log):
        line = _wait_for_line(proc, log, "model ")
    assert line.endswith(f"model {MODEL} on {core_bridge.resolve_device('auto')}"), line


@NO_CUDA
def test_a_worker_told_cuda_without_cuda_exits_2_naming_the_setting(tmp_path: Path) -> None:
    done = _run(tmp_path, "worker", "-Q", "inference,batch", model_device="cuda")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"invalid configuration: CCFNET_MODEL_DEVICE=cuda: torch {torch.__version__} (built without CUDA) "
        "sees no CUDA device"
    ]


@NO_CUDA
def test_an_export_worker_does_not_need_the_model_device(tmp_path: Path) -> None:
    """The export unit hides the GPU (PrivateDevices=yes) and reads the same env file: it must still start."""
    with _running(tmp_path, "worker", "-Q", "export", "--pool", "solo", model_device="cuda") as (proc, log):
        _wait_for_line(proc, log, " ready.")
        assert "CCFNET_MODEL_DEVICE" not in log.read_text()


@NO_CUDA
def test_config_check_fails_the_model_for_cuda_without_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _checks(tmp_path, monkeypatch, model_device="cuda")["model"]
    assert not model["ok"] and "CCFNET_MODEL_DEVICE=cuda" in str(model["detail"]), model
    model = _checks(tmp_path, monkeypatch, model_device="auto")["model"]
    card = read_card(MODEL)
    assert model["ok"], model
    assert model["detail"] == (
        f"{card.display_name} {card.version}@{card.weights_sha256[:12]}, weights sha256 {card.weights_sha256} "
        f"({MODEL}) on {core_bridge.resolve_device('auto')}"
    )


def test_config_check_names_the_checkpoint_and_says_a_leftover_model_version_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _checks(tmp_path, monkeypatch, model_version="site-model-7")["model"]
    card = read_card(MODEL)
    assert model["ok"] and card.weights_sha256 in str(model["detail"]), model
    assert "CCFNET_MODEL_VERSION is set and ignored" in str(model["detail"])
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    model = _checks(tmp_path, monkeypatch, model_path=str(broken))["model"]
    assert not model["ok"] and str(broken) in str(model["detail"]), model


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_worker_metrics_listen_on_http_bind_and_a_second_worker_on_the_port_exits_2(tmp_path: Path) -> None:
    """Two workers reading one env file with CCFNET_WORKER_METRICS_PORT: the second stops in one line, exit 2."""
    port = str(_free_port())
    with _running(tmp_path, "worker", "-Q", "export", "--pool", "solo", worker_metrics_port=port) as (proc, log):
        assert _wait_for_line(proc, log, "worker metrics on").endswith(f"worker metrics on 127.0.0.1:{port}")
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200
        second = _run(tmp_path, "worker", "-Q", "export", "--pool", "solo", worker_metrics_port=port,
                      log_level="WARNING")
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr.strip().splitlines() == [
        f"invalid configuration: CCFNET_WORKER_METRICS_PORT={port}: cannot listen on 127.0.0.1: "
        "Address already in use"
    ]


# --- the listener's TLS files ----------------------------------------------------------------------------


def _tls_files(tmp_path: Path) -> dict[str, str]:
    """Settings naming a certificate and CA that exist (content is not read by the check) and a key that does not."""
    (tmp_path / "server.crt").write_text("certificate\n")
    (tmp_path / "ca.crt").write_text("ca\n")
    return {"tls_cert": str(tmp_path / "server.crt"), "tls_key": str(tmp_path / "missing" / "server.key"),
            "tls_ca": str(tmp_path / "ca.crt")}


def test_serve_with_a_missing_tls_file_exits_2_naming_the_setting_and_path(tmp_path: Path) -> None:
    settings = _tls_files(tmp_path)
    done = _run(tmp_path, "serve", **settings)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"invalid configuration: CCFNET_TLS_KEY={settings['tls_key']}: no such file"
    ]


def test_config_check_fails_tls_for_a_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _tls_files(tmp_path)
    tls = _checks(tmp_path, monkeypatch, **settings)["tls"]
    assert not tls["ok"] and tls["detail"] == f"CCFNET_TLS_KEY={settings['tls_key']}: no such file", tls
    (tmp_path / "missing").mkdir()
    Path(settings["tls_key"]).write_text("key\n")
    assert _checks(tmp_path, monkeypatch, **settings)["tls"]["ok"]

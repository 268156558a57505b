"""`ccfnet demo` end to end, as `make demo` runs it: a separate process, the embedded default, exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

pytestmark = pytest.mark.slow
CCFNET = Path(sys.executable).with_name("ccfnet")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Whatever this shell's CCFNET_* variables say, the demo must not reach outside its folder.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCFNET_")}
    env["CCFNET_DESTINATIONS"] = '[{"kind": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", '
    env["CCFNET_DESTINATIONS"] += '"port": 1}]'
    env["CCFNET_DATABASE_URL"] = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    return subprocess.run(
        [str(CCFNET), "demo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )


def test_demo_sends_a_phantom_study_and_prints_findings_and_result_objects(tmp_path: Path) -> None:
    if not CCFNET.exists():
        pytest.skip("the ccfnet entry point is not installed beside this Python")
    done = _run("--data-dir", str(tmp_path / "demo"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "waiting 2 s of quiet" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith(": succeeded")
    table = lines[2:13]
    assert [line.split()[0] for line in table] == [
        "L1", "L2", "L3", "L4", "L5", "T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"
    ]
    paths = [Path(line.split()[1]) for line in lines[lines.index("result objects:") + 1 :]]
    assert sorted(line.split()[0] for line in lines[lines.index("result objects:") + 1 :]) == ["gsps", "sc", "sr"]
    for path in paths:
        assert path.is_relative_to(tmp_path / "demo") and pydicom.dcmread(path).Modality in {"SR", "PR", "MR"}

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    refused = _run("--data-dir", str(tmp_path / "mine"), cwd=tmp_path)
    assert refused.returncode == 2 and "was not made by `ccfnet demo`" in refused.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

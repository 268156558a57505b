"""The short soak (bench/soak.py with 8 studies): every fault injected once while studies flow through 2 listeners
and 2 workers as separate processes, against a PostgreSQL cluster, a Redis server and an Orthanc of its own.
The full run (50 studies, > 3,000 instances) is `python bench/soak.py`; its table is in docs/reliability.md."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
from orthanc import ORTHANC

pytestmark = [pytest.mark.slow, pytest.mark.services]

SOAK_PATH = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def _load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", SOAK_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _missing_tools() -> list[str]:
    missing = [tool for tool in ("redis-server",) if shutil.which(tool) is None]
    if ORTHANC is None:
        missing.append("Orthanc")
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) and shutil.which("initdb") is None:
        missing.append("initdb")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        missing.append("runuser")
    return missing


def test_short_soak_loses_nothing_and_delivers_each_study_once(tmp_path: Path) -> None:
    if missing := _missing_tools():
        pytest.skip(f"the soak needs {', '.join(missing)}")
    soak = _load_soak()
    config = soak.SoakConfig(studies=8, sagittal_slices=9, quiet_seconds=15.0, outage_seconds=10.0,
                             timeout_seconds=600.0, seed=7, work=tmp_path / "soak")
    result = soak.Soak(config).run()
    print(result.table())
    numbers = result.numbers
    assert [f.name for f in result.faults if f.at is None] == [], "every fault must have been injected"
    assert numbers["acknowledged"] == numbers["total"], "every instance is eventually acknowledged"
    assert numbers["lost_spool"] == 0 and numbers["lost_db"] == 0, "an acknowledged instance was lost"
    assert numbers["studies_with_results"] == config.studies
    assert numbers["duplicates"] == 0 and numbers["dead"] == 0
    assert result.problems == []

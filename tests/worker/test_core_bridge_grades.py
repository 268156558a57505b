"""What the bridge hands the worker of the readout (issue 26): the stated grade, its word, the calibrated probability
read against the card's operating points, the Schmorl's node flag and the level warning."""

from __future__ import annotations

from pathlib import Path

from ccfnet_core.checkpoint import read_card
from ccfnet_core.phantom import render_study, study_generator
from ccfnet_core.readout import LEVEL_WARNING, Readout
from ccfnet_core.structures import StructureType
from worker import core_bridge

GRADE_WORDS = {"v1": "normal", "v2": "bulge", "v3": "protrusion", "v4": "extrusion", "abnormal": "abnormal"}


def _study_files(tmp_path: Path, seed: int) -> list[Path]:
    datasets, _ = render_study(study_generator(seed, 0), 0)
    paths = []
    for i, ds in enumerate(datasets):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_the_shipped_model_states_grades_and_reads_its_cards_operating_points(tmp_path: Path) -> None:
    model = core_bridge.default_model_path()
    readout = Readout.from_dict(read_card(model).readout)
    assert readout.grade_rule is not None and readout.level_check is not None  # the shipped card carries one
    analysis = core_bridge.analyse_files(_study_files(tmp_path, seed=11), model, "cpu")
    assert analysis.level_warning in (None, LEVEL_WARNING)
    for s in analysis.structures:
        assert 0.0 <= s.probability <= 1.0
        called = s.probability >= readout.threshold(StructureType(s.kind))
        if s.kind == "vertebra":
            assert s.grade_label == s.label == ("v2" if called else "v1")
            assert s.grade == ("degeneration" if called else "normal")
            assert s.grade_share is None and not s.schmorl_node
        else:
            assert s.grade == GRADE_WORDS[s.grade_label]
            assert (s.grade_label != "v1") == called  # the card's threshold, not 0.5
            assert s.label in {"v1", "v2", "v3", "v4", "v5"} and s.diagnosis
            if s.grade_label in ("v1", "abnormal"):
                assert s.grade_share is None
            assert s.schmorl_node == (s.label == "v5")

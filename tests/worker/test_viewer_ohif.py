"""A radiologist's view, for real: Orthanc sends a phantom study to the service (embedded, default settings plus
the segmentation), the results go back to Orthanc, and the pinned OHIF release opens the study over Orthanc's
DICOMweb in headless Chromium, configured as a site would (OHIF's defaults for tracking and prompts). The SR must
first show, in OHIF's SR view, each level's label and numbers with no code values; then, tracked, 11 labelled
arrows on the points it states whose text boxes carry the labels in words and do not overlap; the SEG must load
as 11 named segments; the key image as a still. Screenshots go to test-artifacts/ohif/ (seg-segments.png, the
labelled arrows with the SEG, is docs/images/ohif-sr-points-and-seg.png)."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from intake_support import CALLED_AE, make_settings, wait_for
from ohif import CHROMIUM, OHIF_DIST, OhifServer, app_config, browser
from orthanc import ORTHANC, ORTHANC_AE, Orthanc, free_port, has_dicomweb
from results_fixtures import ARTIFACTS

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME
from ccfnet_core.phantom import render_study, study_generator
from worker.db import repository as repo
from worker.results import STRUCTURES
from worker.service import EmbeddedService

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(ORTHANC is None or not has_dicomweb(), reason="Orthanc with its DICOMweb plugin is needed"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"),
    pytest.mark.skipif(not (OHIF_DIST / "index.html").is_file(), reason=f"no OHIF dist at {OHIF_DIST} (make ohif)"),
]
MODEL = MODELS_DIR / PHANTOM_MODEL_NAME
RESULT_KINDS = ["gsps", "sc", "seg", "sr"]
SHOTS = ARTIFACTS / "ohif"
LABEL = re.compile(r"^(?P<level>[LT]\d+(-[LS]\d+)?) (?P<kind>vertebra|disc): (?P<finding>[A-Za-z' ]+), (?P<pct>\d+) %$")
RAW_CODE = re.compile(r"\{|\b\d{6,}\b|CCF\d{4}|UCUM")

# OHIF's own state, read from the page: tracked measurements with the image point cornerstone holds for each.
MEASUREMENTS_JS = """(() => {
  const cs = window.cornerstone, tools = window.cornerstoneTools;
  return window.services.measurementService.getMeasurements().map(m => {
    const annotation = tools.annotation.state.getAnnotation(m.uid);
    const world = annotation.data.handles.points[0];
    const image = cs.utilities.worldToImageCoords(annotation.metadata.referencedImageId, world);
    return {uid: m.uid, label: m.label, tool: m.toolName, image: [image[0], image[1]],
            sop: m.SOPInstanceUID};
  });
})()"""
# The text boxes drawn in the viewport's SVG annotation layer: their lines and screen rectangles.
TEXT_BOXES_JS = """(() => [...document.querySelectorAll('.viewport-element g[data-annotation-uid] text')].map(t => {
  const r = t.getBoundingClientRect();
  return {uid: t.closest('g[data-annotation-uid]').getAttribute('data-annotation-uid'), text: t.textContent,
          lines: [...t.querySelectorAll('tspan')].map(s => s.textContent),
          left: r.left, top: r.top, right: r.right, bottom: r.bottom};
}))()"""
# OHIF's prompt "Do you want to continue tracking measurements / open this segmentation?": answer Yes.
YES = "document.querySelector('[data-cy=\"yes-hydrate-btn\"]')"


def _show(kind: str) -> str:
    """JS: put the first display set of a modality in the active viewport; its UID."""
    return f"""(() => {{
      const s = window.services;
      const ds = s.displaySetService.getActiveDisplaySets().find(d => {kind});
      window.commandsManager.runCommand('setDisplaySetsForViewports', {{viewportsToUpdate: [
        {{viewportId: s.viewportGridService.getActiveViewportId(),
          displaySetInstanceUIDs: [ds.displaySetInstanceUID]}}]}});
      return ds.displaySetInstanceUID;
    }})()"""


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc", free_port(), free_port(), CALLED_AE, free_port())
    pacs.start()
    yield pacs
    pacs.stop()


def _processed_study(tmp_path: Path, pacs: Orthanc) -> tuple[str, dict[str, Path]]:
    """Orthanc -> the service -> results back in Orthanc; the study UID and our result files by kind."""
    datasets, truth = render_study(study_generator(41, 0), 0)
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        pacs.upload(buffer.getvalue())
    settings = make_settings(
        tmp_path / "var", port=pacs.our_port, model_path=MODEL, study_quiet_seconds=1.0,
        include_segmentation=True,
        destinations=[{"kind": "dicom", "name": "pacs", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                       "port": pacs.dicom_port}],
    )
    with EmbeddedService(settings) as svc:
        pacs.send_to_us([pacs.get("/studies")[0]])
        assert svc.sessions is not None

        def delivered() -> dict[str, Path] | None:
            with svc.sessions() as session:  # type: ignore[misc]
                jobs = list(repo.jobs_for_study(session, truth.study_uid))
                exports = [e for job in jobs for e in repo.exports_for_job(session, job.id)]
                if len(exports) < len(RESULT_KINDS) or any(e.state != "delivered" for e in exports):
                    return None
                objects = [o for job in jobs for o in repo.result_objects_for_job(session, job.id)]
                return {o.kind: settings.data_dir / "results" / o.path for o in objects}

        results: dict[str, Path] = wait_for(delivered, timeout=180, interval=0.5)
    assert sorted(results) == RESULT_KINDS
    return truth.study_uid, results


def _sr_groups(path: Path) -> dict[str, dict[str, Any]]:
    """Level -> what the SR states for it: tracking UID, point (the first NUM's INFERRED FROM SCOORD), label
    (the Comment) and the two percentages."""
    sr = pydicom.dcmread(path)
    groups = {}
    for group in sr.ContentSequence[-1].ContentSequence:
        items = {item.ConceptNameCodeSequence[0].CodeValue: item for item in group.ContentSequence}
        nums = [item for item in group.ContentSequence if item.ValueType == "NUM"]
        (scoord,) = [item for item in nums[0].ContentSequence if item.ValueType == "SCOORD"]
        groups[items["112039"].TextValue.rsplit(":", 1)[-1]] = {
            "uid": items["112040"].UID,
            "point": (float(scoord.GraphicData[0]), float(scoord.GraphicData[1])),
            "label": items["121106"].TextValue,
            "numbers": [(num.ConceptNameCodeSequence[0].CodeMeaning, float(num.MeasuredValueSequence[0].NumericValue))
                        for num in nums],
        }
    return groups


def _overlaps(boxes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    pairs = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] and b["top"] < a["bottom"]:
                pairs.append((a["text"], b["text"]))
    return pairs


def test_ohif_opens_the_results_as_tracked_measurements_named_segments_and_a_still_key_image(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    study_uid, results = _processed_study(tmp_path, orthanc)
    stated = _sr_groups(results["sr"])
    assert sorted(stated) == sorted(STRUCTURES)
    with OhifServer(OHIF_DIST, orthanc.url, app_config()) as server, browser(tmp_path / "chromium") as page:
        try:
            _check_viewer(page, server, study_uid, stated)
        except BaseException:
            page.screenshot(SHOTS / "failure.png")
            (SHOTS / "failure-console.txt").write_text("\n".join(page.console))
            raise


def _wait_for_boxes(page: Any, uids: set[str], timeout: float) -> list[dict[str, Any]]:
    """The text boxes of the given annotations once all of them are drawn and two reads 1 s apart agree."""
    deadline = time.monotonic() + timeout
    previous: list[dict[str, Any]] = []
    while True:
        boxes = sorted((box for box in page.evaluate(TEXT_BOXES_JS) if box["uid"] in uids), key=lambda b: b["uid"])
        if len({box["uid"] for box in boxes}) == len(uids) and boxes == previous:
            return boxes
        if time.monotonic() > deadline:
            raise AssertionError(f"within {timeout} s OHIF drew no steady text box for each of {len(uids)}: {boxes}")
        previous = boxes
        time.sleep(1.0)


def _check_viewer(page: Any, server: OhifServer, study_uid: str, stated: dict[str, dict[str, Any]]) -> None:
    page.open(f"{server.url}/app-config.js")
    page.evaluate("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); true")
    page.open(f"{server.url}/viewer?StudyInstanceUIDs={study_uid}")
    page.wait_for("window.services && window.services.displaySetService.getActiveDisplaySets()"
                  ".filter(d => ['SR', 'SEG'].includes(d.Modality)).length === 2", timeout=120)
    # The hung image is on screen before the SR replaces it (as a reader would click it).
    page.wait_for("""(() => { const s = window.services;
      const vp = s.cornerstoneViewportService.getCornerstoneViewport(s.viewportGridService.getActiveViewportId());
      return !!(vp && vp.getCurrentImageId && vp.getCurrentImageId()); })()""", timeout=90)

    # The SR as OHIF opens it by default: its SR view (DICOMSRDisplayTool) draws each group's point with the
    # Comment and the numbers, and asks whether to track the measurements.
    sr_uids = {group["uid"] for group in stated.values()}
    page.evaluate(_show("d.Modality === 'SR'"))
    page.wait_for(f"{YES} !== null", timeout=90)
    before = _wait_for_boxes(page, sr_uids, timeout=60)
    page.screenshot(SHOTS / "sr-view-before-tracking.png")
    by_uid = {group["uid"]: group for group in stated.values()}
    for box in before:
        group = by_uid[box["uid"]]
        # What OHIF 3.13 prints: the Comment as "<text>: " (it appends ": " to every line), then each number
        # to 2 decimals with its unit's code value; no finding-site code (the group has no top-level SCOORD).
        assert box["lines"] == [f"{group['label']}: "] + [f"{name}: {value:.2f} %" for name, value
                                                             in group["numbers"]], box
        assert RAW_CODE.search(box["text"]) is None, box
    (SHOTS / "sr-view-before-tracking.json").write_text(json.dumps({"boxes": before,
                                                                     "overlaps": _overlaps(before)}, indent=1))

    # Yes: OHIF tracks the 11 groups as labelled arrows on the analysed slice.
    page.evaluate(f"{YES}.click(); true")
    page.wait_for("window.services.measurementService.getMeasurements().length >= 11", timeout=90)
    measurements = page.evaluate(MEASUREMENTS_JS)
    assert len(measurements) == 11, json.dumps(measurements)
    assert {m["tool"] for m in measurements} == {"ArrowAnnotate"}
    by_level = {}
    for measurement in measurements:
        label = measurement["label"] or ""
        match = LABEL.match(label)
        assert match is not None and RAW_CODE.search(label) is None, label
        by_level[match["level"]] = measurement
    assert sorted(by_level) == sorted(STRUCTURES)
    for level, measurement in by_level.items():
        assert measurement["label"] == stated[level]["label"]
        dx = measurement["image"][0] - stated[level]["point"][0]
        dy = measurement["image"][1] - stated[level]["point"][1]
        assert (dx * dx + dy * dy) ** 0.5 <= 1.0, (level, measurement["image"], stated[level]["point"])
    # On the image: one text box per arrow, its text the label (level and finding in words, the percent),
    # and no two boxes cover each other.
    boxes = _wait_for_boxes(page, {m["uid"] for m in measurements}, timeout=60)
    page.screenshot(SHOTS / "sr-tracked-measurements.png")
    label_of = {m["uid"]: m["label"] for m in measurements}
    for box in boxes:
        assert box["lines"] == [label_of[box["uid"]]], box
        assert box["right"] - box["left"] > 0 and box["bottom"] - box["top"] > 0, box
    assert _overlaps(boxes) == [], boxes

    # The SEG: 11 segments, each named after its structure (Yes to OHIF's "open this segmentation?").
    page.evaluate(_show("d.Modality === 'SEG'"))
    page.wait_for(f"{YES} !== null && ({YES}.click(), true)", timeout=90)
    segments = page.wait_for("""(() => {
      const all = window.services.segmentationService.getSegmentations();
      const segs = all.flatMap(s => Object.values(s.segments || {}).filter(Boolean).map(x => x.label));
      return segs.length >= 11 ? segs : null; })()""", timeout=90)
    page.screenshot(SHOTS / "seg-segments.png")
    assert sorted(segments) == sorted(STRUCTURES) or all(
        any(level in label for label in segments) for level in STRUCTURES), segments

    # The key image: one still frame, no cine playback.
    key = page.evaluate(_show("d.SeriesDescription === 'CCF-Net Key Image'"))
    page.wait_for(f"""(() => {{ const ds = window.services.displaySetService.getDisplaySetByUID('{key}');
      const vp = window.services.cornerstoneViewportService.getCornerstoneViewport(
        window.services.viewportGridService.getActiveViewportId());
      return vp && vp.getCurrentImageId && vp.getCurrentImageId() !== undefined; }})()""", timeout=60)
    still = page.evaluate(f"""(() => {{
      const ds = window.services.displaySetService.getDisplaySetByUID('{key}');
      const cine = window.services.cineService.getState();
      const playing = Object.values(cine.cines || {{}}).some(c => c && c.isPlaying);
      return {{frames: ds.numImageFrames ?? ds.images?.length, multiframe: !!ds.isMultiFrame,
               dynamic: !!ds.isDynamicVolume, cineEnabled: !!cine.isCineEnabled, playing}}; }})()""")
    page.screenshot(SHOTS / "key-image.png")
    assert still == {"frames": 1, "multiframe": False, "dynamic": False, "cineEnabled": False,
                     "playing": False}, still

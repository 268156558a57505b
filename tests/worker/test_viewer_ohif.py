"""A radiologist's view, for real: Orthanc sends a phantom study to the service (embedded, default settings plus
the segmentation), the results go back to Orthanc, and the pinned OHIF release opens the study over Orthanc's
DICOMweb in headless Chromium. The SR must load as 11 tracked measurements on the points it states, with
labels in words whose on-image text boxes do not overlap; the SEG as 11 named segments; the key image as a
still. Screenshots go to test-artifacts/ohif/."""

from __future__ import annotations

import io
import json
import re
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
# The screen rectangle of each annotation's text box in the viewport's SVG layer.
TEXT_BOXES_JS = """(() => [...document.querySelectorAll('g[data-annotation-uid] text')].map(t => {
  const r = t.getBoundingClientRect();
  return {uid: t.closest('g[data-annotation-uid]').getAttribute('data-annotation-uid'), text: t.textContent,
          left: r.left, top: r.top, right: r.right, bottom: r.bottom};
}))()"""


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


def _sr_points(path: Path) -> dict[str, tuple[float, float]]:
    """Level -> the point the SR states (each TID 1410 group's Image Region)."""
    sr = pydicom.dcmread(path)
    points = {}
    for group in sr.ContentSequence[-1].ContentSequence:
        items = list(group.ContentSequence)
        scoords = [item for item in items if item.ValueType == "SCOORD"]
        if scoords:
            (level,) = [item.TextValue for item in items if item.ConceptNameCodeSequence[0].CodeValue == "112039"]
            points[level] = (float(scoords[0].GraphicData[0]), float(scoords[0].GraphicData[1]))
    return points


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
    stated = _sr_points(results["sr"])
    assert sorted(stated) == sorted(STRUCTURES)
    with OhifServer(OHIF_DIST, orthanc.url, app_config()) as server, browser(tmp_path / "chromium") as page:
        try:
            _check_viewer(page, server, study_uid, stated)
        except BaseException:
            page.screenshot(SHOTS / "failure.png")
            (SHOTS / "failure-console.txt").write_text("\n".join(page.console))
            raise


def _check_viewer(page: Any, server: OhifServer, study_uid: str, stated: dict[str, tuple[float, float]]) -> None:
    if True:
        page.open(f"{server.url}/app-config.js")
        page.evaluate("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); true")
        page.open(f"{server.url}/viewer?StudyInstanceUIDs={study_uid}")
        page.wait_for("window.services && window.services.displaySetService.getActiveDisplaySets()"
                      ".filter(d => ['SR', 'SEG'].includes(d.Modality)).length === 2", timeout=120)
        page.wait_for("document.querySelector('.cornerstone-canvas') !== null", timeout=60)

        # The SR: OHIF hydrates it into tracked measurements on the analysed slice.
        page.evaluate(_show("d.Modality === 'SR'"))
        page.wait_for("window.services.measurementService.getMeasurements().length >= 11"
                      " && document.querySelectorAll('.viewport-element svg circle').length >= 11", timeout=90)
        measurements = page.evaluate(MEASUREMENTS_JS)
        boxes = page.evaluate(TEXT_BOXES_JS)
        page.screenshot(SHOTS / "sr-tracked-measurements.png")
        assert len(measurements) == 11, json.dumps(measurements)
        assert {m["tool"] for m in measurements} == {"Probe"}
        by_level = {}
        for measurement in measurements:
            label = measurement["label"] or ""
            match = LABEL.match(label)
            assert match is not None and RAW_CODE.search(label) is None, label
            by_level[match["level"]] = measurement
        assert sorted(by_level) == sorted(STRUCTURES)
        for level, measurement in by_level.items():
            dx = measurement["image"][0] - stated[level][0]
            dy = measurement["image"][1] - stated[level][1]
            assert (dx * dx + dy * dy) ** 0.5 <= 1.0, (level, measurement["image"], stated[level])
        # OHIF 3.13 draws a Probe's text (image index and pixel value, not the label) only once it has sampled
        # the pixel; whatever text boxes it draws for our points must not cover each other.
        ours = [box for box in boxes if box["uid"] in {m["uid"] for m in measurements}]
        assert _overlaps(ours) == [], ours

        # The SEG: 11 segments, each named after its structure.
        page.evaluate(_show("d.Modality === 'SEG'"))
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

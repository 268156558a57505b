"""Readers that turn the two on-disk layouts into `SliceSample`s (CCFNET.md, "The challenge's data layout").

- Challenge layout: one folder per study of `imageN.dcm` files plus an annotation JSON naming, per study, the
  annotated SOP instance and its 11 points. The input is that instance with its series neighbours.
- tianchi-slices: `annotations.json` + `images/*.npy`, one uint8 slice per study, no DICOM header; the slice
  is repeated into three channels and the spacing is the README's `pixel_spacing_estimate` convention.

Annotation conventions (both layouts): points absent from the annotation are NaN; an empty diagnosis value
gives an empty label set (point kept, no class target); an unknown structure name or label raises ValueError
naming the study and the structure; a structure given twice raises too.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ccfnet_core.sample import SliceSample, rescale_to_unit
from ccfnet_core.series_selection import (
    choose_slice,
    load_input_slices,
    neighbour_indices,
    ordered_slices,
    series_mean_intensity,
)
from ccfnet_core.structures import NUM_STRUCTURES, STRUCTURES, StructureType, parse_labels, structure_type

ANNOTATIONS_FILE: Final[str] = "annotations.json"
_NO_LABELS: Final[tuple[frozenset[str], ...]] = (frozenset(),) * NUM_STRUCTURES


def read_dataset(path: Path) -> list[SliceSample]:
    """Read either layout: a folder whose annotations.json entries carry "image" is tianchi-slices."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {path}")
    annotations = path / ANNOTATIONS_FILE
    if annotations.is_file():
        entries = _load_annotation_list(annotations)
        if entries and all(isinstance(entry, dict) and "image" in entry for entry in entries):
            return read_tianchi_slices(path)
    return read_challenge_folder(path)


def read_tianchi_slices(root: Path, include_flagged: bool = True) -> list[SliceSample]:
    """The single-slice layout: each uint8 slice /255, repeated to 3 channels; spacing (s, s) estimated.

    include_flagged=False drops the studies whose labels the README marks as suspect (keep them out of
    evaluation).
    """
    root = Path(root)
    annotation_path = root / ANNOTATIONS_FILE
    if not annotation_path.is_file():
        raise FileNotFoundError(f"tianchi-slices annotation file not found: {annotation_path}")
    samples = []
    for position, entry in enumerate(_load_annotation_list(annotation_path)):
        study = _study_uid(entry, annotation_path, position)
        flag = entry.get("flag")
        if flag and not include_flagged:
            continue
        image_path = root / str(_required(entry, "image", study, annotation_path))
        slice_2d = _load_npy(image_path)
        _check_size(entry, slice_2d.shape, study, image_path)
        is_byte = slice_2d.dtype == np.uint8
        unit = slice_2d.astype(np.float32) / 255.0 if is_byte else rescale_to_unit(slice_2d)
        spacing = _positive_float(entry.get("pixel_spacing_estimate"), "pixel_spacing_estimate", study)
        points, labels = parse_annotation_points(study, _annotated_points(entry, study, annotation_path))
        samples.append(
            SliceSample(
                study_id=study,
                image=np.repeat(unit[None], 3, axis=0),
                points=points,
                labels=labels,
                spacing_mm=(spacing, spacing),
                flag=str(flag) if flag else None,
                meta={"image": str(entry["image"]), "spacing_source": "pixel_spacing_estimate"},
            )
        )
    return samples


def read_challenge_folder(root: Path, annotation_json: Path | None = None) -> list[SliceSample]:
    """The challenge layout: one sample per annotated study: the annotated instance and its series neighbours.

    The annotation file defaults to `root/annotations.json`, else `root/../<rootname>_annotation.json` (as the
    challenge names them). A study's folder is the one named like its studyUid, else the one whose DICOM
    StudyInstanceUID equals it. The annotated slice is found by SOPInstanceUID (zIndex is ignored); its
    neighbours come from its series sorted along the slice normal (x for sagittal), edges repeated. A study
    with several annotated slices gives the first one.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"challenge folder not found: {root}")
    annotation_path = Path(annotation_json) if annotation_json is not None else find_annotation_file(root)
    if not annotation_path.is_file():
        raise FileNotFoundError(f"annotation file not found: {annotation_path}")
    folders = _StudyFolders(root)
    samples = []
    for position, entry in enumerate(_load_annotation_list(annotation_path)):
        study = _study_uid(entry, annotation_path, position)
        item = _first_annotated(entry, study, annotation_path)
        instance_uid = str(_required(item, "instanceUid", study, annotation_path))
        folder = folders.find(study)
        headers = read_headers(folder)
        target = next((ds for ds in headers if str(ds.get("SOPInstanceUID", "")) == instance_uid), None)
        if target is None:
            raise ValueError(f"study {study}: annotated instance {instance_uid} is not in {folder}")
        series_uid = str(target.get("SeriesInstanceUID", ""))
        series = [ds for ds in headers if str(ds.get("SeriesInstanceUID", "")) == series_uid]
        stack = [ds for ds, _ in ordered_slices(series)]
        centre = next(i for i, ds in enumerate(stack) if ds is target)
        chosen = [stack[i] for i in neighbour_indices(len(stack), centre)]
        image, spacing = load_input_slices(_with_pixels(chosen))
        points, labels = parse_annotation_points(study, _points_of(item, study, annotation_path))
        samples.append(
            SliceSample(
                study_id=study,
                image=image,
                points=points,
                labels=labels,
                spacing_mm=spacing,
                meta={
                    "folder": folder.name,
                    "series_uid": series_uid,
                    "sop_instance_uid": instance_uid,
                    "centre_index": str(centre),
                    "n_slices": str(len(stack)),
                },
            )
        )
    return samples


def read_dicom_study(folder: Path) -> SliceSample:
    """An unannotated study for prediction: choose_slice picks the input; points NaN, labels empty.

    Raises NoEligibleSeries (from choose_slice) when no series can give the input.
    """
    folder = Path(folder)
    return read_dicom_files(_dcm_files(folder), name=folder.name)


def read_dicom_files(paths: Sequence[Path], name: str = "") -> SliceSample:
    """Like `read_dicom_study`, over an explicit list of files (the worker's spool keeps one file per instance
    in series folders). Raises NoEligibleSeries when no series can give the input."""
    if not paths:
        raise FileNotFoundError("no DICOM files given")
    headers = [_read(Path(path), stop_before_pixels=True) for path in paths]
    folder = Path(name or Path(paths[0]).parent.name)
    series: dict[str, list[Dataset]] = {}
    for ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    choice = choose_slice(series, mean_intensity=mean_intensity_from_files)
    by_uid = {str(ds.get("SOPInstanceUID", "")): ds for ds in series[choice.series_uid]}
    chosen = [by_uid[uid] for uid in choice.sop_instance_uids]
    image, spacing = load_input_slices(_with_pixels(chosen), choice.frame_numbers)
    study = str(headers[0].get("StudyInstanceUID", "") or folder.name)
    return SliceSample(
        study_id=study,
        image=image,
        points=np.full((NUM_STRUCTURES, 2), np.nan),
        labels=_NO_LABELS,
        spacing_mm=spacing,
        meta={
            "folder": folder.name,
            "series_uid": choice.series_uid,
            "sop_instance_uid": choice.centre_sop_instance_uid,
            "centre_index": str(choice.centre_index),
            "n_slices": str(choice.n_slices),
            "reason": choice.reason,
        },
    )


def find_annotation_file(root: Path) -> Path:
    """`root/annotations.json`, else the challenge's sibling `<rootname>_annotation.json`."""
    candidates = [root / ANNOTATIONS_FILE, root.parent / f"{root.name}_annotation.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no annotation file for {root}; tried {tried}")


def read_headers(folder: Path) -> list[Dataset]:
    """Headers (no pixels) of every `*.dcm` file in a study folder, in file-name order.

    A file pydicom cannot parse raises ValueError naming it: silently skipping one could change the choice.
    """
    return [_read(path, stop_before_pixels=True) for path in _dcm_files(Path(folder))]


def _dcm_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"study folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    if not paths:
        raise FileNotFoundError(f"no .dcm files in {folder}")
    return paths


def mean_intensity_from_files(datasets: Sequence[Dataset]) -> float:
    """Brightness callback for headers read from files: re-reads each file with pixels (choose_slice)."""
    full = _with_pixels(datasets)
    value = series_mean_intensity(full)
    if value is None:
        names = ", ".join(str(getattr(ds, "filename", "?")) for ds in datasets)
        raise ValueError(f"no pixel data in {names}")
    return value


def parse_annotation_points(
    study: str, points: Iterable[Mapping[str, Any]]
) -> tuple[np.ndarray, tuple[frozenset[str], ...]]:
    """Challenge `point` entries -> (11, 2) float64 (x, y) with NaN where missing, and 11 label sets."""
    coords = np.full((NUM_STRUCTURES, 2), np.nan)
    labels: list[frozenset[str]] = [frozenset()] * NUM_STRUCTURES
    seen: set[int] = set()
    for point in points:
        tag = point.get("tag")
        if not isinstance(tag, Mapping):
            raise ValueError(f"study {study}: point without a tag: {point!r}")
        name = str(tag.get("identification", ""))
        if name not in STRUCTURES:
            raise ValueError(f"study {study}: unknown structure {name!r} (expected one of {STRUCTURES})")
        index = STRUCTURES.index(name)
        if index in seen:
            raise ValueError(f"study {study}: structure {name} is annotated twice")
        seen.add(index)
        coords[index] = _coord(point.get("coord"), study, name)
        value = _tag_value(tag, index)
        if value.strip():
            try:
                labels[index] = parse_labels(index, value)
            except ValueError as error:
                raise ValueError(f"study {study}: {error}") from error
    return coords, tuple(labels)


def _tag_value(tag: Mapping[str, Any], index: int) -> str:
    """The diagnosis under the key of the structure's type, else under the other key (tolerant reading)."""
    own = structure_type(index)
    other = StructureType.DISC if own is StructureType.VERTEBRA else StructureType.VERTEBRA
    for key in (own.value, other.value):
        value = tag.get(key)
        if value is not None:
            return str(value)
    return ""


def _coord(value: Any, study: str, name: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"study {study}: structure {name} has no usable coord [x, y]: {value!r}") from error
    if not (np.isfinite(x) and np.isfinite(y)):
        raise ValueError(f"study {study}: structure {name} has a non-finite coord {value!r}")
    return x, y


def _load_annotation_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
        raise ValueError(f"{path}: expected a JSON list of study objects")
    return data


def _study_uid(entry: Mapping[str, Any], path: Path, position: int) -> str:
    study = entry.get("studyUid")
    if not study:
        raise ValueError(f"{path}: entry {position} has no studyUid")
    return str(study)


def _required(entry: Mapping[str, Any], key: str, study: str, path: Path) -> Any:
    if entry.get(key) in (None, ""):
        raise ValueError(f"{path}: study {study} has no {key!r}")
    return entry[key]


def _first_annotated(entry: Mapping[str, Any], study: str, path: Path) -> Mapping[str, Any]:
    data = entry.get("data")
    if not isinstance(data, list):
        raise ValueError(f"{path}: study {study} has no 'data' list")
    for item in data:
        if isinstance(item, Mapping) and item.get("annotation"):
            return item
    raise ValueError(f"{path}: study {study} has no annotated slice")


def _points_of(item: Mapping[str, Any], study: str, path: Path) -> list[Mapping[str, Any]]:
    try:
        points = item["annotation"][0]["data"]["point"]
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(f"{path}: study {study} has no annotation[0].data.point list") from error
    if not isinstance(points, list):
        raise ValueError(f"{path}: study {study}: annotation[0].data.point is not a list")
    return points


def _annotated_points(entry: Mapping[str, Any], study: str, path: Path) -> list[Mapping[str, Any]]:
    return _points_of(_first_annotated(entry, study, path), study, path)


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npy array ({error})") from error
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{path}: expected a 2-D slice, got shape {array.shape}")
    return array


def _check_size(entry: Mapping[str, Any], shape: tuple[int, ...], study: str, path: Path) -> None:
    width, height = entry.get("width"), entry.get("height")
    if width is not None and height is not None and (int(height), int(width)) != tuple(shape):
        raise ValueError(f"study {study}: {path} is {shape} but the annotation says {height}x{width}")


def _positive_float(value: Any, key: str, study: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"study {study}: {key} must be a number, got {value!r}") from error
    if not (np.isfinite(number) and number > 0):
        raise ValueError(f"study {study}: {key} must be positive, got {value!r}")
    return number


def _read(path: Path, stop_before_pixels: bool = False) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, struct.error) as error:
        raise ValueError(f"{path}: not a readable DICOM file ({error})") from error


def _with_pixels(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The same instances with pixel data, re-read from their files once each when they were read without."""
    cache: dict[str, Dataset] = {}
    out = []
    for ds in datasets:
        if "PixelData" in ds:
            out.append(ds)
            continue
        filename = getattr(ds, "filename", None)
        if not filename:
            uid = ds.get("SOPInstanceUID", "?")
            raise ValueError(f"instance {uid} has no pixel data and no file to read it from")
        name = str(filename)
        if name not in cache:
            cache[name] = _read(Path(name))
        out.append(cache[name])
    return out


class _StudyFolders:
    """Study folders under a challenge root, found by folder name or, lazily, by StudyInstanceUID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folders = sorted(p for p in root.iterdir() if p.is_dir())
        self._by_uid: dict[str, Path] | None = None

    def find(self, study: str) -> Path:
        named = self.root / study
        if named.is_dir():
            return named
        if self._by_uid is None:
            self._by_uid = {}
            for folder in self.folders:
                first = next((p for p in sorted(folder.iterdir()) if p.suffix.lower() == ".dcm"), None)
                if first is not None:
                    uid = str(_read(first, stop_before_pixels=True).get("StudyInstanceUID", ""))
                    self._by_uid.setdefault(uid, folder)
        if study not in self._by_uid:
            raise FileNotFoundError(
                f"study {study}: no folder under {self.root} is named so or holds that StudyInstanceUID"
            )
        return self._by_uid[study]

"""Choosing CCF-Net's input from a DICOM study (CCFNET.md, "Choosing the input from a DICOM study").

The choice works on headers (datasets read with ``stop_before_pixels=True``); only brightness needs pixels,
and it is asked for only for the candidate sagittal series. Rules, in order:

- plane of a 2-D image from ImageOrientationPatient (n = row x col: |n.x| > 0.75 sagittal, |n.y| coronal,
  |n.z| axial, else oblique; "unknown" without the attribute); a series' plane is its most common image plane
  (ties: sagittal, coronal, axial, oblique, unknown), and only images of that plane are used;
- sequence from SeriesDescription (ProtocolName when the description is empty): "T1" -> T1, else "T2" -> T2;
- the brightest sagittal T2 series, else the brightest sagittal series (ties: more slices, then lowest UID);
- its images sorted along the slice normal, turned to point to +x (for a true sagittal series this is
  ImagePositionPatient x; for an oblique one it is the through-plane position); centre = n // 2; input =
  centre - 1, centre, centre + 1 with the edges repeated, so a single-slice series is usable.

Enhanced (multi-frame) MR is handled frame by frame through PlaneOrientationSequence / PlanePositionSequence
of the per-frame or shared functional groups; a chosen slice is then a (SOP instance, frame number) pair.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset

from ccfnet_core.sample import rescale_to_unit

Plane = Literal["sagittal", "coronal", "axial", "oblique", "unknown"]
SequenceKind = Literal["T1", "T2", "other"]

PLANE_THRESHOLD: Final[float] = 0.75
PLANE_PREFERENCE: Final[tuple[Plane, ...]] = ("sagittal", "coronal", "axial", "oblique", "unknown")

MeanIntensity = Callable[[Sequence[Dataset]], float]


class NoEligibleSeries(Exception):
    """No series of the study can give CCF-Net's input; `reason` says why, in words a person can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SeriesSummary:
    """What the choice saw of one series.

    n_slices counts the 2-D images (frames of enhanced instances included) that lie in the series' plane.
    mean_intensity is None where it was not needed (non-candidate series) or could not be measured.
    """

    series_uid: str
    description: str
    plane: Plane
    sequence: SequenceKind
    n_slices: int
    mean_intensity: float | None = None

    def __post_init__(self) -> None:
        if self.plane not in PLANE_PREFERENCE:
            raise ValueError(f"plane must be one of {PLANE_PREFERENCE}, got {self.plane!r}")
        if self.sequence not in ("T1", "T2", "other"):
            raise ValueError(f"sequence must be T1, T2 or other, got {self.sequence!r}")
        if self.n_slices < 0:
            raise ValueError(f"n_slices must be >= 0, got {self.n_slices}")

    def label(self) -> str:
        """Short form for messages, e.g. 'axial T2 x 20'."""
        return f"{self.plane} {self.sequence} x {self.n_slices}"


@dataclass(frozen=True)
class SliceChoice:
    """The three input slices (i-1, i, i+1, edges repeated) of the chosen series and why it was chosen.

    frame_numbers are 1-based DICOM frame numbers for multi-frame instances, None for single-frame ones; pass
    them to `load_input_slices` together with the three datasets.
    """

    series_uid: str
    sop_instance_uids: tuple[str, str, str]
    frame_numbers: tuple[int | None, int | None, int | None]
    centre_sop_instance_uid: str
    centre_index: int
    n_slices: int
    reason: str
    summaries: tuple[SeriesSummary, ...]


@dataclass(frozen=True)
class _Image:
    """One 2-D image: a single-frame instance, or one frame of an enhanced multi-frame instance."""

    dataset: Dataset
    frame: int | None
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None


def plane_of(iop: Sequence[float]) -> Plane:
    """Anatomical plane of an image from its six direction cosines (the largest normal component > 0.75)."""
    normal = _normal(iop)
    magnitude = np.abs(normal)
    for axis, plane in enumerate(PLANE_PREFERENCE[:3]):
        if magnitude[axis] > PLANE_THRESHOLD:
            return plane
    return "oblique"


def sequence_of(description: str) -> SequenceKind:
    """T1 / T2 / other from a series description, case-insensitively; "T1" wins when both appear."""
    text = description.upper()
    if "T1" in text:
        return "T1"
    if "T2" in text:
        return "T2"
    return "other"


def summarise_series(
    datasets: Sequence[Dataset], mean_intensity: MeanIntensity | None = None
) -> SeriesSummary:
    """Plane, sequence, size and brightness of one series (brightness as in `series_mean_intensity`)."""
    if not datasets:
        raise ValueError("summarise_series needs at least one dataset")
    summary, _ = _summarise(str(datasets[0].get("SeriesInstanceUID", "")), datasets)
    return replace(summary, mean_intensity=_brightness(datasets, mean_intensity))


def series_mean_intensity(datasets: Sequence[Dataset]) -> float | None:
    """Mean displayed value over every pixel of the series, or None when any dataset lacks PixelData.

    Values are after RescaleSlope/Intercept; MONOCHROME1 is mirrored within its stored range so that a bright
    image has a high mean whatever its photometric interpretation.
    """
    if not datasets or not all("PixelData" in ds for ds in datasets):
        return None
    total, count = 0.0, 0
    for ds in datasets:
        pixels = np.asarray(ds.pixel_array, dtype=np.float64)
        frames = pixels.reshape(-1, int(ds.Rows), int(ds.Columns))
        for index, frame in enumerate(frames):
            number = index + 1 if _is_enhanced(ds) else None
            values = _display_values(ds, frame, number)
            total += float(values.sum())
            count += values.size
    return total / count if count else None


def choose_slice(
    series: Mapping[str, Sequence[Dataset]], mean_intensity: MeanIntensity | None = None
) -> SliceChoice:
    """Choose the series and the three slices CCF-Net reads, or raise NoEligibleSeries saying why.

    `series` maps SeriesInstanceUID to that series' datasets (headers suffice). Brightness comes from the
    pixel data when every dataset of a candidate series has it, otherwise from `mean_intensity`; a candidate
    whose brightness is unknown ranks below every measured one.
    """
    if not series:
        raise NoEligibleSeries("study has no series")
    summaries: dict[str, SeriesSummary] = {}
    images: dict[str, list[_Image]] = {}
    for uid, datasets in series.items():
        summaries[uid], images[uid] = _summarise(uid, datasets)

    _raise_if_unusable(series, summaries, images)
    sagittal = [uid for uid, s in summaries.items() if s.plane == "sagittal"]
    if not sagittal:
        found = ", ".join(s.label() for s in summaries.values())
        raise NoEligibleSeries(f"no sagittal series among {len(summaries)} series ({found})")

    t2 = [uid for uid in sagittal if summaries[uid].sequence == "T2"]
    candidates = t2 or sagittal
    for uid in candidates:
        summaries[uid] = replace(summaries[uid], mean_intensity=_brightness(series[uid], mean_intensity))
    ranked = sorted(candidates, key=lambda uid: _rank_key(summaries[uid], uid))
    chosen = ranked[0]

    ordered, by_position = _order(images[chosen])
    centre = len(ordered) // 2
    picks = [ordered[i] for i in neighbour_indices(len(ordered), centre)]
    reason = _reason(summaries, candidates, chosen, bool(t2), by_position, centre, len(ordered))
    return SliceChoice(
        series_uid=chosen,
        sop_instance_uids=(_sop(picks[0]), _sop(picks[1]), _sop(picks[2])),
        frame_numbers=(picks[0].frame, picks[1].frame, picks[2].frame),
        centre_sop_instance_uid=_sop(picks[1]),
        centre_index=centre,
        n_slices=len(ordered),
        reason=reason,
        summaries=tuple(summaries.values()),
    )


def neighbour_indices(n: int, index: int) -> tuple[int, int, int]:
    """Indices i-1, i, i+1 clamped to 0..n-1: the edges repeat, so one slice gives three equal channels."""
    if not 0 <= index < n:
        raise ValueError(f"index {index} outside a stack of {n} slices")
    return max(index - 1, 0), index, min(index + 1, n - 1)


def ordered_slices(datasets: Sequence[Dataset]) -> list[tuple[Dataset, int | None]]:
    """The series' 2-D images as (dataset, frame number or None), sorted along the slice normal.

    The normal is turned so that its largest component is positive (+x for sagittal). Without
    ImagePositionPatient on every image the order falls back to InstanceNumber, then frame, then SOP UID.
    """
    ordered, _ = _order([image for ds in datasets for image in _images_of(ds)])
    return [(image.dataset, image.frame) for image in ordered]


def load_input_slices(
    datasets: Sequence[Dataset], frame_numbers: Sequence[int | None] | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """The (3, H, W) float32 input in [0, 1] and the centre slice's PixelSpacing (row, col) in mm.

    Each slice gets RescaleSlope/Intercept, then its own min-max rescale (MONOCHROME1 inverted). Neighbours of
    another size are resized bilinearly (torch, align_corners=False) to the centre's shape, so the annotated
    points, which are in the centre slice's pixels, stay valid.
    """
    if len(datasets) != 3:
        raise ValueError(f"load_input_slices needs 3 datasets (i-1, i, i+1), got {len(datasets)}")
    frames: Sequence[int | None] = frame_numbers if frame_numbers is not None else (None, None, None)
    if len(frames) != 3:
        raise ValueError(f"frame_numbers must have 3 entries, got {len(frames)}")
    channels = [_unit_slice(ds, frame) for ds, frame in zip(datasets, frames, strict=True)]
    shape = channels[1].shape
    resized = [channel if channel.shape == shape else _resize(channel, shape) for channel in channels]
    return np.stack(resized).astype(np.float32), pixel_spacing(datasets[1], frames[1])


def pixel_spacing(ds: Dataset, frame: int | None = None) -> tuple[float, float]:
    """PixelSpacing (row, col) in mm, from the dataset or its PixelMeasuresSequence (enhanced)."""
    value = ds.get("PixelSpacing")
    if value is None:
        value = _functional_group_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    if value is None or len(value) != 2:
        raise ValueError(f"instance {ds.get('SOPInstanceUID', '?')} has no usable PixelSpacing")
    row, col = float(value[0]), float(value[1])
    if not (row > 0 and col > 0):
        raise ValueError(f"instance {ds.get('SOPInstanceUID', '?')} has non-positive PixelSpacing {value}")
    return row, col


def image_orientation(ds: Dataset, frame: int | None = None) -> tuple[float, ...] | None:
    """The six direction cosines of an image (the frame's PlaneOrientationSequence for enhanced MR), or None
    when absent or unusable."""
    if _is_enhanced(ds):
        value = _functional_group_value(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        return _as_orientation(value)
    return _as_orientation(ds.get("ImageOrientationPatient"))


def _normal(iop: Sequence[float]) -> np.ndarray:
    """Unit slice normal row_dir x col_dir."""
    values = np.asarray([float(v) for v in iop], dtype=np.float64)
    if values.shape != (6,):
        raise ValueError(f"ImageOrientationPatient needs 6 values, got {len(values)}")
    normal = np.cross(values[:3], values[3:])
    length = float(np.linalg.norm(normal))
    if not np.isfinite(length) or length < 1e-6:
        raise ValueError(f"ImageOrientationPatient {list(values)} has parallel or zero direction cosines")
    return normal / length


def _is_image(ds: Dataset) -> bool:
    return "Rows" in ds and "Columns" in ds


def _is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _functional_group_value(ds: Dataset, frame: int | None, sequence: str, keyword: str) -> Any:
    """An attribute from the frame's own functional group, else from the shared one (PS3.3 C.7.6.16)."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if frame is not None and per_frame is not None and 0 < frame <= len(per_frame):
        groups.append(per_frame[frame - 1])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0][keyword].value
    return None


def _images_of(ds: Dataset) -> list[_Image]:
    """The 2-D images of one instance; none for a non-image instance (SR, presentation state, ...)."""
    if not _is_image(ds):
        return []
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if _is_enhanced(ds):
        images = []
        for frame in range(1, n_frames + 1):
            orientation = _functional_group_value(
                ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"
            )
            position = _functional_group_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
            images.append(_Image(ds, frame, _as_orientation(orientation), _as_position(position)))
        return images
    orientation = _as_orientation(ds.get("ImageOrientationPatient"))
    position = _as_position(ds.get("ImagePositionPatient"))
    if n_frames == 1:
        return [_Image(ds, None, orientation, position)]
    return [_Image(ds, frame, orientation, None) for frame in range(1, n_frames + 1)]


def _as_orientation(value: Any) -> tuple[float, ...] | None:
    if value is None or len(value) != 6:
        return None
    try:
        _normal(value)
    except ValueError:
        return None
    return tuple(float(v) for v in value)


def _as_position(value: Any) -> tuple[float, float, float] | None:
    if value is None or len(value) != 3:
        return None
    x, y, z = (float(v) for v in value)
    return x, y, z


def _image_plane(image: _Image) -> Plane:
    return "unknown" if image.orientation is None else plane_of(image.orientation)


def _summarise(uid: str, datasets: Sequence[Dataset]) -> tuple[SeriesSummary, list[_Image]]:
    """Summary without brightness, and the images that lie in the series' plane."""
    images = [image for ds in datasets for image in _images_of(ds)]
    planes = [_image_plane(image) for image in images]
    known: Counter[Plane] = Counter(p for p in planes if p != "unknown")
    votes: Counter[Plane] = known or Counter(planes)
    plane: Plane = "unknown"
    if votes:
        top = max(votes.values())
        plane = next(p for p in PLANE_PREFERENCE if votes.get(p) == top)
    in_plane = [image for image, p in zip(images, planes, strict=True) if p == plane]
    description = _description(datasets)
    summary = SeriesSummary(
        series_uid=uid,
        description=description,
        plane=plane,
        sequence=sequence_of(description),
        n_slices=len(in_plane),
    )
    return summary, in_plane


def _description(datasets: Sequence[Dataset]) -> str:
    for keyword in ("SeriesDescription", "ProtocolName"):
        for ds in datasets:
            text = str(ds.get(keyword, "") or "").strip()
            if text:
                return text
    return ""


def _raise_if_unusable(
    series: Mapping[str, Sequence[Dataset]],
    summaries: Mapping[str, SeriesSummary],
    images: Mapping[str, list[_Image]],
) -> None:
    """Name the study-wide reasons no series can be used: no images at all, or no orientation anywhere."""
    if not any(images.values()):
        modalities = Counter(str(ds.get("Modality", "?")) for datasets in series.values() for ds in datasets)
        found = ", ".join(f"{m} x {n}" for m, n in sorted(modalities.items()))
        raise NoEligibleSeries(
            f"no image instances among {len(series)} series; only non-image instances ({found or 'none'})"
        )
    image_series = [s for uid, s in summaries.items() if images[uid]]
    if all(s.plane == "unknown" for s in image_series):
        raise NoEligibleSeries(
            f"no ImageOrientationPatient in any of {len(image_series)} image series, so no plane can be told"
        )


def _brightness(datasets: Sequence[Dataset], callback: MeanIntensity | None) -> float | None:
    measured = series_mean_intensity(datasets)
    if measured is None and callback is not None:
        measured = float(callback(datasets))
    return measured


def _rank_key(summary: SeriesSummary, uid: str) -> tuple[int, float, int, str]:
    brightness = summary.mean_intensity
    known = brightness is not None and np.isfinite(brightness)
    return (0 if known else 1, -(brightness or 0.0) if known else 0.0, -summary.n_slices, uid)


def _order(images: Sequence[_Image]) -> tuple[list[_Image], bool]:
    """Images sorted along the normal (see `ordered_slices`); the flag says whether positions were used."""
    if not images:
        return [], False
    orientation = next((image.orientation for image in images if image.orientation is not None), None)
    positions = [image.position for image in images]
    if orientation is None or any(p is None for p in positions):
        fallback = sorted(images, key=lambda image: (_instance_number(image), image.frame or 0, _sop(image)))
        return fallback, False
    normal = _normal(orientation)
    normal = normal if normal[int(np.argmax(np.abs(normal)))] > 0 else -normal

    def key(image: _Image) -> tuple[float, int, int, str]:
        assert image.position is not None
        along = float(np.dot(np.asarray(image.position), normal))
        return round(along, 4), _instance_number(image), image.frame or 0, _sop(image)

    return sorted(images, key=key), True


def _instance_number(image: _Image) -> int:
    value = image.dataset.get("InstanceNumber")
    try:
        return int(value) if value is not None and value != "" else 0
    except (TypeError, ValueError):
        return 0


def _sop(image: _Image) -> str:
    return str(image.dataset.get("SOPInstanceUID", ""))


def _reason(
    summaries: Mapping[str, SeriesSummary],
    candidates: Sequence[str],
    chosen: str,
    had_t2: bool,
    by_position: bool,
    centre: int,
    n: int,
) -> str:
    pick = summaries[chosen]
    brightness = "unknown" if pick.mean_intensity is None else f"{pick.mean_intensity:.1f}"
    others = [summaries[uid] for uid in candidates if uid != chosen]
    versus = ", ".join("unknown" if s.mean_intensity is None else f"{s.mean_intensity:.1f}" for s in others)
    pool = "sagittal T2" if had_t2 else "sagittal (no sagittal T2 series)"
    text = f"brightest of {len(candidates)} {pool} series: {pick.description or '(no description)'} "
    text += f"mean {brightness}" + (f" vs {versus}" if versus else "")
    order = "position along the slice normal (x)" if by_position else "InstanceNumber (no positions)"
    return text + f"; {n} slices sorted by {order}, centre index {centre}"


def _display_values(ds: Dataset, pixels: np.ndarray, frame: int | None) -> np.ndarray:
    """Pixels after RescaleSlope/Intercept; MONOCHROME1 mirrored within the stored range (for brightness)."""
    slope, intercept = _rescale(ds, frame)
    values = pixels.astype(np.float64) * slope + intercept
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        values = (lo + hi) * slope + 2 * intercept - values
    return values


def _rescale(ds: Dataset, frame: int | None) -> tuple[float, float]:
    """RescaleSlope/Intercept of the frame (PixelValueTransformationSequence for enhanced), default 1 / 0."""
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if _is_enhanced(ds):
        group = "PixelValueTransformationSequence"
        found = _functional_group_value(ds, frame, group, "RescaleSlope")
        slope = found if found not in (None, "") else slope
        found = _functional_group_value(ds, frame, group, "RescaleIntercept")
        intercept = found if found not in (None, "") else intercept
    slope_value = float(slope) if slope not in (None, "") else 1.0
    intercept_value = float(intercept) if intercept not in (None, "") else 0.0
    return slope_value, intercept_value


def _unit_slice(ds: Dataset, frame: int | None) -> np.ndarray:
    """One slice, rescaled to [0, 1] as CCF-Net expects (MONOCHROME1 inverted)."""
    uid = ds.get("SOPInstanceUID", "?")
    if "PixelData" not in ds:
        raise ValueError(f"instance {uid} has no pixel data (was it read with stop_before_pixels?)")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"instance {uid} is not greyscale (SamplesPerPixel {ds.SamplesPerPixel})")
    pixels = np.asarray(ds.pixel_array)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1:
        if frame is None or not 1 <= frame <= n_frames:
            raise ValueError(f"instance {uid} has {n_frames} frames; give a frame number in 1..{n_frames}")
        pixels = pixels[frame - 1]
    if pixels.ndim != 2:
        raise ValueError(f"instance {uid}: expected a 2-D slice, got shape {pixels.shape}")
    slope, intercept = _rescale(ds, frame)
    values = pixels.astype(np.float64) * slope + intercept
    invert = str(ds.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1"
    return rescale_to_unit(values, invert=invert)


def _resize(channel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(channel, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=(int(shape[0]), int(shape[1])), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()

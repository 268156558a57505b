"""What every result object shares: series identity, equipment, the "unverified AI" marking, character set."""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import Final, Protocol

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from worker.results import codes
from worker.results.findings import AlgorithmIdentity, AnalysisResult, StructureFinding, is_valid_uid


@dataclass(frozen=True)
class SeriesSpec:
    """Deterministic series number and description of one kind of result object."""

    number: int
    description: str


SR_SERIES: Final = SeriesSpec(9001, "CCF-Net SR")
GSPS_SERIES: Final = SeriesSpec(9002, "CCF-Net GSPS")
KEY_IMAGE_SERIES: Final = SeriesSpec(9003, "CCF-Net Key Image")
SEG_SERIES: Final = SeriesSpec(9004, "CCF-Net SEG")

# CS (16 characters, capitals/digits/space/underscore): the content label of GSPS and SEG.
CONTENT_LABEL: Final = "CCFNET_AI"
# What the model analyses, whatever the source calls it (CS, PS3.16 Annex L).
BODY_PART: Final = "LSPINE"
UNVERIFIED_TEXT: Final = "AI result, unverified"
PHANTOM_TEXT: Final = "phantom-trained model, not for clinical use"
SHORT_PHANTOM_TEXT: Final = "phantom model, not for clinical use"
# Namespace of the name-based tracking UIDs (fixed: changing it changes every tracking UID).
_TRACKING_NAMESPACE: Final = uuid.UUID("5b0e3c3e-8a36-4c53-9d0f-6f1d2c7c0a11")

# Patient and study attributes of Type 2 that highdicom reads from the source; a real-world source may lack
# them, so the working copy gets them empty rather than the writer failing.
_TYPE2_SOURCE_ATTRIBUTES: Final = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)
# Value representations whose values are character strings in the Specific Character Set.
_TEXT_VRS: Final = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})


class Sourced(Protocol):
    """What the shared helpers read of a result: its source slice and its algorithm (an AnalysisResult, or the
    declined study of declined_sr)."""

    @property
    def source_dataset(self) -> Dataset: ...

    @property
    def algorithm(self) -> AlgorithmIdentity: ...


def working_source(result: Sourced) -> Dataset:
    """A copy of the source slice with missing Type 2 patient/study attributes empty; input untouched."""
    source = copy.deepcopy(result.source_dataset)
    for keyword in _TYPE2_SOURCE_ATTRIBUTES:
        if keyword not in source:
            setattr(source, keyword, None)
    return source


def character_set(result: Sourced) -> str | list[str] | None:
    """The Specific Character Set of the result objects.

    The source's own value when everything we write fits it: all our text is ASCII and copied text was
    decoded with that value. Otherwise (a source without a declared set but non-ASCII text, or non-ASCII
    text of our own) UTF-8, which represents every decoded string.
    """
    algorithm = result.algorithm
    ours = (algorithm.manufacturer, algorithm.model_name, algorithm.software_version, algorithm.model_version)
    if not all(text.isascii() for text in ours):
        return "ISO_IR 192"
    declared = result.source_dataset.get("SpecificCharacterSet")
    if declared:
        return str(declared) if isinstance(declared, str) else [str(value) for value in declared]
    return "ISO_IR 192" if _has_non_ascii_text(result.source_dataset) else None


def _has_non_ascii_text(dataset: Dataset) -> bool:
    """Whether any text value (nested ones included) holds a non-ASCII character."""
    for element in dataset.iterall():
        if element.VR not in _TEXT_VRS or element.value is None:
            continue
        values = element.value if isinstance(element.value, MultiValue | list) else [element.value]
        if not all(str(value).isascii() for value in values):
            return True
    return False


def software_versions(algorithm: AlgorithmIdentity) -> tuple[str, str]:
    """Worker software version, then model (weights) version."""
    return (algorithm.software_version, algorithm.model_version)


def weights_text(algorithm: AlgorithmIdentity) -> str:
    """'weights sha256 c4788c...' (the whole digest), or '' for a card written without one."""
    return f"weights sha256 {algorithm.weights_sha256}" if algorithm.weights_sha256 else ""


def identity_text(algorithm: AlgorithmIdentity) -> str:
    """The unverified-AI description with the full weights digest, for free-text attributes without a short
    length limit (ST/LT): which weights made the object, checkable against the model file."""
    weights = weights_text(algorithm)
    return f"{description(algorithm)}; {weights}" if weights else description(algorithm)


def contributing_equipment(algorithm: AlgorithmIdentity) -> hd.ContributingEquipment:
    """The algorithm as IHE AI Results identifies it: processing equipment with name, versions (the model
    version carries the weights' sha256 prefix), device UID, and the full digest in the description."""
    item = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=algorithm.model_name,
        software_versions=list(software_versions(algorithm)),
        contribution_description=identity_text(algorithm),
    )
    # Device UID (0018,1002) belongs to the sequence item (SOP Common module) but highdicom has no argument.
    item.DeviceUID = algorithm.device_uid
    return item


def observation_context(algorithm: AlgorithmIdentity) -> hd.sr.ObservationContext:
    """TID 1001 with a device observer: the model, identified by the model card's device UID (every SR)."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE_OBSERVER),
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=algorithm.device_uid,
                name=algorithm.model_name,
                manufacturer_name=algorithm.manufacturer,
                model_name=algorithm.model_name,
            ),
        )
    )


def mark_equipment(dataset: Dataset, algorithm: AlgorithmIdentity) -> None:
    """General Equipment attributes highdicom does not set for every IOD, and research content for phantoms.

    The device UID stays in the Contributing Equipment item (where IHE AI Results looks for it): Device UID
    entered both places late in the standard, and validators built on older editions (dicom3tools 2022) warn
    about it as a standard extension; once is enough.
    """
    dataset.ManufacturerModelName = algorithm.model_name
    dataset.SoftwareVersions = list(software_versions(algorithm))
    if algorithm.phantom_only:
        dataset.ContentQualification = "RESEARCH"


def copy_body_part(dataset: Dataset, source: Dataset) -> None:
    """General Series Body Part Examined and Laterality for image-like series (GSPS, SC).

    Laterality is Type 2C, required for paired structures only: naming the (unpaired) lumbar spine is what
    lets a validator see that it may be absent. The source's values win when it has them.
    """
    dataset.BodyPartExamined = source.get("BodyPartExamined") or BODY_PART
    if source.get("Laterality"):
        dataset.Laterality = source.Laterality


def description(algorithm: AlgorithmIdentity) -> str:
    """'CCF-Net R18-MSC r18-msc-2024.06: AI result, unverified' (+ phantom warning), for ST/LT attributes."""
    text = f"{algorithm.model_name} {algorithm.model_version}: {UNVERIFIED_TEXT}"
    if algorithm.phantom_only:
        text = f"{text}; {PHANTOM_TEXT}"
    return text


def short_description(algorithm: AlgorithmIdentity) -> str:
    """The same marking within LO's 64 characters: the warnings always, the model name when it fits."""
    text = UNVERIFIED_TEXT
    if algorithm.phantom_only:
        text = f"{text}; {SHORT_PHANTOM_TEXT}"
    with_model = f"{text} ({algorithm.model_name})"
    return with_model if len(with_model) <= 64 else text


def new_uid(value: str | None, argument: str) -> str:
    """A caller-chosen UID (checked) or a fresh one."""
    if value is None:
        return str(hd.UID())
    if not isinstance(value, str) or not is_valid_uid(value):
        raise ValueError(f'Argument "{argument}" must be a valid DICOM UID.')
    return value


def tracking_uid(result: AnalysisResult, finding: StructureFinding) -> str:
    """The same tracking UID for one structure of one analysis in the SR, the GSPS and the SEG.

    A name-based (UUID v5) UID under 2.25 from the source SOP Instance UID, the algorithm and the structure,
    so the objects of one result cross-reference without the caller passing UIDs around.
    """
    name = "|".join(
        (
            str(result.source_dataset.SOPInstanceUID),
            result.algorithm.device_uid,
            result.algorithm.model_version,
            finding.name,
        )
    )
    return f"2.25.{uuid.uuid5(_TRACKING_NAMESPACE, name).int}"

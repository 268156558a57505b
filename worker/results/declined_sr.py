"""The "not analysed" report: a short Enhanced SR saying the AI looked at a study and declined it, and why.

Without it a radiologist cannot tell a study the AI declined from one it never saw. The content is a TID 2000
Basic Diagnostic Imaging Report: the title "Diagnostic Imaging Report" (LN 18748-4), the language, the device
observer (the model, TID 1001), and an "Impressions" section (TID 2002 Report Narrative) whose Impression reads
``not analysed: <reason>``, inferred from the slice that was looked at, with a Comment marking it unverified AI
output. Like every result object it is a new series in the source's study, names the algorithm in its Contributing
Equipment and is UNVERIFIED / PRELIMINARY.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import highdicom as hd
from pydicom.dataset import Dataset

from worker.results import _common, codes
from worker.results.findings import AlgorithmIdentity, is_valid_uid

DECLINED_SR_SERIES: Final = _common.SeriesSpec(9005, "CCF-Net not analysed")
NOT_ANALYSED_PREFIX: Final = "not analysed: "
_REQUIRED: Final = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True, eq=False, repr=False)
class DeclinedStudy:
    """A study the anatomy gate declined: the slice it looked at (its header suffices), the algorithm that would
    have run, and the reason a person reads."""

    source_dataset: Dataset
    algorithm: AlgorithmIdentity
    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.source_dataset, Dataset):
            raise TypeError(f"source_dataset must be a pydicom Dataset, got {type(self.source_dataset).__name__}")
        missing = [keyword for keyword in _REQUIRED if keyword not in self.source_dataset]
        if missing:
            raise ValueError(f"source_dataset lacks {', '.join(missing)}")
        for keyword in _REQUIRED:
            if not is_valid_uid(str(self.source_dataset[keyword].value)):
                raise ValueError(f"source_dataset has an invalid {keyword}")
        if not isinstance(self.algorithm, AlgorithmIdentity):
            raise TypeError(f"algorithm must be an AlgorithmIdentity, got {type(self.algorithm).__name__}")
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError("reason must be a non-empty string")

    @property
    def text(self) -> str:
        """What the report says: 'not analysed: <reason>'."""
        return NOT_ANALYSED_PREFIX + self.reason.strip()

    def __repr__(self) -> str:
        """UIDs only: the source holds patient data, which must not reach logs."""
        return f"DeclinedStudy(source_sop_instance_uid={self.source_dataset.SOPInstanceUID!s})"


def _impressions(declined: DeclinedStudy, source: Dataset) -> hd.sr.ContainerContentItem:
    """TID 2002: the Impressions heading with the 'not analysed' impression and the unverified-AI comment."""
    impression = hd.sr.TextContentItem(
        name=codes.IMPRESSION,
        value=declined.text,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    impression.ContentSequence = hd.sr.ContentSequence([
        hd.sr.ImageContentItem(
            name=codes.BEST_ILLUSTRATION,
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
            relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
        )
    ])
    section = hd.sr.ContainerContentItem(
        name=codes.IMPRESSIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    section.ContentSequence = hd.sr.ContentSequence([
        impression,
        hd.sr.TextContentItem(
            name=codes.COMMENT,
            value=f"No findings were produced. {_common.identity_text(declined.algorithm)}",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ])
    return section


def build_declined_sr(
    declined: DeclinedStudy, *, series_instance_uid: str | None = None, sop_instance_uid: str | None = None
) -> hd.sr.EnhancedSR:
    """The "not analysed" report of one declined study, as a new series in the source's study."""
    if not isinstance(declined, DeclinedStudy):
        raise TypeError('Argument "declined" must have type DeclinedStudy.')
    series_uid = _common.new_uid(series_instance_uid, "series_instance_uid")
    instance_uid = _common.new_uid(sop_instance_uid, "sop_instance_uid")
    source = _common.working_source(declined)
    root = hd.sr.ContainerContentItem(name=codes.DIAGNOSTIC_IMAGING_REPORT, template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence([
        *hd.sr.LanguageOfContentItemAndDescendants(hd.sr.templates.DEFAULT_LANGUAGE),
        *_common.observation_context(declined.algorithm),
        _impressions(declined, source),
    ])
    sr = hd.sr.EnhancedSR(
        evidence=[source],
        content=hd.sr.ContentSequence([root], is_root=True),
        series_instance_uid=series_uid,
        series_number=DECLINED_SR_SERIES.number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=declined.algorithm.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[_common.contributing_equipment(declined.algorithm)],
        series_description=DECLINED_SR_SERIES.description,
        specific_character_set=_common.character_set(declined),
    )
    _common.mark_equipment(sr, declined.algorithm)
    return sr

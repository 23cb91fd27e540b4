"""DICOM SEG from a label volume and back, with segments named, coloured and coded from one ``LabelSet``."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from appcore.labels import Label, LabelSet

# The Manufacturer of every SEG this server writes: the SEGs it may replace or delete in a PACS.
SEG_MANUFACTURER = "active-label-server"
# Category of every segment, and the type of a label without a SNOMED CT code of its own.
BODY_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical structure")
SOFTWARE = "active-label-server 0.1.0"
# The Label Map Segmentation Storage SOP class (OHIF's default when it stores a SEG): one frame per
# slice whose pixel values are segment numbers. highdicom 0.22 does not read it ("not a Segmentation").
LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
# A voxel of a fractional SEG (probability or occupancy) belongs to a segment from this value on:
# the majority rule, the same cut as a binary SEG's 0/1 and a network's most likely class.
FRACTION_IN = 0.5


def rgb_to_dicom_lab(rgb: tuple[int, int, int]) -> list[int]:
    """sRGB (0-255) to DICOM's RecommendedDisplayCIELabValue (D65, L*, a*, b* scaled to 0-65535)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ linear / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])
    scaled = [lab[0] * 65535 / 100, (lab[1] + 128) * 65535 / 255, (lab[2] + 128) * 65535 / 255]
    return [int(np.clip(round(v), 0, 65535)) for v in scaled]


def dicom_lab_to_rgb(lab: Sequence[int]) -> tuple[int, int, int]:
    """The inverse of ``rgb_to_dicom_lab`` (to check what a viewer will show)."""
    lab_star = np.array([lab[0] * 100 / 65535, lab[1] * 255 / 65535 - 128, lab[2] * 255 / 65535 - 128])
    fy = (lab_star[0] + 16) / 116
    f = np.array([fy + lab_star[1] / 500, fy, fy - lab_star[2] / 200])
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * np.array([0.95047, 1.0, 1.08883])
    m_inv = np.linalg.inv(np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]))
    linear = np.clip(m_inv @ xyz, 0, 1)
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return tuple(int(round(v)) for v in np.clip(c * 255, 0, 255))  # type: ignore[return-value]


def segment_description(number: int, label: Label, algorithm: hd.AlgorithmIdentificationSequence) -> Dataset:
    """One segment: the label's name, its SNOMED CT code where it has one, and its display colour."""
    prop_type = Code(label.snomed, "SCT", label.snomed_meaning or label.name) if label.snomed else ANATOMICAL_STRUCTURE
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label.name,
        segmented_property_category=BODY_STRUCTURE,
        segmented_property_type=prop_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
        algorithm_identification=algorithm,
        tracking_id=f"{label.name} ({label.id})",
        tracking_uid=hd.UID(),
    )
    description.RecommendedDisplayCIELabValue = rgb_to_dicom_lab(label.color)
    return description


def label_to_seg(
    label: np.ndarray,
    sources: Sequence[Dataset],
    labels: LabelSet,
    *,
    model: str,
    series_uid: str,
    sop_uid: str,
    series_number: int = 300,
) -> hd.seg.Segmentation:
    """A binary DICOM SEG of ``label`` over the source instances.

    Args:
        label: class ids indexed ``[column, row, slice]``, on the grid of ``sources``.
        sources: the source instances in slice order (``SeriesVolume.sop_instance_uids`` order).
        labels: the model's labels; every one becomes a segment, numbered in the set's order.
        model: the model name recorded as the segmenting algorithm.
        series_uid: SeriesInstanceUID of the new SEG series.
        sop_uid: its SOPInstanceUID.
        series_number: its SeriesNumber.
    """
    if label.ndim != 3 or label.shape[2] != len(sources):
        raise ValueError(f"Label of shape {label.shape} does not match {len(sources)} source slices")
    unknown = set(np.unique(label).tolist()) - {0, *labels.ids}
    if unknown:
        raise ValueError(f"Label values {sorted(unknown)} are not labels of {model!r} ({labels.name_to_id()})")
    number_of = {lab.id: i + 1 for i, lab in enumerate(labels)}
    lut = np.zeros(max(labels.ids) + 1, dtype=np.uint8)
    for label_id, number in number_of.items():
        lut[label_id] = number
    frames = lut[label.astype(np.intp)].transpose(2, 1, 0)  # (slices, rows, columns)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"MONAI Label {model}", family=codes.cid7162.ArtificialIntelligence, version="1"
    )
    descriptions = [segment_description(number_of[lab.id], lab, algorithm) for lab in labels]
    empty = not frames.any()
    if empty:
        # highdicom cannot omit every frame, so for an empty label it writes all of them: one per
        # segment and slice (2400 for 8 organs on 300 slices, 1.9 s for 160). One frame marked here
        # and emptied below says the same (frames not in a SEG are empty) and still references
        # every source image.
        frames = frames.copy()
        frames[0, 0, 0] = 1
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=SEG_MANUFACTURER,
        manufacturer_model_name=model,
        software_versions=SOFTWARE,
        device_serial_number="1",
        series_description=f"Label ({model})",
        content_label="LABEL",
        content_description=f"Saved final label, model {model}",
        omit_empty_frames=True,
    )
    if empty:
        seg.PixelData = bytes(len(seg.PixelData))  # the one frame's bits, packed: all 0 now
    return seg


def seg_to_label(
    seg: Dataset,
    sop_instance_uids: Sequence[str],
    labels: LabelSet,
    positions: Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """The class-id volume (``[column, row, slice]``) of a SEG over the given source slices.

    Segments are matched to labels by SegmentLabel, ignoring case, else by the SNOMED CT code of their
    segmented property type (as another tool may name "Liver" what this server calls "liver"); a
    segment matching no label is refused. Segments may come in any order. A fractional SEG's voxel
    belongs to a segment from ``FRACTION_IN`` (0.5) on. A SEG that does not say its frames keep the
    source slices' spatial locations (OHIF's) is read on those slices all the same. A Label Map SEG
    is read too (``label_map_to_label``); ``positions`` (each source slice's ImagePositionPatient) place
    its frames that name no source instance.
    """
    if str(seg.get("SOPClassUID", "")) == LABEL_MAP_SEG:
        return label_map_to_label(seg, sop_instance_uids, labels, positions)
    segmentation = hd.seg.Segmentation.from_dataset(seg, copy=False)
    ids = {
        int(item.SegmentNumber): _label_of(item, labels, str(seg.SOPInstanceUID))
        for item in segmentation.SegmentSequence
    }
    masks = segmentation.get_pixels_by_source_instance(
        source_sop_instance_uids=list(sop_instance_uids),
        segment_numbers=sorted(ids),
        assert_missing_frames_are_empty=True,
        # OHIF's binary SEG omits SpatialLocationsPreserved; its frames are still the source slices
        ignore_spatial_locations=True,
    )  # (slices, rows, columns, segments); a fractional SEG's values scaled to [0, 1]
    out = np.zeros(masks.shape[:3], dtype=np.uint8)
    for channel, number in enumerate(sorted(ids)):
        out[masks[..., channel] >= FRACTION_IN] = ids[number]
    return out.transpose(2, 1, 0)


def label_map_to_label(
    seg: Dataset,
    sop_instance_uids: Sequence[str],
    labels: LabelSet,
    positions: Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """The class-id volume (``[column, row, slice]``) of a Label Map SEG over the given source slices.

    Each frame's pixel values are segment numbers (0 background), matched to labels as in
    ``seg_to_label``. A frame belongs to the source instance its DerivationImageSequence names, else
    to the source slice at its ImagePositionPatient (``positions``, within 0.01 mm). Slices without a
    frame are background.

    Raises:
        ValueError: a pixel value no segment describes, a frame of another size than the others or
            that no source slice matches.
    """
    uid = str(seg.SOPInstanceUID)
    ids = {int(item.SegmentNumber): _label_of(item, labels, uid) for item in seg.SegmentSequence}
    frames = np.asarray(seg.pixel_array)
    if frames.ndim == 2:  # a single frame
        frames = frames[None]
    values = {int(v) for v in np.unique(frames)} - {0}
    if values - set(ids):
        raise ValueError(
            f"SEG {uid}: pixel values {sorted(values - set(ids))} are no segment number of its SegmentSequence "
            f"({sorted(ids)})"
        )
    lut = np.zeros(max([*ids, *values, 0]) + 1, dtype=np.uint8)
    for number, label_id in ids.items():
        lut[number] = label_id
    index = {u: i for i, u in enumerate(sop_instance_uids)}
    groups = seg.get("PerFrameFunctionalGroupsSequence") or []
    if len(groups) != len(frames):
        raise ValueError(f"SEG {uid}: {len(frames)} frames but {len(groups)} per-frame functional groups")
    out = np.zeros((len(sop_instance_uids), *frames.shape[1:]), dtype=np.uint8)
    for k, group in enumerate(groups):
        out[_frame_slice(group, index, positions, f"SEG {uid} frame {k + 1}")] = lut[frames[k]]
    return out.transpose(2, 1, 0)


def _frame_slice(group: Dataset, index: dict[str, int], positions: Sequence[Sequence[float]] | None, what: str) -> int:
    """The source slice of one Label Map frame (see ``label_map_to_label``)."""
    for derivation in group.get("DerivationImageSequence") or []:
        for source in derivation.get("SourceImageSequence") or []:
            ref = str(source.get("ReferencedSOPInstanceUID", ""))
            if ref in index:
                return index[ref]
    plane = group.get("PlanePositionSequence") or []
    if plane and positions is not None:
        at = np.asarray([float(v) for v in plane[0].ImagePositionPatient])
        distance = np.linalg.norm(np.asarray(positions, dtype=float) - at, axis=1)
        if distance.min() <= 0.01:
            return int(distance.argmin())
    raise ValueError(
        f"{what} names none of the series' instances and lies at no slice position of it: the SEG was "
        "made on another series, or on a grid other than its slices"
    )


def _label_of(item: Dataset, labels: LabelSet, sop_uid: str) -> int:
    """The label id of one SegmentSequence item (see ``seg_to_label``)."""
    name = str(item.SegmentLabel)
    by_name = [label for label in labels if label.name.lower() == name.strip().lower()]
    if by_name:
        return by_name[0].id
    types = item.get("SegmentedPropertyTypeCodeSequence") or []
    code = str(types[0].CodeValue) if types else ""
    by_code = [label for label in labels if code and label.snomed == code]
    if len(by_code) == 1:
        return by_code[0].id
    raise ValueError(
        f"SEG {sop_uid}: segment {name!r} (code {code or 'none'}) is none of the labels "
        f"{[label.name for label in labels]}"
    )

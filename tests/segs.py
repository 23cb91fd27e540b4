"""DICOM SEGs as other programs write them (highdicom, OHIF), for the tests of the SEG reader."""

from __future__ import annotations

import io
from typing import Literal

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from appcore.dicom.seg import LABEL_MAP_SEG

SegKind = Literal["binary", "fractional", "ohif"]


def foreign_seg(label: np.ndarray, sources: list, *, kind: SegKind) -> hd.seg.Segmentation:
    """A SEG as another program writes it, of a hippocampus label (``[column, row, slice]``): highdicom
    with the segments in the other order (posterior 1, anterior 2), named as a person would, coded as
    OHIF codes them (Tissue/Tissue), Manufacturer "Unspecified"; ``kind`` "binary", "fractional" (the
    label's voxels 0.8, and 0.3 where a segment merely touches) or "ohif" (binary, and without
    SpatialLocationsPreserved, as OHIF stores it)."""
    family = codes.cid7162.ArtificialIntelligence
    algorithm = hd.AlgorithmIdentificationSequence(name="Other", family=family, version="9")
    ours = {1: 2, 2: 1}  # segment number: our label id (posterior first)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label={1: "Posterior", 2: "anterior "}[number],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            algorithm_identification=algorithm,
        )
        for number in ours
    ]
    frames = label.transpose(2, 1, 0)  # (slices, rows, columns)
    masks = np.stack([frames == ours[n] for n in sorted(ours)], axis=-1).astype(np.float32)
    if kind == "fractional":
        touched = np.roll(masks, 1, axis=1) * (1 - masks)  # one row beside each segment
        masks = 0.8 * masks + 0.3 * touched
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks if kind == "fractional" else masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL
        if kind == "fractional"
        else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Unspecified",
        manufacturer_model_name="Other viewer",
        software_versions="OHIF-3.11.0",
        device_serial_number="0",
    )
    if kind == "ohif":
        for frame in seg.PerFrameFunctionalGroupsSequence:
            for derivation in frame.get("DerivationImageSequence", []):
                for source in derivation.SourceImageSequence:
                    if "SpatialLocationsPreserved" in source:
                        del source.SpatialLocationsPreserved
    return seg


def label_map_seg(label: np.ndarray, sources: list, *, rle: bool, by_position: bool) -> Dataset:
    """A Label Map SEG (OHIF's default when it stores one) of a hippocampus label, made with pydicom
    from ``foreign_seg``'s binary SEG: the SOP class changed, one 8-bit frame per painted slice (OHIF
    stores only those) whose pixel values are segment numbers (1 posterior, 2 anterior), RLE-compressed
    as OHIF sends it (``rle``) or not. Each frame names its source instance, or (``by_position``) only
    its ImagePositionPatient."""
    written = io.BytesIO()
    foreign_seg(label, sources, kind="binary").save_as(written)
    seg = pydicom.dcmread(io.BytesIO(written.getvalue()))  # a plain dataset, highdicom's index left behind
    frames = label.transpose(2, 1, 0)
    values = np.zeros(frames.shape, np.uint8)
    values[frames == 2], values[frames == 1] = 1, 2
    painted = [k for k in range(len(sources)) if values[k].any()]
    groups = []
    for k in painted:
        group, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = sources[k].ImagePositionPatient
        group.PlanePositionSequence = [plane]
        if not by_position:
            source, derivation = Dataset(), Dataset()
            source.ReferencedSOPClassUID = sources[k].SOPClassUID
            source.ReferencedSOPInstanceUID = sources[k].SOPInstanceUID
            derivation.SourceImageSequence = [source]
            group.DerivationImageSequence = [derivation]
        groups.append(group)
    seg.SOPClassUID = seg.file_meta.MediaStorageSOPClassUID = LABEL_MAP_SEG
    seg.SegmentationType = "LABELMAP"
    seg.PerFrameFunctionalGroupsSequence = groups
    seg.NumberOfFrames = len(painted)
    seg.BitsAllocated, seg.BitsStored, seg.HighBit, seg.PixelRepresentation = 8, 8, 7, 0
    pixels = np.ascontiguousarray(values[painted])
    if rle:
        seg.compress(RLELossless, pixels)
    else:
        seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        seg.PixelData = pixels.tobytes()
    return seg

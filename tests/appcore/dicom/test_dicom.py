"""appcore.dicom without a PACS: series geometry checks, decoding, UID filling, MR conversion and DICOM SEG."""

from __future__ import annotations

import shutil
from io import BytesIO
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from appcore.dicom.prepare import fill_missing_uids, load_series_folder, nifti_to_series, read_series_folder, stable_uid
from appcore.dicom.seg import LABEL_MAP_SEG, dicom_lab_to_rgb, label_to_seg, rgb_to_dicom_lab, seg_to_label
from appcore.dicom.series import SeriesRefused, load_series, series_geometry
from radiology.registry import MODELS
from tests.conftest import HIPPO, SHARED
from tests.segs import foreign_seg, label_map_seg

DICOM = SHARED / "dicom"
requires_dicom = pytest.mark.skipif(not (DICOM / "ct_abdomen").is_dir(), reason=f"{DICOM} is absent")


def phantom_series(affine: np.ndarray | None = None, shape: tuple[int, int, int] = (12, 10, 8)) -> list:
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 97
    return nifti_to_series(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), name="phantom")


def _drop(series: list, index: int) -> list:
    return series[:index] + series[index + 1 :]


def _shift(series: list, index: int, offset: tuple[float, float, float]) -> list:
    ds = series[index].copy()
    ds.ImagePositionPatient = [float(p) + o for p, o in zip(ds.ImagePositionPatient, offset, strict=True)]
    return [*series[:index], ds, *series[index + 1 :]]


def _set(series: list, index: int, **values: object) -> list:
    ds = series[index].copy()
    for key, value in values.items():
        setattr(ds, key, value)
    return [*series[:index], ds, *series[index + 1 :]]


def _tilt(series: list) -> list:
    # Each slice displaced sideways by 0.3 mm per 1 mm along the normal: a sheared (tilted) stack.
    return [_shift([ds], 0, (0.0, 0.3 * k, 0.0))[0] for k, ds in enumerate(series)]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: _drop(s, 4), r"1 slice\(s\) missing"),
        (lambda s: _shift(s, 5, (0.0, 0.0, 0.4)), "uneven slice spacing"),
        (_tilt, r"16\.7 degrees off their normal \(gantry tilt\)"),
        (lambda s: _set(s, 2, ImageOrientationPatient=[1, 0, 0, 0, 0.9, 0.43589]), "mixed image orientations"),
        (lambda s: _set(s, 2, PixelSpacing=[1.0, 1.5]), "mixed pixel spacings"),
        (lambda s: _set(s, 3, ImagePositionPatient=s[2].ImagePositionPatient), r"slice position\(s\) occur twice"),
        (lambda s: _set(s, 1, NumberOfFrames=2), "multi-frame"),
        (lambda s: [], "no instances"),
    ],
)
def test_irregular_series_are_refused_with_the_series_named(mutate, match: str) -> None:
    with pytest.raises(SeriesRefused, match=match) as caught:
        series_geometry(mutate(phantom_series()), "1.2.3.4")
    assert "Series 1.2.3.4 " in str(caught.value)


@pytest.mark.parametrize(
    "affine",
    [
        np.eye(4),
        np.diag([-0.8, 0.8, 2.5, 1.0]),  # LPS-like, anisotropic
        np.array([[0, 0, 1.5, 10], [0.9, 0, 0, -20], [0, -0.9, 0, 5], [0, 0, 0, 1]]),  # sagittal
    ],
)
def test_nifti_to_series_and_back_keeps_values_and_geometry(affine: np.ndarray) -> None:
    data = np.random.default_rng(0).normal(100, 30, (9, 7, 5)).astype(np.float32)
    series = nifti_to_series(nib.Nifti1Image(data, affine), name="roundtrip")
    shuffled = [series[i] for i in (3, 0, 4, 2, 1)]  # instance order must not matter
    volume = load_series(shuffled, str(series[0].SeriesInstanceUID))
    # The reader orders slices along the image normal, which may reverse the third axis: compare in
    # world space, voxel centre by voxel centre.
    index = np.stack(np.meshgrid(*map(np.arange, volume.data.shape), indexing="ij"), -1).reshape(-1, 3)
    world = index @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    source = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    assert np.allclose(source, np.rint(source), atol=1e-4)
    src = np.rint(source).astype(int)
    expected = data[src[:, 0], src[:, 1], src[:, 2]]
    assert np.allclose(volume.data.reshape(-1), expected, atol=float(np.abs(data).max()) / 30000)


def test_sheared_nifti_cannot_become_a_series() -> None:
    affine = np.eye(4)
    affine[1, 2] = 0.5
    with pytest.raises(ValueError, match="sheared"):
        nifti_to_series(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine), name="shear")


@pytest.mark.skipif(not (HIPPO / "dataset.json").exists(), reason=f"{HIPPO} is absent")
def test_hippocampus_case_as_mr_series_round_trips_exactly() -> None:
    image = nib.load(HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
    series = nifti_to_series(image, name="hippocampus_001")
    assert {ds.Modality for ds in series} == {"MR"} and len(series) == image.shape[2]
    volume = load_series(series, str(series[0].SeriesInstanceUID))
    assert np.array_equal(volume.affine, image.affine)
    assert np.array_equal(volume.data, np.asarray(image.dataobj))


@requires_dicom
def test_ct_abdomen_uids_are_filled_consistently_and_deterministically() -> None:
    raw = read_series_folder(DICOM / "ct_abdomen")
    assert not raw[0].get("SeriesInstanceUID"), "the published series has empty UIDs"
    first, second = fill_missing_uids(raw, "ct_abdomen"), fill_missing_uids(raw, "ct_abdomen")
    assert [ds.SOPInstanceUID for ds in first] == [ds.SOPInstanceUID for ds in second]
    assert len({ds.SOPInstanceUID for ds in first}) == len(raw)
    assert {ds.SeriesInstanceUID for ds in first} == {stable_uid("ct_abdomen", "series")}
    assert {ds.StudyInstanceUID for ds in first} == {stable_uid("ct_abdomen", "study")}
    assert {ds.SOPClassUID for ds in first} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in first)


@requires_dicom
def test_ct_abdomen_jpeg2000_decodes_onto_the_grid_of_its_reference_labels() -> None:
    series = fill_missing_uids(read_series_folder(DICOM / "ct_abdomen"), "ct_abdomen")
    assert series[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    volume = load_series(series, str(series[0].SeriesInstanceUID))
    labels = nib.load(DICOM / "ct_abdomen_labels_totalseg.nii.gz")
    assert volume.data.shape == labels.shape == (512, 512, 20)
    # Same voxel centres in world space (the label file stores the rows in the other order).
    corners = np.array([[0, 0, 0, 1], [511, 511, 19, 1]]).T
    ours = volume.affine @ corners
    theirs = labels.affine @ np.array([[0, 511, 0, 1], [511, 0, 19, 1]]).T
    assert np.allclose(ours, theirs, atol=1e-3)
    assert -1100 < volume.data.min() < -900 and volume.data.max() > 1000  # Hounsfield units


@requires_dicom
def test_gantry_tilted_head_ct_is_refused_not_distorted() -> None:
    series = read_series_folder(DICOM / "ct_head_ge")
    uid = str(series[0].SeriesInstanceUID)
    with pytest.raises(SeriesRefused, match=r"18\.5 degrees off their normal \(gantry tilt\)") as caught:
        load_series(series, uid)
    assert uid in str(caught.value) and "uneven slice spacing" in str(caught.value)


@pytest.mark.parametrize("rgb", [(157, 108, 162), (255, 153, 0), (0, 170, 255), (0, 0, 0), (255, 255, 255)])
def test_display_colour_survives_cielab(rgb: tuple[int, int, int]) -> None:
    back = dicom_lab_to_rgb(rgb_to_dicom_lab(rgb))
    assert max(abs(a - b) for a, b in zip(back, rgb, strict=True)) <= 1


def _phantom_volume() -> tuple[Any, list]:
    """A phantom series loaded as the server loads one, and its instances in the volume's slice order."""
    series = phantom_series(np.diag([-0.8, 0.8, 2.5, 1.0]))
    volume = load_series(series, str(series[0].SeriesInstanceUID))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series}
    return volume, [by_uid[uid] for uid in volume.sop_instance_uids]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_seg_describes_every_label_and_round_trips(model: str) -> None:
    labels = MODELS[model].labels
    volume, sources = _phantom_volume()
    label = np.zeros(volume.data.shape, np.uint8)
    for k, label_id in enumerate(labels.ids):
        label[k % 12, 2:6, k % 8] = label_id
    seg = label_to_seg(label, sources, labels, model=model, series_uid=stable_uid("s"), sop_uid=stable_uid("i"))

    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    referenced = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(volume.sop_instance_uids)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [lab.name for lab in labels]
    for item, lab in zip(seg.SegmentSequence, labels, strict=True):
        assert dicom_lab_to_rgb(item.RecommendedDisplayCIELabValue) == pytest.approx(lab.color, abs=1)
        code = item.SegmentedPropertyTypeCodeSequence[0]
        if lab.snomed:
            assert (code.CodeValue, code.CodingSchemeDesignator) == (lab.snomed, "SCT")
    assert np.array_equal(seg_to_label(seg, volume.sop_instance_uids, labels), label)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_an_empty_label_is_a_seg_of_one_empty_frame_over_every_source_image(model: str) -> None:
    """highdicom writes every frame of every segment for an empty label (it cannot omit them all):
    slices x segments frames, seconds to build for a CT; one empty frame says the same."""
    labels = MODELS[model].labels
    volume, sources = _phantom_volume()
    label = np.zeros(volume.data.shape, np.uint8)
    seg = label_to_seg(label, sources, labels, model=model, series_uid=stable_uid("s"), sop_uid=stable_uid("i"))
    assert seg.NumberOfFrames == 1 and not any(seg.PixelData)
    referenced = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(volume.sop_instance_uids)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [lab.name for lab in labels]
    read = seg_to_label(dcmread(BytesIO(_written(seg))), volume.sop_instance_uids, labels)
    assert read.shape == label.shape and not read.any()


def _written(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def test_seg_refuses_values_the_model_does_not_have() -> None:
    series = phantom_series()
    label = np.full((12, 10, 8), 9, np.uint8)
    with pytest.raises(ValueError, match=r"Label values \[9\] are not labels of 'hippocampus'"):
        label_to_seg(label, series, MODELS["hippocampus"].labels, model="hippocampus", series_uid="1.2", sop_uid="1.3")


@pytest.mark.parametrize(
    ("request_", "expect_nrrd"),
    [({"result_extension": ".nrrd"}, True), ({}, False), ({"result_extension": ".nii.gz"}, False)],
)
def test_infer_result_becomes_nrrd_only_when_asked(tmp_path, request_: dict, expect_nrrd: bool) -> None:
    import nrrd

    from appcore.dicom.ohif import as_requested_format

    data = np.random.default_rng(1).integers(0, 3, (7, 5, 4)).astype(np.uint8)
    affine = np.diag([-0.9, 0.9, 2.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    label = str(tmp_path / "pred.nii.gz")
    nib.save(nib.Nifti1Image(data, affine), label)
    result = as_requested_format({"file": label, "label": label, "params": {}}, request_)
    assert result["file"].endswith(".nrrd") is expect_nrrd
    assert result["label"] == result["file"]
    if expect_nrrd:
        values, header = nrrd.read(result["file"], index_order="F")
        assert np.array_equal(values, data) and header["encoding"] == "raw"
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        assert np.allclose(header["space directions"], lps[:3, :3].T)
        assert np.allclose(header["space origin"], lps[:3, 3])
    else:
        assert result["file"] == label


@requires_dicom
def test_a_folder_must_hold_exactly_one_series(tmp_path) -> None:
    assert load_series_folder(DICOM / "ct_abdomen").data.shape == (512, 512, 20)
    for name in ("ct_abdomen", "ct_head_ge"):
        for path in sorted((DICOM / name).glob("*.dcm"))[:3]:
            shutil.copyfile(path, tmp_path / f"{name}_{path.name}")
    with pytest.raises(ValueError, match="The files hold 2 DICOM series"):
        load_series_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="The files hold 0 DICOM series"):
        load_series_folder(empty)


def test_a_listing_remembers_an_unreachable_pacs_for_its_lifetime() -> None:
    import threading
    import time

    from appcore.dicom.client import PacsUnavailable
    from appcore.dicom.datastore import _TTL

    calls: list[float] = []
    state = {"up": False}

    def query() -> list[str]:
        calls.append(time.monotonic())
        if not state["up"]:
            time.sleep(0.3)  # a timeout
            raise PacsUnavailable("PACS at x did not answer")
        return ["series"]

    listing = _TTL(60.0, query)  # long enough that a late thread cannot outlive the remembered failure
    errors: list[str] = []

    def ask() -> None:
        try:
            listing.get()
        except PacsUnavailable as e:
            errors.append(e.detail)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(errors) == 4, "one timeout, not four in turn: the others get the first one's 503"
    state["up"] = True
    listing.invalidate()  # a save elsewhere: ask again now
    assert listing.get() == ["series"] and len(calls) == 2


@pytest.mark.parametrize("kind", ["binary", "fractional", "ohif"])
def test_a_seg_another_program_wrote_reads_as_the_label_it_holds(kind: str) -> None:
    """Segments matched by name whatever their order and codes; a fractional SEG's voxel belongs to a
    segment from 0.5 on (the threshold), so a voxel a segment only touches (0.3) stays background."""
    labels = MODELS["hippocampus"].labels
    label, sources, volume = _hippocampus_phantom()
    seg = foreign_seg(label, sources, kind=kind)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Posterior", "anterior "]
    assert np.array_equal(seg_to_label(seg, volume.sop_instance_uids, labels), label)


def _hippocampus_phantom() -> tuple[np.ndarray, list, object]:
    volume, sources = _phantom_volume()
    label = np.zeros(volume.data.shape, np.uint8)
    label[2:6, 2:5, 1:4] = 1  # anterior
    label[6:10, 5:8, 3:7] = 2  # posterior
    return label, sources, volume


@pytest.mark.parametrize(("rle", "by_position"), [(True, False), (False, False), (True, True)])
def test_a_label_map_seg_reads_as_the_label_it_holds(rle: bool, by_position: bool) -> None:
    label, sources, volume = _hippocampus_phantom()
    seg = label_map_seg(label, sources, rle=rle, by_position=by_position)
    assert seg.SOPClassUID == LABEL_MAP_SEG and seg.NumberOfFrames < len(sources), "painted slices only"
    positions = [[float(v) for v in ds.ImagePositionPatient] for ds in sources]
    labels = MODELS["hippocampus"].labels
    assert np.array_equal(seg_to_label(seg, volume.sop_instance_uids, labels, positions), label)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("no_positions", r"frame 1 names none of the series' instances and lies at no slice position"),
        ("unknown_value", r"pixel values \[7\] are no segment number of its SegmentSequence \(\[1, 2\]\)"),
    ],
)
def test_a_label_map_seg_that_does_not_fit_the_series_is_refused(change: str, match: str) -> None:
    label, sources, volume = _hippocampus_phantom()
    if change == "unknown_value":
        label[0, 0, 0] = 7  # written as it is: 7 is no segment
    seg = label_map_seg(label, sources, rle=False, by_position=True)
    if change == "unknown_value":
        pixels = seg.pixel_array.copy()
        pixels[0, 0, 0] = 7
        seg.PixelData = pixels.tobytes()
    positions = None if change == "no_positions" else [[float(v) for v in ds.ImagePositionPatient] for ds in sources]
    with pytest.raises(ValueError, match=match):
        seg_to_label(seg, volume.sop_instance_uids, MODELS["hippocampus"].labels, positions)

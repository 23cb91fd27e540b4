from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from appcore.errors import RequestError
from appcore.validation import (
    Geometry,
    check_device,
    check_image_id,
    check_upload_size,
    label_from_buffer,
    load_nifti,
    validate_label_volume,
)
from tests.conftest import write_nifti


@pytest.mark.parametrize(
    "good", ["hippocampus_001", "case.1", "a-b_c", "spleen 2", "Ünïcøde", "1.2." + "9" * 60, "a" * 200]
)
def test_plain_ids_pass(good: str) -> None:
    assert check_image_id(good) == good


@pytest.mark.parametrize(
    "bad",
    ["", "  ", "../x", "..", "a/b", "/etc/passwd", "a\\b", "~root", "a\x00b", None, 3, ".hidden", "a" * 201, "é" * 101],
)
def test_path_ids_refused(bad: object) -> None:
    with pytest.raises(RequestError, match="(?i)image id") as e:
        check_image_id(bad)
    assert e.value.status_code == 400


@pytest.mark.parametrize("bad", ["a\nb", "a\tb", "a\x00b", "a\rb", "a\x7fb", "a\x1bb"])
def test_ids_with_control_characters_are_refused(bad: str) -> None:
    with pytest.raises(RequestError, match="contains a control character") as e:
        check_image_id(bad)
    assert e.value.status_code == 400


GEOM = Geometry(shape=(8, 9, 10), affine=np.diag([1.5, 1.5, 3.0, 1.0]))


def _label(data: np.ndarray, affine: np.ndarray = GEOM.affine) -> nib.Nifti1Image:
    return nib.Nifti1Image(data, affine)


@pytest.mark.parametrize(
    ("data", "affine", "match"),
    [
        (
            np.zeros((8, 9, 11), np.uint8),
            GEOM.affine,
            r"Label shape \(8, 9, 11\) does not match the image shape \(8, 9, 10\)",
        ),
        (np.zeros((8, 9, 10), np.uint8), np.diag([1.0, 1.5, 3.0, 1.0]), "voxel-to-world affines differ"),
        (np.full((8, 9, 10), 0.5, np.float32), GEOM.affine, "must be integers"),
        (np.full((8, 9, 10), 1.01, np.float32), GEOM.affine, "must be integers"),
        (
            np.full((8, 9, 10), 7, np.uint8),
            GEOM.affine,
            r"values \[7\] that are not class ids; allowed values: \[0, 1, 2\]",
        ),
        (np.zeros((8, 9), np.uint8), GEOM.affine, "must be a 3D volume"),
        (np.full((8, 9, 10), np.nan, np.float32), GEOM.affine, "NaN"),
    ],
)
def test_bad_labels_refused(data: np.ndarray, affine: np.ndarray, match: str) -> None:
    with pytest.raises(RequestError, match=match) as e:
        validate_label_volume(_label(data, affine), GEOM, {0, 1, 2})
    assert e.value.status_code == 422


@pytest.mark.parametrize(
    "data",
    [
        np.ones((8, 9, 10), np.uint8),
        np.full((8, 9, 10), 2.0, np.float32),  # float labels with integral values (two shared cases)
        np.ones((8, 9, 10, 1), np.int16),  # 4D with a singleton channel
    ],
)
def test_good_labels_become_uint8(data: np.ndarray) -> None:
    out = validate_label_volume(_label(data), GEOM, {0, 1, 2})
    assert out.dtype == np.uint8 and out.shape == GEOM.shape


def test_a_label_stored_with_a_scale_slope_reads_as_its_class_ids(tmp_path: Path) -> None:
    stored = nib.Nifti1Image(np.full((8, 9, 10), 20, np.int16), GEOM.affine)
    stored.header.set_slope_inter(0.1, 0)  # 20 x 0.1 = 2.0000000298 in float32
    path = tmp_path / "scaled.nii.gz"
    nib.save(stored, path)
    assert not np.array_equal(np.asanyarray(nib.load(path).dataobj), np.full((8, 9, 10), 2.0))
    out = validate_label_volume(nib.load(path), GEOM, {0, 1, 2})
    assert out.dtype == np.uint8 and np.all(out == 2)


def test_load_nifti_errors(tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "good.nii.gz", np.ones((4, 4, 4), np.float32))
    assert load_nifti(good, "image").shape == (4, 4, 4)

    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[:60])
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image")
    for path in (truncated, garbage):
        with pytest.raises(RequestError, match="not a readable NIfTI") as e:
            load_nifti(path, "label")
        assert e.value.status_code == 422


def test_load_nifti_without_extension(tmp_path: Path) -> None:
    raw = nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), np.eye(4)).to_bytes()
    path = tmp_path / "tmpupload"
    path.write_bytes(gzip.compress(raw))
    assert load_nifti(path, "label").shape == (3, 3, 3)


@pytest.mark.parametrize("named", [True, False], ids=["nii.gz", "no extension"])
def test_small_gzip_with_large_voxel_data_is_refused_before_it_is_read(tmp_path: Path, named: bool) -> None:
    # 2 MB of zeros compresses to a few kB: the size of the upload does not bound the memory.
    raw = nib.Nifti1Image(np.zeros((128, 128, 128), np.uint8), np.eye(4)).to_bytes()
    path = tmp_path / ("bomb.nii.gz" if named else "tmpupload")
    path.write_bytes(gzip.compress(raw))
    assert path.stat().st_size < 64 * 1024
    with pytest.raises(RequestError, match="over 1 MB of voxel data once decompressed") as e:
        load_nifti(path, "label", max_mb=1)
    assert e.value.status_code == 413
    assert load_nifti(path, "label", max_mb=2).shape == (128, 128, 128)
    assert load_nifti(path, "label").shape == (128, 128, 128)


def test_upload_size(tmp_path: Path) -> None:
    empty = tmp_path / "e"
    empty.write_bytes(b"")
    with pytest.raises(RequestError, match="empty") as e:
        check_upload_size(empty, 1, "label")
    assert e.value.status_code == 422
    big = tmp_path / "b"
    big.write_bytes(b"x" * (2 * 1024 * 1024))
    with pytest.raises(RequestError, match="limit is 1 MB") as e:
        check_upload_size(big, 1, "label")
    assert e.value.status_code == 413


def test_a_raw_label_buffer_becomes_a_label_on_the_image_grid(tmp_path: Path) -> None:
    affine = np.array([[0, 0, -2.0, 10], [0, 1.5, 0, -4], [0.8, 0, 0, 3], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros((4, 3, 2), np.int16), affine), tmp_path / "image.nii.gz")
    label = np.arange(24, dtype=np.uint8).reshape(4, 3, 2) % 3
    (tmp_path / "label.bin").write_bytes(label.tobytes(order="F"))  # x fastest, as OHIF sends it
    out = nib.load(label_from_buffer(tmp_path / "image.nii.gz", tmp_path / "label.bin"))
    assert np.array_equal(np.asarray(out.dataobj), label) and np.allclose(out.affine, affine)
    (tmp_path / "short.bin").write_bytes(label.tobytes()[:-1])
    with pytest.raises(RequestError, match="holds 23 bytes; the image's 4 x 3 x 2 grid needs 24") as e:
        label_from_buffer(tmp_path / "image.nii.gz", tmp_path / "short.bin")
    assert e.value.status_code == 422


@pytest.mark.parametrize("device", [None, "", [], "cpu", "cuda", "cuda:0", ["cpu", "cuda"]])
def test_devices_torch_can_use_pass(device: object) -> None:
    check_device(device, "Infer")


@pytest.mark.parametrize("device", ["x", 5, [5], "cuda:x", "cuda:", "gpu", {"cpu": 1}])
def test_other_devices_are_a_422(device: object) -> None:
    with pytest.raises(RequestError, match="Infer parameter 'device' must be 'cpu', 'cuda' or 'cuda:N'") as e:
        check_device(device, "Infer")
    assert e.value.status_code == 422


_ROTATED = nib.affines.from_matvec(np.array([[0.0, 0.0, -0.5], [0.8, 0.0, 0.0], [0.0, -0.8, 0.0]]), [10.0, 0.0, 0.0])


@pytest.mark.parametrize(
    ("shape", "affine", "spacing", "refused"),
    [
        ((512, 512, 1200), np.diag([0.7, 0.7, 0.5, 1.0]), (2.0, 2.0, 3.0), False),  # a whole-body CT
        ((256, 256, 256), np.eye(4), (1.0, 1.0, 1.0), False),  # a brain MR
        ((512, 512, 512), np.eye(4), (1.0, 1.0, 1.0), False),  # exactly the limit
        ((512, 512, 513), np.eye(4), (1.0, 1.0, 1.0), True),
        ((35, 51, 35), np.diag([1000.0, 1000.0, 1000.0, 1.0]), (1.0, 1.0, 1.0), True),  # metres
        # voxel axes permuted (A, S, R): 64 x 64 x 1000 voxels of 0.8 x 0.8 x 0.5 mm
        ((64, 64, 1000), _ROTATED, (1.0, 0.2, 0.2), False),  # 250 R x 256 A x 256 S at this spacing
        ((64, 64, 1000), _ROTATED, (0.1, 0.1, 0.1), True),  # 5000 x 512 x 512
    ],
)
def test_a_volume_is_refused_only_when_its_resampled_grid_is_too_large(
    shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, ...], refused: bool
) -> None:
    from appcore.validation import check_resampled_size

    if refused:
        with pytest.raises(RequestError, match=f"The image is {' x '.join(map(str, shape))} voxels") as e:
            check_resampled_size(shape, affine, spacing, "image")
        assert e.value.status_code == 422
    else:
        check_resampled_size(shape, affine, spacing, "image")


def test_the_refusal_names_the_grid_along_each_axis_as_the_model_resamples() -> None:
    from appcore.validation import check_resampled_size

    # voxel axes 0, 1, 2 lie along A, S, R: 51.2 mm at 0.1 mm, 51.2 mm at 0.4 mm, 500 mm at 2 mm
    with pytest.raises(RequestError, match=r"\(2 x 0.1 x 0.4 mm\) that is 512 x 128 x 250 voxels, over the 1,000 "):
        check_resampled_size((64, 64, 1000), _ROTATED, (2.0, 0.1, 0.4), "image", limit=1000)

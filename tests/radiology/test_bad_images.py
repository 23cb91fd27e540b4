"""Images a model cannot read get a 422 that says why; images with a few non-finite voxels still work."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from appcore.app import request_files
from appcore.errors import RequestError
from radiology.transforms import FiniteValuesd
from tests.apps import CASES, make_app
from tests.conftest import SPLEEN, requires_shared


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),
        ([float("nan"), 2.0, 3.0], [2.0, 2.0, 3.0]),
        ([-1.0, float("inf"), float("-inf")], [-1.0, -1.0, -1.0]),
        ([float("nan")] * 3, [0.0, 0.0, 0.0]),
    ],
)
def test_non_finite_voxels_become_the_finite_minimum(values: list[float], expected: list[float]) -> None:
    image = MetaTensor(torch.tensor([[values]]), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    out = FiniteValuesd(keys="image")({"image": image})["image"]
    assert torch.equal(out, torch.tensor([[expected]]))
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, image.affine)
    if values == expected:
        assert out is image, "a finite image is passed on as it is"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    return make_app(tmp_path_factory.mktemp("bad_images"), "hippocampus", labelled=0)


def _upload(tmp_path: Path, name: str, data: np.ndarray, affine: np.ndarray) -> str:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), path)
    return str(path)


def _infer(app, image: str | Path) -> dict:
    """``app.infer`` of an uploaded file, as the infer endpoint passes the file it wrote for the request."""
    with request_files({str(image)}):
        return app.infer({"model": "hippocampus", "image": str(image)})


def _label(app, image: str) -> np.ndarray:
    return np.asarray(nib.load(_infer(app, image)["file"]).dataobj)


@requires_shared
def test_a_few_nan_voxels_do_not_empty_the_prediction(app, tmp_path: Path) -> None:
    src = nib.load(CASES["hippocampus"][0][0])
    data = src.get_fdata(dtype=np.float32)
    clean = _label(app, _upload(tmp_path, "clean.nii.gz", data, src.affine))
    data[0, 0, :] = np.nan
    data[-1, -1, -1] = np.inf
    with_nan = _label(app, _upload(tmp_path, "nan.nii.gz", data, src.affine))
    assert (clean > 0).sum() > 1000
    agreement = ((with_nan > 0) & (with_nan == clean)).sum() * 2 / ((clean > 0).sum() + (with_nan > 0).sum())
    assert agreement > 0.95, agreement


@requires_shared
@pytest.mark.parametrize(
    ("shape", "refused"),
    [((35, 51), True), ((35, 51, 35, 2), True), ((35, 51, 35, 1), False), ((35, 51, 35), False)],
)
def test_only_volumes_are_segmented(app, tmp_path: Path, shape: tuple[int, ...], refused: bool) -> None:
    affine = nib.load(CASES["hippocampus"][0][0]).affine
    path = _upload(tmp_path, "upload.nii.gz", np.random.default_rng(0).random(shape, np.float32), affine)
    if refused:
        with pytest.raises(RequestError, match="must be a 3D volume") as e:
            _infer(app, path)
        assert e.value.status_code == 422
    else:
        assert _label(app, path).shape == shape[:3]


@requires_shared
@pytest.mark.parametrize("value", [0.0, 417.0, float("nan"), float("inf")])
def test_a_uniform_image_is_a_422_not_the_network_guessing_on_a_blank(app, tmp_path: Path, value: float) -> None:
    # A blank or all-NaN volume would otherwise get whatever the network predicts on no signal at all.
    src = nib.load(CASES["hippocampus"][0][0])
    path = _upload(tmp_path, "uniform.nii.gz", np.full(src.shape, value, np.float32), src.affine)
    with pytest.raises(RequestError, match="same value .*nothing to segment") as e:
        _infer(app, path)
    assert e.value.status_code == 422


@requires_shared
def test_an_upload_too_large_once_resampled_is_a_422_not_a_failed_allocation(app, tmp_path: Path) -> None:
    path = tmp_path / "metres.nii.gz"
    _metres(path)
    with pytest.raises(RequestError, match="uploaded image is 35 x 51 x 35 voxels.*over the 134,217,728") as e:
        _infer(app, path)
    assert e.value.status_code == 422


def _flat(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.ones((20, 30), np.float32), np.eye(4)), path)


def _cut(path: Path) -> None:  # the header reads, the voxels stop short
    path.write_bytes(CASES["hippocampus"][0][0].read_bytes()[:5000])


def _metres(path: Path) -> None:  # a voxel size in metres read as millimetres
    nib.save(nib.Nifti1Image(np.ones((35, 51, 35), np.float32), np.diag([1000.0, 1000.0, 1000.0, 1.0])), path)


def _micrometres(path: Path) -> None:  # a voxel size in metres written as if in kilometres, say
    nib.save(nib.Nifti1Image(np.ones((35, 51, 35), np.float32), np.diag([0.001, 0.001, 0.001, 1.0])), path)


def _rgb(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((20, 30, 10), [("R", "u1"), ("G", "u1"), ("B", "u1")]), np.eye(4)), path)


def _complex(path: Path) -> None:  # MR phase data, say
    nib.save(nib.Nifti1Image(np.ones((20, 30, 10), np.complex64), np.eye(4)), path)


@requires_shared
@pytest.mark.parametrize(
    ("write", "match"),
    [(_rgb, r"holds .* voxels \(RGB"), (_complex, r"holds complex-valued voxels \(complex64\)")],
)
def test_an_upload_of_non_scalar_voxels_is_a_422_that_says_so(app, tmp_path: Path, write, match: str) -> None:
    path = tmp_path / "upload.nii.gz"
    write(path)
    with pytest.raises(RequestError, match=f"The uploaded image {match}") as e:
        _infer(app, path)
    assert e.value.status_code == 422


@requires_shared
@pytest.mark.parametrize(
    ("name", "write", "match"),
    [
        ("flat", _flat, "image 'flat' must be a 3D volume"),
        ("cut", _cut, "image 'cut' cannot be read: EOFError"),
        ("metres", _metres, "image 'metres' is 35 x 51 x 35 voxels of 1000 x 1000 x 1000 mm.*35000 x 51000 x 35000"),
        ("tiny", _micrometres, r"image 'tiny' is 35 x 51 x 35 voxels of 0.001 .* mm\) that is a single voxel"),
        ("rgb", _rgb, r"image 'rgb' holds .* voxels \(RGB or another non-scalar type\)"),
        ("complex", _complex, r"image 'complex' holds complex-valued voxels \(complex64\): send a magnitude image"),
    ],
)
def test_a_stored_image_that_cannot_be_segmented_is_a_422_by_id(app, name: str, write, match: str) -> None:
    write(Path(app.studies) / f"{name}.nii.gz")
    app.datastore().refresh()
    with pytest.raises(RequestError, match=match) as e:
        app.infer({"model": "hippocampus", "image": name})
    assert e.value.status_code == 422


@requires_shared
def test_batch_infer_skips_an_unreadable_image_and_labels_the_others(app) -> None:
    studies = Path(app.studies)
    (studies / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not a volume")
    app.datastore().refresh()
    with pytest.raises(RequestError, match="image 'broken' is not a readable NIfTI") as e:
        app.infer({"model": "hippocampus", "image": "broken"})
    assert e.value.status_code == 422

    good = CASES["hippocampus"][0][0].name.split(".")[0]
    result = app.batch_infer({"model": "hippocampus", "images": ["broken", good]})
    assert "not a readable NIfTI" in result["broken"]["skipped"]
    assert result[good]["tag"] == "original"
    label = nib.load(app.datastore().get_label_uri(good, "original"))
    assert label.shape == nib.load(CASES["hippocampus"][0][0]).shape


@requires_shared
def test_scoring_skips_images_it_cannot_rank_and_scores_the_others(app) -> None:
    studies, source = Path(app.studies), CASES["hippocampus"][0][0]
    affine = nib.load(source).affine
    nib.save(nib.Nifti1Image(np.full((30, 40, 30), np.nan, np.float32), affine), studies / "blank.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((20, 30), np.float32), np.eye(4)), studies / "flat2.nii.gz")
    (studies / "cut2.nii.gz").write_bytes(source.read_bytes()[:5000])
    _complex(studies / "complex2.nii.gz")  # infer refuses these two, so scoring skips them too
    _metres(studies / "metres2.nii.gz")
    shutil.copyfile(SPLEEN / "imagesTr" / "spleen_2.nii.gz", studies / "ct2.nii.gz")  # CT in an MR model's folder
    app.datastore().refresh()
    result = app._scoring_methods["epistemic"]({}, app.datastore())
    skipped = result["skipped"]
    assert skipped["blank"] == "ValueError: the image is constant: there is nothing to segment"
    assert skipped["flat2"].startswith("ValueError: not a 3D volume")
    assert skipped["cut2"].startswith("EOFError"), skipped
    assert skipped["complex2"].startswith("The image holds complex-valued voxels (complex64)")
    assert skipped["metres2"].startswith("The image is 35 x 51 x 35 voxels of 1000 x 1000 x 1000 mm")
    # A CT is out of distribution for the MR model: ranked, it topped every uncertainty ranking.
    assert skipped["ct2"] == (
        "ValueError: the image is no MR (voxels below -500) and hippocampus segments MR: "
        "strategies rank images for hippocampus"
    )
    unrankable = {"blank", "flat2", "cut2", "complex2", "metres2", "ct2"}
    scored = app.score_store().load()
    assert {c[0].name.split(".")[0] for c in CASES["hippocampus"]} <= set(scored), "the real cases are ranked"
    assert not unrankable & set(scored), "nothing unrankable is ranked"
    for name in ("random", "epistemic", "diversity"):
        picked = app._strategies[name]({"k": 50, "client_id": name}, app.datastore())
        assert picked and set(picked["ids"]) >= {c[0].name.split(".")[0] for c in CASES["hippocampus"]}, picked
        assert not unrankable & set(picked["ids"]), f"{name} hands out an image it cannot use"
        for image_id in picked["ids"]:  # free them for the next strategy
            app.book.release(image_id)


@requires_shared
def test_a_ct_among_mr_is_left_to_the_ct_model_served_beside_and_still_handed_out(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """In a folder or PACS served by an MR and a CT model, the MR model's scoring cannot rank a CT, but
    the CT model's annotators label it: it is not set aside as unusable (which hid every CT series
    from every strategy once the MR model had been rescored), and not scored again each run."""
    both = {"models": "hippocampus,organs_ct"}
    app = make_app(tmp_path_factory.mktemp("mixed"), "hippocampus", labelled=0, conf=both)
    shutil.copyfile(SPLEEN / "imagesTr" / "spleen_2.nii.gz", Path(app.studies) / "ct2.nii.gz")
    app.datastore().refresh()
    scoring, store = app._scoring_methods["epistemic"], app.score_store()
    result = scoring({}, app.datastore())
    assert "ct2" not in result["skipped"] and "ct2" not in store.unusable() and "ct2" not in store.load()
    assert result["out_of_scope"]["ct2"].endswith("strategies rank images for hippocampus; handed out for organs_ct")
    assert "ct2" not in app.unscored_images(), "next-sample requests do not start a scoring run for it"
    for name in ("random", "epistemic"):
        picked = app._strategies[name]({"k": 50, "client_id": name}, app.datastore())
        assert "ct2" in picked["ids"], f"{name} never hands out the CT"
        if name == "epistemic":
            assert picked["ids"][-1] == "ct2", "ranked after every scored image"
        for image_id in picked["ids"]:
            app.book.release(image_id)
    again = scoring({}, app.datastore())
    assert again["out_of_scope"] == {} and store.out_of_scope().keys() == {"ct2"}, "not loaded again"


@requires_shared
def test_an_image_written_over_in_the_studies_folder_loses_its_score(app, tmp_path: Path) -> None:
    """The same for a file written over outside the server (a re-export into the folder): noticed when
    the datastore next reconciles (the folder watcher, or the next start)."""
    store = app.score_store()
    app._scoring_methods["epistemic"]({}, app.datastore())
    case = CASES["hippocampus"][1][1].name.split(".")[0]
    assert case in store.load() and case not in app.unscored_images()
    image = Path(app.datastore().get_image_uri(case))
    source = nib.load(image)
    old_score = store.load()[case]
    brighter = np.asarray(source.dataobj, np.float32) * 1.5
    nib.save(nib.Nifti1Image(np.flip(brighter, 0).copy(), source.affine), image)  # another image, same grid
    later = image.stat().st_mtime + 5
    os.utime(image, (later, later))
    app.datastore().refresh()
    assert case not in store.load() and case in app.unscored_images()
    app._scoring_methods["epistemic"]({}, app.datastore())  # the next run scores the new file
    assert store.load()[case].value != old_score.value and case not in app.unscored_images()


def test_an_image_replaced_by_upload_loses_the_score_of_the_old_file(app, tmp_path: Path) -> None:
    """A score describes the file it was computed on: once the file is replaced, the image is unscored
    (ranked after the scored ones, and scored by the next run) instead of ranked as the old file was."""
    store = app.score_store()
    app._scoring_methods["epistemic"]({}, app.datastore())
    case = CASES["hippocampus"][1][0].name.split(".")[0]
    assert case in store.load() and case not in app.unscored_images()
    source = nib.load(CASES["hippocampus"][1][0])
    blank = _upload(tmp_path, "blank.nii.gz", np.zeros(source.shape, np.float32), source.affine)
    app.datastore().add_image(case, blank, {})
    try:
        assert case not in store.load() and case in app.unscored_images()
        picked = app._strategies["epistemic"]({"k": 50, "client_id": "replaced"}, app.datastore())
        assert picked["ids"][-1] == case, "ranked after every scored image"
        for image_id in picked["ids"]:
            app.book.release(image_id)
        result = app._scoring_methods["epistemic"]({}, app.datastore())
        assert result["skipped"][case] == "ValueError: the image is constant: there is nothing to segment"
    finally:  # the module's other tests rank this case: put the real image back
        app.datastore().add_image(case, str(CASES["hippocampus"][1][0]), {})

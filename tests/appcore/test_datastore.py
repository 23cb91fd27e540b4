from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from monailabel.datastore.local import LocalDatastore

from appcore.datastore import CheckedLocalDatastore
from appcore.errors import RequestError
from tests.apps import unwatched_app
from tests.conftest import HIPPO, records_rewritten_during, requires_shared, write_nifti


@pytest.fixture
def store(tmp_path: Path, oblique_affine: np.ndarray) -> CheckedLocalDatastore:
    studies = tmp_path / "studies"
    studies.mkdir()
    write_nifti(
        studies / "case1.nii.gz", np.random.default_rng(0).normal(size=(10, 12, 8)).astype(np.float32), oblique_affine
    )
    return CheckedLocalDatastore(str(studies), allowed_values=lambda params: {0, 1, 2}, max_upload_mb=1)


def _label_file(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    return str(write_nifti(path, data, affine))


def test_good_label_is_saved_on_the_image_grid(store: CheckedLocalDatastore, tmp_path: Path, oblique_affine) -> None:
    data = np.zeros((10, 12, 8), np.float32)
    data[2:5, 3:6, 1:4] = 2
    store.save_label("case1", _label_file(tmp_path / "l.nii.gz", data, oblique_affine), "final", {})
    saved = nib.load(store.get_label_uri("case1", "final"))
    assert saved.get_data_dtype() == np.uint8
    np.testing.assert_allclose(saved.affine, oblique_affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), data.astype(np.uint8))
    assert store.get_unlabeled_images("final") == []


@pytest.mark.parametrize(
    ("make", "status", "match"),
    [
        (lambda p, a: _label_file(p, np.zeros((10, 12, 9), np.uint8), a), 422, "does not match the image shape"),
        (lambda p, a: _label_file(p, np.zeros((10, 12, 8), np.uint8), np.eye(4)), 422, "affines differ"),
        (lambda p, a: _label_file(p, np.full((10, 12, 8), 5, np.uint8), a), 422, r"values \[5\]"),
        (lambda p, a: (p.write_bytes(b"\x1f\x8b garbage"), str(p))[1], 422, "not a readable NIfTI"),
        (lambda p, a: (p.write_bytes(b""), str(p))[1], 422, "empty"),
        (lambda p, a: (p.write_bytes(b"0" * (2 * 2**20)), str(p))[1], 413, "limit is 1 MB"),
        (lambda p, a: _label_file(p, np.zeros((128, 128, 128), np.uint8), a), 413, "once decompressed"),
    ],
)
def test_bad_label_is_refused_and_the_previous_one_survives(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine, make, status: int, match: str
) -> None:
    first = np.ones((10, 12, 8), np.uint8)
    store.save_label("case1", _label_file(tmp_path / "first.nii.gz", first, oblique_affine), "final", {})
    before = Path(store.get_label_uri("case1", "final")).read_bytes()

    with pytest.raises(RequestError, match=match) as e:
        store.save_label("case1", make(tmp_path / "bad.nii.gz", oblique_affine), "final", {})
    assert e.value.status_code == status
    assert Path(store.get_label_uri("case1", "final")).read_bytes() == before
    leftovers = [p.name for p in Path(store.get_label_uri("case1", "final")).parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize(("image_id", "status"), [("../case1", 400), ("a/b", 400), ("missing", 404)])
def test_bad_ids(store: CheckedLocalDatastore, tmp_path: Path, oblique_affine, image_id: str, status: int) -> None:
    label = _label_file(tmp_path / "l.nii.gz", np.zeros((10, 12, 8), np.uint8), oblique_affine)
    with pytest.raises(RequestError) as e:
        store.save_label(image_id, label, "final", {})
    assert e.value.status_code == status
    with pytest.raises(RequestError) as e:
        store.get_image_uri(image_id)
    assert e.value.status_code == status


def test_label_tag_cannot_escape(store: CheckedLocalDatastore, tmp_path: Path, oblique_affine) -> None:
    label = _label_file(tmp_path / "l.nii.gz", np.zeros((10, 12, 8), np.uint8), oblique_affine)
    with pytest.raises(RequestError, match="Label tag '../../evil' contains a path"):
        store.save_label("case1", label, "../../evil", {})


# (call, status, message): MONAI Label's local datastore answers these with {} or a 500.
_UNKNOWN = [
    (lambda s: s.get_image_info("missing"), 404, "'missing' is not in the datastore"),
    (lambda s: s.update_image_info("missing", {"a": 1}), 404, "'missing' is not in the datastore"),
    (lambda s: s.remove_image("missing"), 404, "'missing' is not in the datastore"),
    (lambda s: s.remove_image("../case1"), 400, "contains a path"),
    (lambda s: s.get_label_info("missing", "final"), 404, "'missing' is not in the datastore"),
    (lambda s: s.get_label_info("case1", "final"), 404, "'case1' has no 'final' label"),
    (lambda s: s.update_label_info("case1", "final", {"a": 1}), 404, "'case1' has no 'final' label"),
    (lambda s: s.remove_label("case1", "final"), 404, "'case1' has no 'final' label"),
    (lambda s: s.remove_label("../x", "final"), 400, "contains a path"),
    (lambda s: s.remove_label("case1", "../final"), 400, "Label tag '../final' contains a path"),
    (lambda s: s.get_dataset_archive(None), 404, "no dataset to download"),
]


@pytest.mark.parametrize(("call", "status", "match"), _UNKNOWN)
def test_unknown_images_and_labels_get_4xx(store: CheckedLocalDatastore, call, status: int, match: str) -> None:
    with pytest.raises(RequestError, match=match) as e:
        call(store)
    assert e.value.status_code == status
    assert store.list_images() == ["case1"]


def test_info_and_removal_of_existing_entries(store: CheckedLocalDatastore, tmp_path: Path, oblique_affine) -> None:
    label = _label_file(tmp_path / "l.nii.gz", np.ones((10, 12, 8), np.uint8), oblique_affine)
    store.save_label("case1", label, "final", {"by": "reader 1"})
    store.update_image_info("case1", {"note": "motion"})
    assert store.get_image_info("case1")["note"] == "motion"
    store.update_label_info("case1", "final", {"checked": True})
    assert store.get_label_info("case1", "final")["by"] == "reader 1"
    assert store.get_label_info("case1", "final")["checked"] is True
    assert Path(store.get_dataset_archive(None)).is_file()
    uri = Path(store.get_label_uri("case1", "final"))
    store.remove_label("case1", "final")
    assert not uri.exists() and store.get_labeled_images() == []
    store.remove_image("case1")
    assert store.list_images() == []


def test_a_removed_label_of_a_new_tag_is_no_longer_listed(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine
) -> None:
    """In the server the folder watcher, not ``remove_label``, updated the records, and it watches only
    the tag folders there were at start-up: a label of a tag made later stayed listed once deleted."""
    store._auto_reload = True  # as in the server (without starting a watcher thread in a test)
    label = _label_file(tmp_path / "l.nii.gz", np.ones((10, 12, 8), np.uint8), oblique_affine)
    store.save_label("case1", label, "reader2", {})
    assert "reader2" in store.json()["objects"]["case1"]["labels"]
    store.remove_label("case1", "reader2")
    assert "reader2" not in store.json()["objects"]["case1"]["labels"]
    assert "reader2" not in store.status()["label_tags"]
    with pytest.raises(RequestError) as e:
        store.remove_label("case1", "reader2")
    assert e.value.status_code == 404


@pytest.fixture
def labelled(store: CheckedLocalDatastore, tmp_path: Path, oblique_affine) -> CheckedLocalDatastore:
    """``store`` with a ``final`` label saved on case1."""
    label = _label_file(tmp_path / "l.nii.gz", np.ones((10, 12, 8), np.uint8), oblique_affine)
    store.save_label("case1", label, "final", {})
    return store


def test_a_save_while_another_process_rewrote_the_records_keeps_its_label(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process (a training's or scoring's own datastore) may write the records file while a
    label is being checked; the watcher's re-read then replaces the records. The save must land in
    the records as they are, not in the copy it looked up before."""
    import appcore.datastore

    other = CheckedLocalDatastore(str(tmp_path / "studies"), allowed_values=lambda params: {0, 1, 2})
    records_rewritten_during(monkeypatch, appcore.datastore, "validate_label_volume", store, other, "case1")
    label = _label_file(tmp_path / "l.nii.gz", np.ones((10, 12, 8), np.uint8), oblique_affine)
    store.save_label("case1", label, "final", {"model": "hippocampus"})
    assert store.get_label_info("case1", "final")["model"] == "hippocampus"
    assert store.get_image_info("case1")["note"] == "from another process"
    again = CheckedLocalDatastore(str(tmp_path / "studies"), allowed_values=lambda params: {0, 1, 2})
    assert again.get_label_info("case1", "final")["model"] == "hippocampus", "the records file lacks the save"


def test_an_upload_over_an_image_keeps_a_label_saved_meanwhile(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new file for a labelled image keeps its labels; a label another request saves while the
    upload is checked must be among them, not lost with the list the upload looked at first."""
    first = _label_file(tmp_path / "o.nii.gz", np.ones((10, 12, 8), np.uint8), oblique_affine)
    store.save_label("case1", first, "original", {})
    upload = tmp_path / "up" / "case1.nii.gz"
    upload.parent.mkdir()
    shutil.copy(store.get_image_uri("case1"), upload)
    same_grid = CheckedLocalDatastore._same_grid
    saving: list[threading.Thread] = []

    def meanwhile(self, current, new):
        final = _label_file(tmp_path / "f.nii.gz", np.ones((10, 12, 8), np.uint8), oblique_affine)
        saver = threading.Thread(target=self.save_label, args=("case1", final, "final", {"model": "hippocampus"}))
        saver.start()
        saving.append(saver)
        saver.join(0.5)  # long enough to finish, unless it must wait for the upload
        return same_grid(self, current, new)

    monkeypatch.setattr(CheckedLocalDatastore, "_same_grid", meanwhile)
    store.add_image("case1", str(upload), {})
    saving[0].join(10)
    assert sorted(store.get_labels_by_image_id("case1")) == ["final", "original"]
    assert store.get_label_info("case1", "final")["model"] == "hippocampus"


def test_a_label_saved_after_its_image_was_removed_is_refused(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that reaches the records after a removal deleted the image's file (its record not yet
    dropped) would leave a label for no image, which a later upload under that id would inherit."""
    import appcore.datastore

    checked = appcore.datastore.validate_label_volume

    def meanwhile(*args, **kwargs):
        Path(store.get_image_uri("case1")).unlink()  # DELETE /datastore/image, halfway
        return checked(*args, **kwargs)

    monkeypatch.setattr(appcore.datastore, "validate_label_volume", meanwhile)
    label = _label_file(tmp_path / "l.nii.gz", np.ones((10, 12, 8), np.uint8), oblique_affine)
    with pytest.raises(RequestError, match="was removed while its label was being saved") as e:
        store.save_label("case1", label, "final", {})
    assert e.value.status_code == 409
    assert not list(Path(store._datastore.label_path("final")).glob("case1*")), "no label file left behind"


def test_the_watcher_s_reread_of_the_records_waits_for_a_change_in_progress(
    store: CheckedLocalDatastore, tmp_path: Path
) -> None:
    """MONAI Label's watcher replaces the records whole when their file changes on disk; meanwhile a
    request changing a record (``_changing_records``) would write into a copy no longer served."""
    other = CheckedLocalDatastore(str(tmp_path / "studies"), allowed_values=lambda params: {0, 1, 2})
    time.sleep(0.05)
    other.update_image_info("case1", {"note": "from another process"})  # the records file changes
    event = SimpleNamespace(src_path=store._datastore_config_path, is_directory=False)
    store._ignore_event_config = False  # the event of its own last write has passed
    before = store._datastore
    with store._records_lock:
        watcher = threading.Thread(target=store._on_modify_event, args=(event,))
        watcher.start()
        watcher.join(0.5)
        assert watcher.is_alive() and store._datastore is before, "re-read the records under a change"
    watcher.join(10)
    assert store._datastore is not before and store.get_image_info("case1")["note"] == "from another process"


def test_info_read_can_be_sent_back_with_a_new_field(labelled: CheckedLocalDatastore) -> None:
    store = labelled
    image_before = store.get_image_info("case1")
    store.update_image_info("case1", {**image_before, "note": "motion"})
    assert store.get_image_info("case1") == {**image_before, "note": "motion"}
    assert "path" not in store._datastore.objects["case1"].image.info  # answers add it; it is not stored

    label_before = store.get_label_info("case1", "final")
    store.update_label_info("case1", "final", {**label_before, "checked": True})
    assert store.get_label_info("case1", "final") == {**label_before, "checked": True}


@pytest.mark.parametrize(
    ("target", "change", "refused"),
    [
        ("image", {"ts": 1}, "ts"),
        ("image", {"name": "other.nii.gz"}, "name"),
        ("image", {"path": "/etc/passwd"}, "path"),
        ("image", {"ts": 1, "name": "x"}, "name, ts"),
        ("label", {"ts": 1}, "ts"),
        ("label", {"name": "other.nii.gz"}, "name"),
    ],
)
def test_server_info_fields_cannot_be_changed(
    labelled: CheckedLocalDatastore, target: str, change: dict, refused: str
) -> None:
    store = labelled
    read, update = {
        "image": (lambda: store.get_image_info("case1"), lambda i: store.update_image_info("case1", i)),
        "label": (
            lambda: store.get_label_info("case1", "final"),
            lambda i: store.update_label_info("case1", "final", i),
        ),
    }[target]
    before = read()
    with pytest.raises(RequestError, match=f"info field\\(s\\) {refused} are set by the server") as e:
        update({"note": "sent with it", **change})
    assert e.value.status_code == 422
    assert read() == before  # nothing of the refused request was stored


def test_label_info_answers_are_copies(labelled: CheckedLocalDatastore) -> None:
    store = labelled
    store.get_label_info("case1", "final")["ts"] = 1
    assert store.get_label_info("case1", "final")["ts"] != 1


def test_an_unreadable_file_is_named_without_the_server_s_folders(tmp_path: Path) -> None:
    from appcore.validation import load_nifti

    path = tmp_path / "upload.nii.gz"
    path.write_bytes(b"no gzip here")
    with pytest.raises(RequestError, match="not a readable NIfTI") as e:
        load_nifti(path, "label")
    assert "upload.nii.gz" in e.value.detail and str(tmp_path) not in e.value.detail


def test_add_image_checks(store: CheckedLocalDatastore, tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "new.nii.gz", np.zeros((4, 4, 4), np.float32))
    assert store.add_image("", str(good), {}) == "new"
    assert Path(store.get_image_uri("new")).exists()
    with pytest.raises(RequestError, match="contains a path"):
        store.add_image("../outside", str(good), {})
    corrupt = tmp_path / "bad.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08 nope")
    with pytest.raises(RequestError, match="not a readable NIfTI"):
        store.add_image("bad", str(corrupt), {})
    assert not (Path(store.get_image_uri("new")).parent / "bad.nii.gz").exists()
    phase = write_nifti(tmp_path / "phase.nii.gz", np.ones((4, 4, 4), np.complex64))
    with pytest.raises(RequestError, match="complex-valued voxels") as e:
        store.add_image("phase", str(phase), {})
    assert e.value.status_code == 422 and "phase" not in store.list_images()


def test_a_labelled_image_is_replaced_only_by_one_on_the_same_grid(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine
) -> None:
    label = _label_file(tmp_path / "l.nii.gz", np.ones((10, 12, 8), np.uint8), oblique_affine)
    store.save_label("case1", label, "final", {})
    image = Path(store.get_image_uri("case1"))
    before = image.read_bytes(), Path(store.get_label_uri("case1", "final")).read_bytes()

    other = write_nifti(tmp_path / "other.nii.gz", np.zeros((10, 12, 9), np.float32), oblique_affine)
    with pytest.raises(RequestError, match="'case1' has labels \\(final\\) on its current grid") as e:
        store.add_image("case1", str(other), {})
    assert e.value.status_code == 409
    assert (image.read_bytes(), Path(store.get_label_uri("case1", "final")).read_bytes()) == before

    shifted = oblique_affine.copy()
    shifted[0, 3] += 0.01  # 10 micrometres: a label saved on the old grid would be refused on this one
    shifted_grid = write_nifti(tmp_path / "shifted.nii.gz", np.zeros((10, 12, 8), np.float32), shifted)
    with pytest.raises(RequestError, match="on its current grid"):
        store.add_image("case1", str(shifted_grid), {})

    nudged = oblique_affine + 4e-4  # within the tolerance a saved label is checked with (and 4-decimal rounding)
    same_grid = write_nifti(tmp_path / "same.nii.gz", np.full((10, 12, 8), 3, np.float32), nudged)
    assert store.add_image("case1", str(same_grid), {}) == "case1"
    assert np.asarray(nib.load(store.get_image_uri("case1")).dataobj).max() == 3
    assert store.get_labeled_images() == ["case1"], "the label still lies on the new file and is kept"

    store.remove_label("case1", "final")
    assert store.add_image("case1", str(other), {}) == "case1", "an unlabelled image may change grid"
    assert nib.load(store.get_image_uri("case1")).shape == (10, 12, 9)


def test_a_failed_refresh_does_not_end_the_folder_watcher(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine, caplog: pytest.LogCaptureFixture
) -> None:
    label = _label_file(tmp_path / "l.nii.gz", np.ones((10, 12, 8), np.uint8), oblique_affine)
    store.save_label("case1", label, "final", {})
    labels = Path(store.get_label_uri("case1", "final")).parents[1]
    shutil.rmtree(labels)  # someone removes the labels folder while the server runs
    event = SimpleNamespace(event_type="deleted", src_path=str(labels), is_directory=True)
    store._on_any_event(event)  # MONAI Label's callback raised FileNotFoundError here, ending the thread
    assert "Datastore refresh after" in caplog.text and "FileNotFoundError" in caplog.text
    (labels / "final").mkdir(parents=True)
    store._on_any_event(event)
    assert store.get_labeled_images() == [], "the next change reconciles: the removed label is gone"


def test_the_dataset_archive_is_streamed_in_monai_labels_layout(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine
) -> None:
    import io
    import json
    import zipfile

    with pytest.raises(RequestError, match="no dataset to download") as e:
        store.dataset_archive()
    assert e.value.status_code == 404
    label = np.ones((10, 12, 8), np.uint8)
    store.save_label("case1", _label_file(tmp_path / "l.nii.gz", label, oblique_affine), "final", {})
    # a second labelled case whose image is bigger than several chunks
    big = np.random.default_rng(1).normal(size=(64, 64, 64)).astype(np.float32)
    write_nifti(Path(store._datastore_path) / "case2.nii.gz", big, oblique_affine)
    store.refresh()
    label2 = _label_file(tmp_path / "l2.nii.gz", np.zeros(big.shape, np.uint8), oblique_affine)
    store.save_label("case2", label2, "final", {})

    chunks = list(store.dataset_archive())
    assert len(chunks) > 3, "produced as it is read, not in one piece"
    archive = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    assert archive.testzip() is None
    names = sorted(archive.namelist())
    assert names == [
        "image/case1.nii.gz",
        "image/case2.nii.gz",
        "label/case1.nii.gz",
        "label/case2.nii.gz",
        "metadata.json",
    ]
    assert archive.read("image/case2.nii.gz") == Path(store.get_image_uri("case2")).read_bytes()
    assert archive.read("label/case1.nii.gz") == Path(store.get_label_uri("case1", "final")).read_bytes()
    assert set(json.loads(archive.read("metadata.json"))["objects"]) == {"case1", "case2"}

    one = zipfile.ZipFile(io.BytesIO(b"".join(store.dataset_archive(limit_cases=1))))
    assert len([n for n in one.namelist() if n.startswith("image/")]) == 1
    with pytest.raises(RequestError, match="limit_cases") as e:
        store.dataset_archive(limit_cases=-1)
    assert e.value.status_code == 422


def test_a_label_removed_while_the_archive_streams_leaves_its_case_out(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine
) -> None:
    import io
    import zipfile

    big = np.random.default_rng(2).normal(size=(64, 64, 64)).astype(np.float32)
    for case in ("case1", "case2", "case3"):
        if case != "case1":
            image = big if case == "case2" else big[:10, :12, :8]
            write_nifti(Path(store._datastore_path) / f"{case}.nii.gz", image, oblique_affine)
            store.refresh()
        shape = big.shape if case == "case2" else (10, 12, 8)
        label = _label_file(tmp_path / f"{case}.nii.gz", np.ones(shape, np.uint8), oblique_affine)
        store.save_label(case, label, "final", {})
    case2_image = Path(store.get_image_uri("case2")).read_bytes()

    chunks = store.dataset_archive()
    first = [next(chunks)]  # case1 is being sent; the listing of all three is made
    Path(store.get_label_uri("case3", "final")).unlink()  # before case3 is reached
    parts = first + [next(chunks)]
    while b"case2" not in b"".join(parts):
        parts.append(next(chunks))
    Path(store.get_image_uri("case2")).unlink()  # while case2 is being sent: it was opened, so it goes out whole
    archive = zipfile.ZipFile(io.BytesIO(b"".join(parts + list(chunks))))

    assert archive.testzip() is None
    assert sorted(n for n in archive.namelist() if n != "metadata.json") == [
        "image/case1.nii.gz",
        "image/case2.nii.gz",
        "label/case1.nii.gz",
        "label/case2.nii.gz",
    ]
    assert archive.read("image/case2.nii.gz") == case2_image


def test_a_refresh_that_meets_a_concurrent_change_is_retried(
    store: CheckedLocalDatastore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from monailabel.datastore.local import LocalDatastore

    calls: list[object] = []

    def flaky(self, event) -> None:
        calls.append(event)
        if len(calls) == 1:
            raise RuntimeError("dictionary changed size during iteration")  # a request thread wrote meanwhile

    monkeypatch.setattr(LocalDatastore, "_on_any_event", flaky)
    monkeypatch.setattr(CheckedLocalDatastore, "REFRESH_PAUSE_S", 0.0)
    store._on_any_event("created")
    assert calls == ["created", "created"] and "failed" not in caplog.text


@pytest.fixture
def two_models(tmp_path: Path):
    """An app serving hippocampus and organs_ct over one real MR case."""
    studies, app_dir = tmp_path / "studies", tmp_path / "app"
    studies.mkdir()
    app_dir.mkdir()
    shutil.copyfile(HIPPO / "imagesTr" / "hippocampus_001.nii.gz", studies / "hippocampus_001.nii.gz")
    conf = {"models": "hippocampus,organs_ct", "score_on_start": "false", "score_new_images": "false"}
    return unwatched_app(app_dir, studies, conf)


@requires_shared
@pytest.mark.parametrize(
    ("params", "status", "match"),
    [
        ({"model": "hippocampus"}, 422, r"values \[5\].*allowed values: \[0, 1, 2\]"),
        ({"model": "spleen"}, 404, r"Unknown model 'spleen'.*served models: \['hippocampus', 'organs_ct'\]"),
        ({}, None, None),  # 5 is liver in organs_ct: without a model, any served model's value is a label value
        ({"model": "organs_ct"}, None, None),
    ],
)
def test_a_label_naming_its_model_holds_only_that_model_s_values(
    two_models, tmp_path: Path, params: dict, status: int | None, match: str | None
) -> None:
    store = two_models.datastore()
    img = nib.load(HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
    five = _label_file(tmp_path / "five.nii.gz", np.full(img.shape, 5, np.uint8), img.affine)

    if status is None:
        store.save_label("hippocampus_001", five, "final", params)
        assert np.all(np.asarray(nib.load(store.get_label_uri("hippocampus_001", "final")).dataobj) == 5)
    else:
        with pytest.raises(RequestError, match=match) as e:
            store.save_label("hippocampus_001", five, "final", params)
        assert e.value.status_code == status
        assert not store.get_label_uri("hippocampus_001", "final")


@requires_shared
def test_a_model_with_no_label_of_its_own_is_a_409_before_training_starts(two_models, monkeypatch) -> None:
    import appcore.app

    monkeypatch.setattr(appcore.app, "_running_app", lambda: two_models)
    label = HIPPO / "labelsTr" / "hippocampus_001.nii.gz"
    two_models.datastore().save_label("hippocampus_001", str(label), "final", {})  # no model named
    assert appcore.app._cannot_train({"model": "hippocampus"}, b"{}") is None
    refusal = appcore.app._cannot_train({"model": "organs_ct"}, b"{}")
    assert refusal is not None and refusal.status_code == 409
    assert re.search(
        r"No 'final' label to train 'organs_ct' on \(skipped hippocampus_001: the image is no CT", refusal.detail
    )
    assert appcore.app._cannot_train({}, b"{}") is None, "POST /train/: one of the models has a label to train on"


@requires_shared
def test_training_every_model_with_no_label_for_any_is_a_409(two_models, tmp_path: Path, monkeypatch) -> None:
    import appcore.app

    monkeypatch.setattr(appcore.app, "_running_app", lambda: two_models)
    img = nib.load(HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
    label = np.zeros(img.shape, np.uint8)
    label[10:20, 10:20, 10:20] = 1
    two_models.datastore().save_label(
        "hippocampus_001", _label_file(tmp_path / "l.nii.gz", label, img.affine), "final", {}
    )
    # The image is written over on another grid afterwards: its label is no model's training data.
    image = Path(two_models.datastore().get_image_uri("hippocampus_001"))
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), img.affine), image)
    refusal = appcore.app._cannot_train({}, b"{}")
    assert refusal is not None and refusal.status_code == 409
    assert refusal.detail.count("no longer lies on its image's grid") == 2, refusal.detail  # one reason per model


@requires_shared
@pytest.mark.parametrize(
    ("info", "status", "match"),
    [
        ({"model": "hippocampus"}, 422, r"holds values \[5\], which are not among model 'hippocampus'"),
        ({"model": "hipocampus"}, 404, r"Unknown model 'hipocampus'"),
        ({"model": "organs_ct"}, None, None),
        ({"reader": "second"}, None, None),
    ],
)
def test_naming_a_label_s_model_afterwards_is_checked_as_a_save_is(
    two_models, tmp_path: Path, info: dict, status: int | None, match: str | None
) -> None:
    store = two_models.datastore()
    img = nib.load(HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
    data = np.zeros(img.shape, np.uint8)
    data[10:20, 10:20, 10:20] = 5
    store.save_label("hippocampus_001", _label_file(tmp_path / "l.nii.gz", data, img.affine), "final", {})
    if status is None:
        store.update_label_info("hippocampus_001", "final", info)
        assert store.get_label_info("hippocampus_001", "final").items() >= info.items()
    else:
        with pytest.raises(RequestError, match=match) as e:
            store.update_label_info("hippocampus_001", "final", info)
        assert e.value.status_code == status
        assert "model" not in store.get_label_info("hippocampus_001", "final")


def _write_over(image: Path, value: float) -> None:
    """Another program writes a new file over ``image`` (same name, other content, a later time)."""
    src = nib.load(image)
    write_nifti(image, np.full(src.shape, value, np.float32), src.affine)
    later = image.stat().st_mtime + 5
    os.utime(image, (later, later))


def _replaced_store(studies: Path, **kwargs) -> tuple[CheckedLocalDatastore, list[str]]:
    replaced: list[str] = []
    store = CheckedLocalDatastore(
        str(studies), allowed_values=lambda params: {0, 1, 2}, on_image_replaced=replaced.append, **kwargs
    )
    return store, replaced


def test_an_image_written_over_in_the_folder_is_reported_once(store: CheckedLocalDatastore, tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    store, replaced = _replaced_store(studies)
    assert replaced == [], "the first sight of a file records it and reports nothing"
    image = Path(store.get_image_uri("case1"))
    _write_over(image, 7.0)
    store.refresh()
    assert replaced == ["case1"]
    store.refresh()
    assert replaced == ["case1"], "reported once per change"
    upload = write_nifti(tmp_path / "up.nii.gz", np.full((10, 12, 8), 2.0, np.float32), nib.load(image).affine)
    store.add_image("case1", str(upload), {})
    store.refresh()
    assert replaced == ["case1", "case1"], "an upload is reported by add_image, and not again as a change on disk"
    assert "file_version" in store.get_image_info("case1")


def test_a_change_while_the_server_was_down_is_noticed_at_start(store: CheckedLocalDatastore, tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    _write_over(studies / "case1.nii.gz", 3.0)
    _, replaced = _replaced_store(studies)  # the datastore file written by ``store`` holds the old version
    assert replaced == ["case1"]
    _, replaced = _replaced_store(studies)
    assert replaced == []


class _Timers:
    """Stands in for ``threading.Timer`` in ``appcore.datastore``: the test fires the timers itself,
    so nothing hangs on how soon a loaded machine schedules a thread."""

    def __init__(self) -> None:
        self.made: list[SimpleNamespace] = []

    def __call__(self, interval: float, function, args=()) -> SimpleNamespace:
        timer = SimpleNamespace(interval=interval, cancelled=False, started=False, daemon=False)
        timer.start = lambda: setattr(timer, "started", True)
        timer.cancel = lambda: setattr(timer, "cancelled", True)
        timer.fire = lambda: function(*args)
        self.made.append(timer)
        return timer

    def live(self) -> list[SimpleNamespace]:
        return [t for t in self.made if t.started and not t.cancelled]


def test_a_modification_event_reconciles_for_images_only(
    store: CheckedLocalDatastore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import appcore.datastore

    calls: list[str] = []
    monkeypatch.setattr(store, "refresh", lambda: calls.append("refresh"))
    timers = _Timers()
    monkeypatch.setattr(appcore.datastore, "threading", SimpleNamespace(Timer=timers))  # this module's only
    labels = Path(store._datastore.label_path("final"))
    for path, reconciles in [
        (tmp_path / "studies" / "case1.nii.gz", True),
        (labels / "case1.nii.gz", False),  # labels are saved through the server, which records them
        (tmp_path / "studies" / "sub", False),
        (Path(store._datastore_config_path), False),  # the records, written by every change
        (tmp_path / "studies" / ".case2.nii.gz.partial", False),  # a copy in progress under another name
    ]:
        timers.made.clear()
        store._on_modify_event(SimpleNamespace(src_path=str(path), is_directory=path.name == "sub"))
        assert len(timers.live()) == int(reconciles), path
        for timer in timers.live():
            assert timer.interval == CheckedLocalDatastore.MODIFIED_QUIET_S
            timer.fire()
    assert calls == ["refresh"]
    # A copy in progress: one event per write, one reconcile once the writes have stopped.
    calls.clear()
    timers.made.clear()
    image = SimpleNamespace(src_path=str(tmp_path / "studies" / "case1.nii.gz"), is_directory=False)
    for _ in range(10):
        store._on_modify_event(image)
    assert len(timers.made) == 10 and len(timers.live()) == 1, "each write restarts the quiet period"
    assert timers.live()[0] is timers.made[-1]
    timers.live()[0].fire()
    assert calls == ["refresh"]


def test_the_folder_watcher_notices_an_image_written_over(store: CheckedLocalDatastore, tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    watched, replaced = _replaced_store(studies, auto_reload=True)
    try:
        _write_over(studies / "case1.nii.gz", 5.0)
        deadline = time.monotonic() + 10
        while not replaced and time.monotonic() < deadline:
            time.sleep(0.1)
        assert replaced[:1] == ["case1"], "the watcher did not report the file written over"
    finally:
        watched._observer.stop()
        watched._observer.join(timeout=10)


def test_an_image_removed_loses_what_was_computed_from_it(store: CheckedLocalDatastore, tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    write_nifti(studies / "case2.nii.gz", np.ones((10, 12, 8), np.float32), nib.load(studies / "case1.nii.gz").affine)
    store, replaced = _replaced_store(studies)
    store.remove_image("case1")  # DELETE /datastore/image
    assert replaced == ["case1"]
    (studies / "case2.nii.gz").unlink()  # removed from the folder
    store.refresh()
    assert replaced == ["case1", "case2"]


def test_with_the_folder_watcher_a_removed_image_is_reported_at_once(
    store: CheckedLocalDatastore, tmp_path: Path
) -> None:
    studies = tmp_path / "studies"
    watched, replaced = _replaced_store(studies, auto_reload=True)
    try:
        watched.remove_image("case1")
        assert replaced == ["case1"] and "case1" not in watched.list_images(), "not left to the watcher"
        upload = write_nifti(tmp_path / "new.nii.gz", np.ones((10, 12, 8), np.float32), np.eye(4))
        watched.add_image("case1", str(upload), {})  # a new image under the old id, at once
        time.sleep(1.5)  # the watcher's events for both
        assert replaced == ["case1"], replaced
    finally:
        watched._observer.stop()
        watched._observer.join(timeout=10)


def test_a_removal_racing_the_watcher_s_reconcile_is_reported_once(
    store: CheckedLocalDatastore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher's reconcile (another thread) that began before DELETE /datastore/image removed the
    record must not report the image again after the removal did: a second report could land after a
    new upload under the same id and forget that one's score."""
    studies = tmp_path / "studies"
    store, replaced = _replaced_store(studies)
    started, go = threading.Event(), threading.Event()
    original = LocalDatastore._reconcile_datastore

    def paused_once(self: LocalDatastore) -> None:
        if not started.is_set():
            started.set()
            go.wait(10)
        original(self)

    monkeypatch.setattr(LocalDatastore, "_reconcile_datastore", paused_once)
    watcher = threading.Thread(target=store.refresh)  # has taken its view of the records, then pauses
    watcher.start()
    assert started.wait(10)
    remover = threading.Thread(target=store.remove_image, args=("case1",))
    remover.start()
    remover.join(0.5)
    go.set()
    watcher.join(10)
    remover.join(10)
    assert not watcher.is_alive() and not remover.is_alive()
    assert replaced == ["case1"], replaced
    assert "case1" not in store.list_images()


def test_a_file_rewritten_with_the_same_content_is_no_change(store: CheckedLocalDatastore, tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    store, replaced = _replaced_store(studies)
    image = studies / "case1.nii.gz"
    later = image.stat().st_mtime + 60
    os.utime(image, (later, later))  # touch, or a copy that does not keep times
    store.refresh()
    copy = tmp_path / "copy.nii.gz"
    shutil.copyfile(image, copy)
    os.replace(copy, image)
    store.refresh()
    assert replaced == [], "a .nii.gz file's version is its content's CRC-32 and size, not its time"

"""The OHIF labeling panel's server side without a server: frames in and out, segment names, OHIF's files."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from appcore.dicom.labeling import (
    Click,
    ClickSession,
    LabelFrames,
    click_voxels,
    decode_frames,
    encode_frames,
    segment_values,
)
from appcore.dicom.ohif import _rewrite_cached, dist_file, ohif_response
from appcore.errors import RequestError
from radiology.registry import MODELS

SOPS = ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
SHAPE = (4, 3, 3)  # columns, rows, slices
LABELS = MODELS["hippocampus"].labels


def frames_of(volume: np.ndarray, order: list[int] | None = None, **changes: object) -> LabelFrames:
    """``volume`` as the panel sends it, its frames in ``order`` (of ``SOPS``)."""
    order = order or list(range(len(SOPS)))
    frames = volume.transpose(2, 1, 0)[order]
    fields = {
        "model": "hippocampus",
        "instances": [SOPS[i] for i in order],
        "rows": SHAPE[1],
        "columns": SHAPE[0],
        "segments": {"1": "anterior", "2": "posterior"},
        "base": "",
        "data": base64.b64encode(zlib.compress(frames.astype(np.uint8).tobytes())).decode(),
        **changes,
    }
    return LabelFrames(**fields)


def volume() -> np.ndarray:
    return np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE) % 3


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1]], ids=["in order", "shuffled"])
def test_frames_round_trip_in_any_instance_order(order: list[int]) -> None:
    sent = volume()
    np.testing.assert_array_equal(decode_frames(frames_of(sent, order), SOPS, SHAPE), sent)


def test_proposal_frames_are_slice_row_column() -> None:
    sent = volume()
    raw = zlib.decompress(base64.b64decode(encode_frames(sent)))
    np.testing.assert_array_equal(np.frombuffer(raw, np.uint8).reshape(3, 3, 4), sent.transpose(2, 1, 0))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"rows": 5}, r"frames are 5 x 4 \(rows x columns\) and the series' images 3 x 4"),
        ({"instances": ["1.2.3.1", "1.2.3.2", "9.9"]}, r"one frame per image of the series \(3\).*1 of another series"),
        ({"instances": ["1.2.3.1", "1.2.3.2"]}, r"it has 2.*1 of the series' images missing"),
        ({"data": "not base64!"}, "not base64 of zlib-compressed bytes"),
        ({"data": base64.b64encode(b"plain").decode()}, "not base64 of zlib-compressed bytes"),
        ({"data": base64.b64encode(zlib.compress(bytes(10))).decode()}, r"holds 10 bytes once decompressed; 3 frames"),
        ({"data": base64.b64encode(zlib.compress(bytes(10**6))).decode()}, r"holds 37\+ bytes"),
    ],
    ids=["rows", "foreign instance", "missing instance", "not base64", "not zlib", "too short", "bomb"],
)
def test_frames_that_do_not_fit_the_series_are_a_422(changes: dict[str, object], match: str) -> None:
    with pytest.raises(RequestError, match=match) as refused:
        decode_frames(frames_of(volume(), **changes), SOPS, SHAPE)
    assert refused.value.status_code == 422


@pytest.mark.parametrize(
    ("segments", "lut"),
    [
        ({"1": "anterior", "2": "posterior"}, {1: 1, 2: 2}),
        ({"1": "Posterior", "3": " ANTERIOR "}, {1: 2, 3: 1}),  # OHIF numbers and spells as the user did
    ],
)
def test_segments_map_to_label_ids_by_name(segments: dict[str, str], lut: dict[int, int]) -> None:
    table = segment_values(segments, LABELS, "hippocampus")
    assert {i: int(table[i]) for i in lut} == lut
    assert not table[[i for i in range(256) if i not in lut]].any()


@pytest.mark.parametrize(
    ("segments", "match"),
    [
        ({"1": "Segment 1"}, r"Segment 'Segment 1' is none of 'hippocampus''s labels \['anterior', 'posterior'\]"),
        ({"0": "anterior"}, r"Segment index '0' is not a labelmap value \(1 to 255\)"),
        ({"x": "anterior"}, r"Segment index 'x' is not a labelmap value"),
    ],
)
def test_unknown_segments_are_a_422(segments: dict[str, str], match: str) -> None:
    with pytest.raises(RequestError, match=match):
        segment_values(segments, LABELS, "hippocampus")


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    (tmp_path / "index.html").write_text('<script>window.PUBLIC_URL="/"</script><script src="/app.bundle.1.js">')
    (tmp_path / "app.bundle.1.js").write_text('__webpack_require__.p = "/";')
    (tmp_path / "worker.bundle.2.js").write_text('__webpack_require__.p = "/";')
    (tmp_path / "app.bundle.css").write_text("@font-face{src:url(/a.woff2)}")
    (tmp_path / "plain.js").write_text("var a = 1;")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "x.svg").write_text("<svg/>")
    (tmp_path.parent / "secret.txt").write_text("no")
    return tmp_path


@pytest.mark.parametrize(
    ("path", "found"),
    [
        ("assets/x.svg", "assets/x.svg"),
        ("plain.js", "plain.js"),
        ("segmentation", None),  # a route of the app: index.html
        ("", None),
        ("../secret.txt", None),
        ("assets/../../secret.txt", None),
        ("assets/", None),
    ],
)
def test_dist_file_stays_in_the_dist(dist: Path, path: str, found: str | None) -> None:
    assert dist_file(path, dist) == (dist / found if found else None)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("segmentation", 'window.PUBLIC_URL="/ohif/"</script><script src="/ohif/app.bundle.1.js">'),
        ("app.bundle.1.js", '__webpack_require__.p = "/ohif/";'),
        ("worker.bundle.2.js", '__webpack_require__.p = "/ohif/";'),
        ("app.bundle.css", "url(/ohif/a.woff2)"),
        ("plain.js", "var a = 1;"),
    ],
)
def test_ohif_is_served_below_ohif_with_isolation_headers(dist: Path, path: str, expected: str) -> None:
    _rewrite_cached.cache_clear()
    answer = ohif_response(path, dist)
    body = answer.body if hasattr(answer, "body") else Path(answer.path).read_bytes()
    assert expected in body.decode()
    assert answer.headers["cross-origin-embedder-policy"] == "require-corp"
    assert answer.headers["cross-origin-opener-policy"] == "same-origin"


def test_a_missing_ohif_says_how_to_install_it(tmp_path: Path) -> None:
    answer = ohif_response("", tmp_path)
    assert answer.status_code == 503 and b"run `make ohif`" in answer.body


class _App:
    """What ``Labeling._train_if_due`` asks of the app: the setting and whether a training runs."""

    def __init__(self, every: int, running: bool) -> None:
        self.settings = type("Settings", (), {"train_after_labels": every})()
        self.running = running

    def training_running(self, model: str) -> str | None:
        return "a training of hippocampus is running" if self.running else None


@pytest.mark.parametrize(
    ("every", "running", "saves", "started_at"),
    [
        (0, False, 4, []),  # off: only when asked
        (1, False, 3, [1, 2, 3]),
        (2, False, 5, [2, 4]),  # the count starts again after each start
        (2, True, 4, []),  # never beside a running training; the labels still count
    ],
)
def test_training_starts_after_n_labels_saved_from_the_viewer(
    monkeypatch: pytest.MonkeyPatch, every: int, running: bool, saves: int, started_at: list[int]
) -> None:
    from appcore.dicom import labeling

    started: list[str] = []
    monkeypatch.setattr("monailabel.endpoints.train.run_model", lambda model, params: started.append(model))
    app = _App(every, running)
    monkeypatch.setattr(labeling.Labeling, "app", staticmethod(lambda: app))
    panel = labeling.Labeling()
    answers = [panel._train_if_due("hippocampus") for _ in range(saves)]
    assert [i + 1 for i, yes in enumerate(answers) if yes] == started_at
    assert started == ["hippocampus"] * len(started_at)


class _Store:
    """Stands in for the DICOMweb datastore (an instance of it, without a PACS)."""

    @staticmethod
    def make() -> object:
        from appcore.dicom.datastore import DicomWebDatastore

        class Store(DicomWebDatastore):
            def __init__(self) -> None:  # no PACS, no cache folder
                pass

            def series_info(self, image_id: str) -> dict[str, str]:
                return {"StudyInstanceUID": "1.2", "Modality": "MR", "SeriesDescription": ""}

        return Store()


class _PanelApp:
    def __init__(self, store: object, picked: dict[str, str]) -> None:
        self._store, self._picked = store, picked
        self._infers: dict[str, object] = {}  # no model served, no interactive one

    def datastore(self) -> object:
        return self._store

    def next_sample(self, request: dict[str, object]) -> dict[str, str]:
        return self._picked

    def dicom_labels(self, params: dict[str, object], modality: str) -> tuple[str, object]:
        return "hippocampus", LABELS


@pytest.mark.parametrize(
    ("store", "call", "status", "match"),
    [
        ("folder", lambda p: p.proposal("1.2.3"), 409, "works on a PACS: start the server with --studies http"),
        ("pacs", lambda p: p.next_case("random", " "), 422, "client_id is empty"),
        ("pacs", lambda p: p.next_case("random", "ann"), 404, "No case left for 'ann' with strategy 'random'"),
        (
            "pacs",
            lambda p: p.save("1.2.3", frames_of(volume(), model="organs_ct")),
            422,
            "Series 1.2.3 is labelled with 'hippocampus''s labels, not 'organs_ct'",
        ),
        (
            "pacs",
            lambda p: p.clicks("1.2.3", ClickSession(model="organs_ct", clicks=[])),
            422,
            "Series 1.2.3 is labelled with 'hippocampus''s labels, not 'organs_ct'",
        ),
        (
            "pacs",
            lambda p: p.clicks("1.2.3", ClickSession(model="hippocampus", clicks=[])),
            404,
            "Model 'hippocampus' has no interactive \\(deepedit\\) model on this server",
        ),
    ],
    ids=["no PACS", "no annotator", "nothing left", "other model", "clicks of another model", "no interactive model"],
)
def test_panel_requests_that_cannot_be_served_say_why(
    monkeypatch: pytest.MonkeyPatch, store: str, call: object, status: int, match: str
) -> None:
    from appcore.dicom import labeling

    app = _PanelApp(_Store.make() if store == "pacs" else object(), {})
    monkeypatch.setattr(labeling.Labeling, "app", staticmethod(lambda: app))
    with pytest.raises(RequestError, match=match) as refused:
        call(labeling.Labeling())  # type: ignore[operator]
    assert refused.value.status_code == status


class _SavingStore:
    """The series' grid and instances, as the DICOMweb datastore answers them."""

    def __init__(self, uri: Path) -> None:
        self.uri = uri

    def get_image_uri(self, image_id: str) -> str:
        return str(self.uri)

    def source_headers(self, image_id: str) -> list[object]:
        from types import SimpleNamespace

        return [SimpleNamespace(SOPInstanceUID=sop) for sop in SOPS]


@pytest.mark.parametrize(
    ("proposal", "recorded"),
    [
        (None, None),  # the case opened on a saved label
        ({"model": "hippocampus", "version": 3}, {"model": "hippocampus", "version": 3}),
        ({"model": "hippocampus", "version": None}, {"model": "hippocampus", "version": None}),  # untrained
    ],
    ids=["saved label", "model v3", "untrained model"],
)
def test_a_panel_save_keeps_the_proposal_it_corrected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, proposal: dict | None, recorded: dict | None
) -> None:
    """The panel's save names the model's proposal it started from; the label's version keeps it
    (``appcore.history``: ``proposal``), as a save over /datastore/label with ``params.proposal`` does."""
    import nibabel as nib

    from appcore.dicom import labeling

    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), np.eye(4)), tmp_path / "series.nii.gz")
    store, stored = _SavingStore(tmp_path / "series.nii.gz"), []
    monkeypatch.setattr(labeling.Labeling, "store", lambda self: store)
    monkeypatch.setattr(labeling.Labeling, "model_for", lambda self, image: ("hippocampus", LABELS, {}))
    monkeypatch.setattr(labeling.Labeling, "store_final", lambda self, *args, **kwargs: stored.append(args[3]) or {})
    labeling.Labeling().save("1.2.3", frames_of(volume(), proposal=proposal))
    assert stored[0].get("proposal") == recorded
    assert stored[0]["model"] == "hippocampus" and stored[0]["saved_from"] == "ohif"


@pytest.mark.parametrize(
    ("proposal", "match"),
    [
        ({"model": "hippocampus", "version": -1}, "its version is -1"),
        ({"model": "hippocampus", "version": "3"}, "its version is '3'"),
        ({"model": 3, "version": 1}, "its model is 3"),
        ({"model": "hippocampus", "version": 1, "by": "x"}, "got"),
    ],
)
def test_a_panel_save_with_a_malformed_proposal_is_a_422(
    monkeypatch: pytest.MonkeyPatch, proposal: dict, match: str
) -> None:
    from appcore.dicom import labeling

    def untouched(self: object) -> object:
        raise AssertionError("the store was asked for before the proposal was checked")

    monkeypatch.setattr(labeling.Labeling, "store", untouched)
    with pytest.raises(RequestError, match=match) as refused:
        labeling.Labeling().save("1.2.3", frames_of(volume(), proposal=proposal))
    assert refused.value.status_code == 422


# -- clicks: the panel's pixels as the DeepEdit contract's voxels --------------------------------------------
def _click(label: str = "anterior", instance: str = "1.2.3.2", row: int = 1, column: int = 3) -> Click:
    return Click(label=label, instance=instance, row=row, column=column)


def test_clicks_become_column_row_slice_voxels_keyed_by_label() -> None:
    clicks = [
        _click("anterior", "1.2.3.2", row=1, column=3),
        _click("background", "1.2.3.1", row=0, column=0),
        _click(" Anterior", "1.2.3.3", row=2, column=0),  # as a save matches segment names: ignoring case
    ]
    voxels = click_voxels(clicks, SOPS, SHAPE, ["anterior", "posterior"])
    assert voxels == {"anterior": [[3, 1, 1], [0, 2, 2]], "posterior": [], "background": [[0, 0, 0]]}
    # the voxel of a click is the frame's pixel: decode_frames puts frame pixel (row, column) of the
    # k-th instance at [column, row, k], so a label painted there and a click there meet
    painted = np.zeros(SHAPE, np.uint8)
    painted[3, 1, 1] = 1
    frames = zlib.decompress(base64.b64decode(encode_frames(painted)))
    assert np.frombuffer(frames, np.uint8).reshape(3, 3, 4)[1, 1, 3] == 1


@pytest.mark.parametrize(
    ("click", "match"),
    [
        (
            {"label": "hippocampus"},
            r"Click 2 \('hippocampus' on image 1.2.3.2, row 1, column 3\) is for no label of the model: "
            r"click for one of \['anterior', 'posterior', 'background'\]",
        ),
        ({"instance": "9.9.9"}, r"on an image that is not one of the case's series \(3 images\)"),
        ({"row": 3}, r"outside the image, whose rows run from 0 to 2 and columns from 0 to 3"),
        ({"row": -1}, r"row -1, column 3\) is outside the image"),
        ({"column": 4}, r"column 4\) is outside the image"),
    ],
    ids=["unknown label", "foreign image", "row past the end", "negative row", "column past the end"],
)
def test_clicks_off_the_series_are_a_422_naming_the_click(click: dict[str, object], match: str) -> None:
    clicks = [_click(), _click(**click)]  # type: ignore[arg-type]  # the table's values are typed per row
    with pytest.raises(RequestError, match=match) as refused:
        click_voxels(clicks, SOPS, SHAPE, ["anterior", "posterior"])
    assert refused.value.status_code == 422


@pytest.mark.parametrize(
    "field",
    [{"row": 1.5}, {"row": "1"}, {"column": True}, {"column": None}],
    ids=["fraction", "string", "boolean", "null"],
)
def test_click_coordinates_must_be_json_integers(field: dict[str, object]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="valid integer"):
        Click(**{"label": "anterior", "instance": "1.2.3.1", "row": 1, "column": 1, **field})  # type: ignore[arg-type]


# -- the panel's click tool (viewers_config/ohif/extension/clicks.js): a world point to a series' pixel -----
CLICKS_JS = Path(__file__).resolve().parents[3] / "viewers_config" / "ohif" / "extension" / "clicks.js"
NODE = shutil.which("node")


def _oblique_series(slices: int = 5) -> list[dict[str, object]]:
    """Planes of a series tilted about two axes, with rows 0.7 mm apart, columns 1.3 mm, slices 2.5 mm."""
    a, b = np.deg2rad(20), np.deg2rad(35)
    turn = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]) @ np.array(
        [[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]]
    )
    along, down = turn[:, 0], turn[:, 1]
    normal = np.cross(along, down)
    return [
        {
            "position": (np.array([-40.0, 12.5, 80.0]) + 2.5 * k * normal).tolist(),
            "orientation": [*along.tolist(), *down.tolist()],
            "spacing": [0.7, 1.3],
            "rows": 40,
            "columns": 30,
        }
        for k in range(slices)
    ]


def _world(planes: list[dict[str, object]], k: int, row: float, column: float, off_plane: float = 0.0) -> list[float]:
    p = planes[k]
    o = np.asarray(p["orientation"])
    along, down = o[:3], o[3:]
    spacing = p["spacing"]
    return (
        np.asarray(p["position"])
        + column * spacing[1] * along  # type: ignore[index]
        + row * spacing[0] * down  # type: ignore[index]
        + off_plane * np.cross(along, down)
    ).tolist()


def _pixel_of(world: list[float], planes: list[dict[str, object]]) -> dict[str, object]:
    """``pixelOf`` of clicks.js run by node: ``{"k", "row", "column"}`` or ``{"error"}``."""
    script = (
        "const { pixelOf } = await import(process.argv[1]);"
        "const [world, planes] = JSON.parse(process.argv[2]);"
        "try { const f = pixelOf(world, planes);"
        " console.log(JSON.stringify({ k: planes.findIndex(p => p === f.plane), row: f.row, column: f.column })); }"
        "catch (e) { console.log(JSON.stringify({ error: e.message })); }"
    )
    with tempfile.TemporaryDirectory() as tmp:
        # The extension's modules (clicks.js imports markers.js), read as ES modules, as the browser does.
        (Path(tmp) / "package.json").write_text('{"type": "module"}')
        for source in CLICKS_JS.parent.glob("*.js"):
            shutil.copy(source, Path(tmp) / source.name)
        module = Path(tmp) / CLICKS_JS.name
        done = subprocess.run(
            [str(NODE), "--input-type=module", "-e", script, module.as_uri(), json.dumps([world, planes])],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(NODE is None, reason="node is not installed: the panel's click geometry is not checked")
@pytest.mark.parametrize(
    ("k", "row", "column", "off_plane"),
    [
        (0, 0, 0, 0.0),
        (2, 17, 3, 0.0),
        (4, 39, 29, 0.0),
        (3, 5.4, 20.45, 1.2),  # near the pixel (5, 20), within half a slice of slice 3
        (1, 30.6, 0.3, -1.2),  # rounds to row 31, column 0
    ],
)
def test_a_world_point_is_the_pixel_whose_centre_is_nearest_on_the_nearest_slice(
    k: int, row: float, column: float, off_plane: float
) -> None:
    planes = _oblique_series()
    found = _pixel_of(_world(planes, k, row, column, off_plane), planes)
    assert found == {"k": k, "row": round(row), "column": round(column)}


@pytest.mark.skipif(NODE is None, reason="node is not installed: the panel's click geometry is not checked")
@pytest.mark.parametrize(
    ("k", "row", "column", "off_plane", "match"),
    [
        (4, 10, 10, 1.5, "off the case series"),  # beyond the last slice by more than half a slice
        (0, 10, 10, -1.5, "off the case series"),
        (2, 40, 10, 0.0, r"outside the image \(row 40, column 10\)"),
        (2, 10, -0.6, 0.0, r"outside the image \(row 10, column -1\)"),
    ],
)
def test_a_point_off_the_series_is_no_click(k: int, row: float, column: float, off_plane: float, match: str) -> None:
    planes = _oblique_series()
    found = _pixel_of(_world(planes, k, row, column, off_plane), planes)
    assert re.search(match, str(found.get("error"))), found

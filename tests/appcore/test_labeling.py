"""The OHIF labeling panel's server side without a server: frames in and out, segment names, OHIF's files."""

from __future__ import annotations

import base64
import zlib
from pathlib import Path

import numpy as np
import pytest

from appcore.dicom.labeling import LabelFrames, decode_frames, encode_frames, segment_values
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
    ],
    ids=["no PACS", "no annotator", "nothing left", "other model"],
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

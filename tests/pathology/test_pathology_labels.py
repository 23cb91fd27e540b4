"""Label uploads: ASAP XML, DSA and GeoJSON polygons and instance PNGs are checked, stored, or refused with a 422."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appcore.errors import RequestError
from pathology.annotations import parse_asap_xml, parse_json
from pathology.datastore import PathologyDatastore
from tests.conftest import SHARED, records_rewritten_during

SLIDE = SHARED / "pathology" / "wsi" / "CMU-1-Small-Region.svs"
SQUARE = [[10, 10], [30, 10], [30, 30], [10, 30]]


def asap(points: list[list[float]], kind: str = "Polygon", name: str = "nucleus") -> bytes:
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(points))
    return (
        f'<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation Name="{name}" Type="{kind}" '
        f'PartOfGroup="{name}" Color="#ff0000"><Coordinates>{coords}</Coordinates></Annotation>'
        "</Annotations></ASAP_Annotations>"
    ).encode()


def dsa(points: list[list[float]], closed: bool = True) -> bytes:
    element = {
        "type": "polyline",
        "closed": closed,
        "points": [[x, y, 0] for x, y in points],
        "label": {"value": "nucleus"},
    }
    return json.dumps({"name": "n", "elements": [element]}).encode()


def geojson(ring: list[list[float]]) -> bytes:
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}
    return json.dumps({"type": "FeatureCollection", "features": [feature]}).encode()


@pytest.mark.parametrize(
    "raw",
    [asap(SQUARE), dsa(SQUARE), geojson([*SQUARE, SQUARE[0]]), asap(SQUARE, kind="Rectangle", name="Nucleus")],
)
def test_polygon_formats_parse(raw: bytes) -> None:
    shapes = parse_asap_xml(raw) if raw.startswith(b"<") else parse_json(raw)
    assert len(shapes) == 1
    assert shapes[0][1] == SQUARE


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (asap(SQUARE, kind="Polyline"), "does not close"),
        (asap(SQUARE, kind="Line"), "does not close"),
        (dsa(SQUARE, closed=False), "does not close"),
        (geojson(SQUARE), "does not close"),
        (
            json.dumps({"type": "Feature", "geometry": {"type": "LineString", "coordinates": SQUARE}}).encode(),
            "not close",
        ),
        (asap([[0, 0], [5, 5]]), "at least 3 distinct points"),
        (dsa([[0, 0], [1, 1], [2, 2]]), "encloses no area"),
        (asap([[0, 0], [5, "x"], [3, 3]]), "number pairs"),
        (b"<html><body>no</body></html>", "ASAP annotations"),
        (b"<ASAP_Annotations><unclosed>", "not well-formed"),
        (b'{"foo": 1}', "Unknown JSON label"),
        (b"{not json", "not valid JSON"),
    ],
)
def test_bad_polygons_are_refused(raw: bytes, match: str) -> None:
    with pytest.raises(RequestError, match=match) as e:
        parse_asap_xml(raw) if raw.lstrip().startswith(b"<") else parse_json(raw)
    assert e.value.status_code == 422


@pytest.fixture
def store(tmp_path: Path) -> PathologyDatastore:
    studies = tmp_path / "studies"
    studies.mkdir()
    Image.fromarray(np.full((60, 80, 3), 200, np.uint8)).save(studies / "tile.png")
    if SLIDE.exists():
        shutil.copyfile(SLIDE, studies / "slide.svs")
    return PathologyDatastore(str(studies))


def _upload(tmp_path: Path, name: str, raw: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(raw)
    return str(path)


def _png(mask: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


def test_tile_labels_are_stored_as_instance_masks(store: PathologyDatastore, tmp_path: Path) -> None:
    store.save_label("tile", _upload(tmp_path, "a.xml", asap(SQUARE)), "final", {})
    saved = np.asarray(Image.open(store.get_label_uri("tile", "final")))
    assert saved.shape == (60, 80) and saved.dtype == np.uint16
    assert set(np.unique(saved)) == {0, 1} and (saved == 1).sum() == 400

    mask = np.zeros((60, 80), np.uint16)
    mask[5:9, 5:9], mask[40:50, 60:70] = 3, 700
    store.save_label("tile", _upload(tmp_path, "m.png", _png(mask)), "final", {})
    assert np.array_equal(np.asarray(Image.open(store.get_label_uri("tile", "final"))), mask)


def test_a_save_while_another_process_rewrote_the_records_keeps_its_label(
    store: PathologyDatastore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for radiology (``tests/appcore/test_datastore.py``): the records re-read while a label was checked."""
    import pathology.datastore

    other = PathologyDatastore(store._datastore_path)
    records_rewritten_during(monkeypatch, pathology.datastore, "check_shapes", store, other, "tile")
    store.save_label("tile", _upload(tmp_path, "a.xml", asap(SQUARE)), "final", {"model": "nuclei"})
    assert store.get_label_info("tile", "final")["model"] == "nuclei"
    assert PathologyDatastore(store._datastore_path).get_label_info("tile", "final")["model"] == "nuclei"


@pytest.mark.parametrize(
    ("name", "raw", "match"),
    [
        ("bad.png", _png(np.zeros((10, 10), np.uint8)), "the image is 80 x 60"),
        ("rgb.png", _png(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)), "one channel"),
        ("out.xml", asap([[70, 50], [90, 50], [90, 70]]), "outside the image"),
        ("open.json", dsa(SQUARE, closed=False), "does not close"),
        ("cls.xml", asap(SQUARE, name="Tumor"), "class 'Tumor'"),
        ("empty.json", json.dumps({"elements": []}).encode(), "no nucleus outline"),
        ("doc.txt", b"hello", "instance mask PNG"),
    ],
)
def test_refused_labels_leave_the_saved_one(
    store: PathologyDatastore, tmp_path: Path, name: str, raw: bytes, match: str
) -> None:
    store.save_label("tile", _upload(tmp_path, "first.xml", asap(SQUARE)), "final", {})
    before = Path(store.get_label_uri("tile", "final")).read_bytes()
    with pytest.raises(RequestError, match=match) as e:
        store.save_label("tile", _upload(tmp_path, name, raw), "final", {})
    assert e.value.status_code == 422
    assert Path(store.get_label_uri("tile", "final")).read_bytes() == before
    assert not [p for p in Path(store.get_label_uri("tile", "final")).parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("name", "raw", "match"),
    [
        ("notes.png", b"this is not an image", "not a readable PNG/JPEG image or slide"),
        ("slide.svs", b"II*\x00garbage that is no slide" * 10, "OpenSlide cannot read"),
        ("empty.png", b"", "empty"),
    ],
)
def test_unreadable_images_are_refused(
    store: PathologyDatastore, tmp_path: Path, name: str, raw: bytes, match: str
) -> None:
    with pytest.raises(RequestError, match=match) as e:
        store.add_image("new", _upload(tmp_path, name, raw), {})
    assert e.value.status_code == 422
    assert "new" not in store.list_images()


@pytest.mark.skipif(not SLIDE.exists(), reason=f"real slide {SLIDE} is absent")
def test_slide_labels_are_stored_as_polygons(store: PathologyDatastore, tmp_path: Path) -> None:
    poly = [[1000, 1000], [1020, 1000], [1020, 1025], [1000, 1025]]
    store.save_label("slide", _upload(tmp_path, "s.xml", asap(poly)), "final", {})
    doc = json.loads(Path(store.get_label_uri("slide", "final")).read_text())
    assert doc["polygons"] == [poly] and doc["size"] == [2220, 2967]
    with pytest.raises(RequestError, match="outside the image"):
        store.save_label("slide", _upload(tmp_path, "o.xml", asap([[2200, 10], [2300, 10], [2300, 40]])), "final", {})
    with pytest.raises(RequestError, match="masks are for PNG/JPEG tiles"):
        store.save_label("slide", _upload(tmp_path, "m.png", _png(np.zeros((5, 5), np.uint8))), "final", {})


@pytest.mark.parametrize(
    ("image", "first", "second"),
    [
        ("tile", asap(SQUARE), asap([[40, 20], [60, 20], [60, 50]])),
        pytest.param(
            "slide",
            asap([[100, 100], [200, 100], [200, 180]]),
            asap([[300, 300], [400, 300], [400, 380]]),
            marks=pytest.mark.skipif(not SLIDE.exists(), reason=f"real slide {SLIDE} is absent"),
        ),
    ],
)
def test_a_replaced_tile_or_slide_label_is_restored_from_its_version(
    tmp_path: Path, image: str, first: bytes, second: bytes
) -> None:
    from appcore.history import LabelHistory
    from appcore.projectdb import ProjectDB

    studies = tmp_path / "studies"
    studies.mkdir()
    Image.fromarray(np.full((60, 80, 3), 200, np.uint8)).save(studies / "tile.png")
    if SLIDE.exists():
        shutil.copyfile(SLIDE, studies / "slide.svs")
    history = LabelHistory(ProjectDB(tmp_path / "model" / "project.db"), tmp_path / "model" / "history")
    store = PathologyDatastore(str(studies), history=history, auto_reload=False)
    store.save_label(image, _upload(tmp_path, "1.xml", first), "final", {"model": "nuclei"})
    kept = Path(store.get_label_uri(image, "final")).read_bytes()
    store.save_label(image, _upload(tmp_path, "2.xml", second), "final", {})
    assert Path(store.get_label_uri(image, "final")).read_bytes() != kept

    restored = store.restore_label(image, "final", 1)
    assert (restored["version"], restored["restored_from"]) == (3, 1)
    assert Path(store.get_label_uri(image, "final")).read_bytes() == kept
    assert store.get_label_info(image, "final")["model"] == "nuclei"

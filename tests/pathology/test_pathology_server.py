"""The real ``monailabel start_server`` with the pathology app, sent the requests QuPath's extension sends.

The requests follow the MONAI Label QuPath extension (``MonaiLabelClient.java`` and its commands):
``GET /info/``, ``HEAD /datastore/image``, ``POST /infer/wsi/<model>?output=asap&image=<id>`` with a
JSON body when the slide is on the server, ``POST /infer/wsi_v2/<model>?output=asap`` with a PNG patch
(``file``) and the same JSON (``wsi`` form field) when it is not, ``POST /activelearning/<strategy>``
with ``image``, ``patch_size`` and ``image_size``, ``PUT /datastore/image`` and ``PUT /datastore/label``
(multipart ``file``/``label`` and ``params``) with ASAP XML, and ``POST /train/<model>``.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import SHARED
from tests.servers import monailabel_server

SLIDE = SHARED / "pathology" / "wsi" / "CMU-1-Small-Region.svs"
TILE = SHARED / "pathology" / "nuclei_cpm15" / "images" / "image04.png"

pytestmark = [
    pytest.mark.skipif(not SLIDE.exists() or not TILE.exists(), reason=f"real slide/tiles under {SHARED} are absent"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path]]:
    root = tmp_path_factory.mktemp("pathology")
    studies = root / "studies"
    studies.mkdir()
    shutil.copyfile(SLIDE, studies / "CMU-1-Small-Region.svs")
    shutil.copyfile(TILE, studies / "image04.png")
    conf = {"max_epochs": "1", "train_batch_size": "2"}
    with monailabel_server(root, str(studies), conf, app="pathology") as running:
        yield running.http, root


def qupath_body(location: list[int], size: list[int], fg: list[list[int]] | None = None) -> dict:
    """``RequestInfer`` as the extension serialises it with Gson."""
    return {
        "level": 0,
        "location": location,
        "size": size,
        "tile_size": [1024, 1024],
        "min_poly_area": 30,
        "params": {"foreground": fg or [], "background": [], "max_workers": 1},
    }


def asap_polygons(xml: bytes) -> list[tuple[str, str, np.ndarray]]:
    root = ET.fromstring(xml)
    out = []
    for ann in root.iter("Annotation"):
        pts = np.array([[float(c.get("X")), float(c.get("Y"))] for c in ann.iter("Coordinate")])
        out.append((ann.get("Name"), ann.get("Color"), pts))
    return out


def test_info_lists_models_the_extension_reads(server: tuple[httpx.Client, Path]) -> None:
    client, _ = server
    info = client.get("/info/").json()
    assert {"nuclei", "nuclick"} <= set(info["models"])
    assert info["models"]["nuclei"]["pathology"] is True and info["models"]["nuclei"]["nuclick"] is False
    assert info["models"]["nuclick"]["nuclick"] is True
    assert info["models"]["nuclei"]["labels"] == {"nucleus": 1}
    assert {"wsi_random", "wsi_uncertain", "wsi_bald", "wsi_tta", "wsi_diversity"} <= set(info["strategies"])
    assert client.head("/datastore/image", params={"image": "CMU-1-Small-Region"}).status_code == 200
    assert client.head("/datastore/image", params={"image": "not-there"}).status_code == 404


def test_wsi_infer_on_a_slide_region_as_qupath_sends_it(server: tuple[httpx.Client, Path]) -> None:
    client, _ = server
    location, size = [600, 900], [512, 512]
    r = client.post(
        "/infer/wsi/nuclei", params={"image": "CMU-1-Small-Region", "output": "asap"}, json=qupath_body(location, size)
    )
    assert r.status_code == 200, r.text
    polys = asap_polygons(r.content)
    assert len(polys) > 50, "an H&E region of 512 x 512 at 20x holds many nuclei"
    for name, color, pts in polys:
        assert name == "nucleus" and color.startswith("#") and len(color) == 7
        assert len(pts) >= 3
        assert (pts[:, 0] >= location[0] - 1).all() and (pts[:, 0] <= location[0] + size[0] + 1).all()
        assert (pts[:, 1] >= location[1] - 1).all() and (pts[:, 1] <= location[1] + size[1] + 1).all()

    # the same region as DSA JSON and as plain JSON
    r = client.post(
        "/infer/wsi_v2/nuclei",
        params={"image": "CMU-1-Small-Region", "output": "dsa"},
        data={"wsi": json.dumps(qupath_body(location, size))},
    )
    assert r.status_code == 200, r.text
    elements = r.json()["elements"]
    assert len(elements) == len(polys) and all(e["type"] == "polyline" and e["closed"] for e in elements)
    r = client.post(
        "/infer/wsi_v2/nuclei",
        params={"image": "CMU-1-Small-Region", "output": "json"},
        data={"wsi": json.dumps(qupath_body(location, size))},
    )
    assert r.status_code == 200 and r.json()["count"] == len(polys)


def test_wsi_v2_with_an_uploaded_patch(server: tuple[httpx.Client, Path]) -> None:
    client, _ = server
    patch = np.asarray(Image.open(TILE).convert("RGB"))[:300, :400]
    buf = io.BytesIO()
    Image.fromarray(patch).save(buf, format="PNG")
    r = client.post(
        "/infer/wsi_v2/nuclei",
        params={"output": "asap"},
        files={"file": ("patch123.png", buf.getvalue(), "image/png")},
        data={"wsi": json.dumps(qupath_body([0, 0], [0, 0]))},
    )
    assert r.status_code == 200, r.text
    polys = asap_polygons(r.content)
    assert polys
    assert all((p[:, 0] <= 401).all() and (p[:, 1] <= 301).all() for _, _, p in polys)


def test_nuclick_returns_the_clicked_nucleus(server: tuple[httpx.Client, Path]) -> None:
    client, _ = server
    location, size = [600, 900], [256, 256]
    r = client.post(
        "/infer/wsi/nuclei", params={"image": "CMU-1-Small-Region", "output": "json"}, json=qupath_body(location, size)
    )
    contours = r.json()["annotations"][0]["annotation"]["elements"][0]["contours"]
    target = np.asarray(max(contours, key=len))
    click = [int(round(v)) for v in target.mean(axis=0)]
    r = client.post(
        "/infer/wsi/nuclick",
        params={"image": "CMU-1-Small-Region", "output": "asap"},
        json=qupath_body(location, size, fg=[click]),
    )
    assert r.status_code == 200, r.text
    polys = asap_polygons(r.content)
    assert len(polys) == 1
    pts = polys[0][2]
    assert pts[:, 0].min() <= click[0] <= pts[:, 0].max() and pts[:, 1].min() <= click[1] <= pts[:, 1].max()


def test_tile_infer_returns_an_instance_mask_of_the_tile_size(server: tuple[httpx.Client, Path]) -> None:
    client, _ = server
    r = client.post("/infer/nuclei", params={"image": "image04", "output": "image"})
    assert r.status_code == 200, r.text
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    assert mask.shape == (493, 623) and mask.dtype == np.uint16
    assert mask.max() > 20 and len(np.unique(mask)) == mask.max() + 1
    r = client.post("/infer/nuclei", params={"image": "image04", "output": "json"})
    assert r.json()["count"] == mask.max()


def test_batch_infer_stores_polygons_for_slides_and_masks_for_tiles(server: tuple[httpx.Client, Path]) -> None:
    client, root = server
    r = client.post("/batch/infer/nuclei", json={})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = client.get("/batch/infer").json()
        if status.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        time.sleep(1)
    assert status.get("status") == "DONE", status
    original = root / "studies" / "labels" / "original"
    slide = json.loads((original / "CMU-1-Small-Region.json").read_text())
    assert slide["size"] == [2220, 2967] and len(slide["polygons"]) > 100
    mask = np.asarray(Image.open(original / "image04.png"))
    assert mask.shape == (493, 623) and mask.max() > 20


def test_next_patch_as_qupath_asks(server: tuple[httpx.Client, Path]) -> None:
    client, _ = server
    for strategy in ("wsi_random", "wsi_uncertain", "wsi_bald", "wsi_tta", "wsi_diversity"):
        body = {"image": "CMU-1-Small-Region", "patch_size": [1024, 1024], "image_size": [2220, 2967]}
        r = client.post(f"/activelearning/{strategy}", json=body)
        assert r.status_code == 200, r.text
        x, y, w, h = r.json()["bbox"]
        assert r.json()["id"] == "CMU-1-Small-Region" and (w, h) == (1024, 1024)
        assert 0 <= x <= 2220 - w and 0 <= y <= 2967 - h
    r = client.post("/activelearning/wsi_random", json={"image": "image04", "patch_size": [1024, 1024]})
    assert r.json()["bbox"] == [0, 0, 623, 493]

    # Two annotators on one slide, two patches each: four different patches.
    given = set()
    for who in ("qupath-1", "qupath-2"):
        body = {"image": "CMU-1-Small-Region", "patch_size": [1024, 1024], "k": 2, "client_id": who}
        r = client.post("/activelearning/wsi_uncertain", json=body)
        assert r.status_code == 200 and len(r.json()["bboxes"]) == 2, r.text
        given |= {tuple(b) for b in r.json()["bboxes"]}
    assert len(given) == 4


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        (
            "post",
            "/infer/wsi/nuclei",
            {"params": {"image": "CMU-1-Small-Region"}, "json": qupath_body([2000, 2900], [512, 512])},
            422,
        ),
        (
            "post",
            "/infer/wsi/nuclei",
            {"params": {"image": "../etc/passwd"}, "json": qupath_body([0, 0], [64, 64])},
            400,
        ),
        ("post", "/infer/wsi/nuclei", {"params": {"image": "missing"}, "json": qupath_body([0, 0], [64, 64])}, 404),
        (
            "post",
            "/infer/wsi/unknown",
            {"params": {"image": "CMU-1-Small-Region"}, "json": qupath_body([0, 0], [64, 64])},
            404,
        ),
        (
            "post",
            "/infer/wsi/nuclei",
            {"params": {"image": "CMU-1-Small-Region"}, "json": {**qupath_body([0, 0], [64, 64]), "level": 1}},
            400,
        ),
        (
            "post",
            "/infer/wsi/nuclick",
            {"params": {"image": "CMU-1-Small-Region"}, "json": qupath_body([0, 0], [256, 256])},
            400,
        ),
        ("post", "/infer/nuclei", {"files": {"file": ("tile.png", b"not a png at all")}}, 422),
        (
            "put",
            "/datastore/image",
            {"params": {"image": "notes"}, "files": {"file": ("notes.png", b"plain text")}},
            422,
        ),
        (
            "put",
            "/datastore/image",
            {"params": {"image": "bad"}, "files": {"file": ("bad.svs", b"II*\x00" + b"x" * 200)}},
            422,
        ),
        ("post", "/activelearning/unknown_strategy", {"json": {}}, 404),
        ("post", "/scoring/any_method", {}, 404),  # its one scoring method is epistemic
        ("delete", "/datastore/image", {"params": {"id": "no_such_slide"}}, 404),
        ("post", "/infer/wsi_v2/nuclei", {"files": {"file": ("p.png", b"x")}, "data": {"wsi": "{not json"}}, 422),
        ("post", "/infer/wsi/nuclei", {"json": qupath_body([0, 0], [64, 64])}, 422),  # no image named
        ("put", "/model/nuclei", {"files": {"file": ("nuclei.pt", b"not a checkpoint")}}, 422),
    ],
)
def test_bad_requests_get_4xx(
    server: tuple[httpx.Client, Path], method: str, path: str, kwargs: dict, status: int
) -> None:
    client, root = server
    before = {p for p in (root / "tmp").rglob("*") if p.is_file()}
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    left = {p for p in (root / "tmp").rglob("*") if p.is_file()} - before
    assert not left, f"the refused request left {sorted(p.name for p in left)} in the server's temporary folder"


def test_a_server_with_no_label_has_nothing_to_train_and_no_weights_to_withdraw(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Its own server: the module's shared one gets a label and published weights from other tests,
    in whatever order they run."""
    root = tmp_path_factory.mktemp("pathology_fresh")
    studies = root / "studies"
    studies.mkdir()
    shutil.copyfile(TILE, studies / "image04.png")
    with monailabel_server(root, str(studies), {"score_on_start": "false"}, app="pathology") as running:
        r = running.http.post("/train/nuclei", json={})
        assert r.status_code == 409, r.text  # no label saved
        r = running.http.delete("/model/nuclick")
        assert r.status_code == 404, r.text  # only published weights are withdrawn, never the shipped ones


def _asap(points: list[list[float]], kind: str = "Polygon") -> bytes:
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(points))
    return (
        '<?xml version="1.0"?><ASAP_Annotations><Annotations Name="" Description="" X="0" Y="0" W="0" H="0">'
        f'<Annotation Name="nucleus" Type="{kind}" PartOfGroup="nucleus" Color="#00c850"><Coordinates>{coords}'
        "</Coordinates></Annotation></Annotations><AnnotationGroups/></ASAP_Annotations>"
    ).encode()


def test_submit_patch_and_label_then_train(server: tuple[httpx.Client, Path]) -> None:
    client, root = server
    # "Submit Patch + Label": the patch as PNG, then its ASAP XML relative to the patch
    patch = np.asarray(Image.open(TILE).convert("RGB"))[:200, :200]
    buf = io.BytesIO()
    Image.fromarray(patch).save(buf, format="PNG")
    r = client.put(
        "/datastore/image",
        params={"image": "image04-patch-0_0_200_200"},
        files={"file": ("patch.png", buf.getvalue())},
        data={"params": "{}"},
    )
    assert r.status_code == 200 and r.json()["image"] == "image04-patch-0_0_200_200", r.text
    label = _asap([[20, 20], [40, 20], [42, 38], [22, 40]])
    r = client.put(
        "/datastore/label",
        params={"image": "image04-patch-0_0_200_200"},
        files={"label": ("image04.xml", label)},
        data={"params": "{}"},
    )
    assert r.status_code == 200, r.text
    saved = root / "studies" / "labels" / "final" / "image04-patch-0_0_200_200.png"
    before = saved.read_bytes()
    for bad in (_asap([[20, 20], [40, 20], [42, 38]], kind="Polyline"), _asap([[150, 150], [260, 150], [200, 260]])):
        r = client.put(
            "/datastore/label",
            params={"image": "image04-patch-0_0_200_200"},
            files={"label": ("bad.xml", bad)},
            data={"params": "{}"},
        )
        assert r.status_code == 422, r.text
    assert saved.read_bytes() == before

    # a slide label in slide coordinates ("Submit Label" on a slide that is on the server)
    r = client.put(
        "/datastore/label",
        params={"image": "CMU-1-Small-Region"},
        files={"label": ("cmu.xml", _asap([[700, 1000], [720, 1000], [720, 1018], [700, 1018]]))},
    )
    assert r.status_code == 200, r.text

    r = client.post("/train/nuclei", json={"max_epochs": 1, "train_batch_size": 2})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = client.get("/train/", params={"check_if_running": False}).json()
        if status.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        time.sleep(1)
    assert status.get("status") == "DONE", status
    assert (root / "app" / "model" / "nuclei.pt").exists(), "a completed run publishes the weights"
    r = client.post("/infer/nuclei", params={"image": "image04", "output": "json"})
    assert r.status_code == 200 and r.json()["model_trained"] is True


def test_patches_are_measured_in_the_background_at_start_and_after_training(server: tuple[httpx.Client, Path]) -> None:
    from pathology.spec import NUCLEI

    client, root = server
    # New weights served (as a training's publish does), whichever tests ran before this one.
    shipped = NUCLEI.shipped_weights_path.read_bytes()
    r = client.put("/model/nuclei", files={"file": ("nuclei.pt", shipped)})
    assert r.status_code == 200, r.text
    log = root / "server.log"
    measured, new_weights = "patches measured in the background", "new weights served, measuring every image again"

    def done(text: str) -> bool:  # measured at start, then again after the new weights were noticed
        return measured in text and new_weights in text and measured in text[text.index(new_weights) :]

    deadline = time.monotonic() + 300  # the prefetcher looks every 10 s, then measures every image
    while not done(log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert done(log.read_text()), log.read_text()[-2000:]


def test_wsi_uncertain_hands_out_the_patches_in_the_order_of_their_entropy(
    server: tuple[httpx.Client, Path], tmp_path: Path
) -> None:
    """The ranking the server serves is the patches' foreground entropy under the served weights,
    recomputed here: a slide of its own (no patch of it held by another test), every patch asked for."""
    from pathology.activelearning import PatchMeasures
    from pathology.spec import NUCLEI
    from pathology.weights import load_network
    from pathology.wsi import open_source
    from strategies.patches import patch_grid

    client, _ = server
    upload = {"file": (SLIDE.name, SLIDE.read_bytes())}
    r = client.put("/datastore/image", params={"image": "ranked_slide"}, files=upload)
    assert r.status_code == 200, r.text
    weights = client.get("/model/nuclei")
    assert weights.status_code == 200, weights.text
    (tmp_path / "served.pt").write_bytes(weights.content)
    source = open_source(SLIDE)
    try:
        boxes = patch_grid(source.dimensions, (1024, 1024))
        assert len(boxes) >= 3, "too few patches to tell an order"
        body = {"image": "ranked_slide", "patch_size": [1024, 1024], "k": len(boxes), "client_id": "ranker"}
        r = client.post("/activelearning/wsi_uncertain", json=body)
        assert r.status_code == 200, r.text
        measures, network = PatchMeasures(NUCLEI, measure="entropy"), load_network(NUCLEI, tmp_path / "served.pt")
        entropy = {tuple(b): float(measures.measures(source, b, network)["entropy"]) for b in boxes}
    finally:
        source.close()
    expected = sorted(entropy, key=lambda b: entropy[b], reverse=True)
    gaps = np.diff(sorted(entropy.values()))
    assert gaps.min() > 1e-4, f"near ties, the order would be arbitrary: {entropy}"
    assert [tuple(b) for b in r.json()["bboxes"]] == expected, (r.json()["bboxes"], entropy)


DSB = SHARED / "pathology" / "nuclei_dsb2018"
# The first brightfield colour image of the DSB2018 test split: the shipped weights give Dice 0.824
# on it as RGB, 0.818 as 8-bit grey and 0.797 as 12-bit values in a 16-bit PNG (read as Pillow
# converts it, clipped at 255: 0.0).
DSB_MIN_DICE = 0.75


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.skipif(not (DSB / "images").exists(), reason=f"real DSB2018 images {DSB} are absent")
@pytest.mark.parametrize("encoding", ["rgb", "grey 8-bit", "grey 16-bit"])
def test_tile_infer_on_a_dsb2018_image_however_it_is_encoded(server: tuple[httpx.Client, Path], encoding: str) -> None:
    """A DSB2018 test image uploaded to ``/infer/nuclei`` as RGB, 8-bit grey and 16-bit grey.

    A camera's 16-bit greyscale PNG is read stretched from its own range; Pillow alone clipped it
    to white and the network found nothing.
    """
    from research.pathology.dsb2018 import ImageType, split_ids
    from research.pathology.metrics import dice

    image_id = min(i for i, t in split_ids("test").items() if t is ImageType.BRIGHTFIELD_COLOUR)
    rgb = np.asarray(Image.open(DSB / "images" / f"{image_id}.png").convert("RGB"))
    truth = np.asarray(Image.open(DSB / "masks" / f"{image_id}.png"))
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    body = {
        "rgb": lambda: _png(rgb),
        "grey 8-bit": lambda: _png(rgb, "L"),
        "grey 16-bit": lambda: _png(grey.astype(np.uint16) * 16 + 100),  # 12-bit values
    }[encoding]()
    r = server[0].post("/infer/nuclei", params={"output": "image"}, files={"file": ("frame.png", body, "image/png")})
    assert r.status_code == 200, r.text
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    assert mask.shape == truth.shape and mask.dtype == np.uint16
    assert dice(mask, truth) >= DSB_MIN_DICE, (encoding, dice(mask, truth))

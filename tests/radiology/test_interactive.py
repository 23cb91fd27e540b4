"""Interactive models (issue 26): the click contract, the graph-cut engine, refused clicks, a real
server driven as Slicer drives it, and clicks on real CT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from appcore.app import _check_infer_params
from appcore.errors import RequestError
from appcore.settings import AppSettings
from radiology.graphcut import GeodesicGraphCut, GraphCutParams, ball_offsets, seed_mask, seed_masks
from radiology.interactive import ENGINES, SUFFIX, base_model, click_engine, interactive_name, parse_clicks
from radiology.organs_ct import ORGANS_CT
from radiology.registry import MODELS
from tests.conftest import SHARED, TOTALSEG, dice, requires_shared

requires_ct = pytest.mark.skipif(
    not (TOTALSEG / "example_ct_sm.nii.gz").exists(), reason=f"real CT folder {TOTALSEG} is absent"
)

LABELS = {"a": 1, "b": 2}
A, B, C = (22, 22, 40), (58, 58, 40), (22, 58, 40)  # ball centres, mm


def phantom(spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two bright balls of radius 13 mm (labels 1 and 2) on a darker, noisy background, and a third
    ball (no label) of their intensity, 10 mm from either; image, truth and affine."""
    rng = np.random.default_rng(0)
    shape = tuple(int(round(80 / s)) for s in spacing)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"), -1)
    truth = np.zeros(shape, np.uint8)
    image = rng.normal(0.0, 8.0, shape).astype(np.float32)
    for value, centre in ((1, A), (2, B), (0, C)):
        ball = ((grid - np.array(centre)) ** 2).sum(-1) <= 13.0**2
        image[ball] += 100.0
        if value:
            truth[ball] = value
    return image, truth, np.diag([*spacing, 1.0])


def voxel(mm: tuple[float, float, float], spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(int(round(c / s)) for c, s in zip(mm, spacing, strict=True))  # type: ignore[return-value]


ISO, ANISO = (1.0, 1.0, 1.0), (1.0, 1.0, 3.0)


# One click on a clean ball gives Dice 0.73-0.79 (measured): the geodesic pays for an edge from where
# it starts, so the boundary lands about 1 mm inside a blurred one (docs/interactive.md, limits).
@pytest.mark.parametrize(
    ("case", "spacing", "clicks", "expect"),
    [
        ("one click segments its ball", ISO, {"a": [A]}, {1: 0.65}),
        ("each label its own clicks", ISO, {"a": [A], "b": [B]}, {1: 0.65, 2: 0.65}),
        ("anisotropic voxels", ANISO, {"a": [A]}, {1: 0.65}),
        (
            "background clicks elsewhere change nothing",
            ISO,
            {"a": [A], "background": [(5, 75, 5)]},
            {1: 0.65},
        ),
        ("an unclicked label stays empty", ISO, {"b": [B]}, {1: 0.0, 2: 0.65}),
    ],
)
def test_clicks_segment_the_clicked_structure(
    case: str, spacing: tuple[float, float, float], clicks: dict, expect: dict[int, float]
) -> None:
    image, truth, affine = phantom(spacing)
    sent = {name: [voxel(p, spacing) for p in points] for name, points in clicks.items()}
    label = GeodesicGraphCut(LABELS).segment(image, affine, sent, None)
    assert label.shape == image.shape and label.dtype == np.uint8
    for value, least in expect.items():
        score = dice(label == value, truth == value)
        assert score >= least if least else not (label == value).any(), (case, value, score)
    assert not (label[truth == 0][image[truth == 0] > 60]).any(), "the unlabelled ball is left alone"


def test_background_click_removes_a_false_region_of_the_proposal() -> None:
    image, truth, affine = phantom()
    proposal = truth.copy()
    grid = np.indices(truth.shape).transpose(1, 2, 3, 0)
    false = ((grid - np.array(C)) ** 2).sum(-1) <= 13.0**2
    proposal[false] = 1  # the automatic model also took the third ball for label 1
    engine = GeodesicGraphCut(LABELS)
    assert np.array_equal(engine.segment(image, affine, {}, proposal), proposal), "no click: the proposal"
    fixed = engine.segment(image, affine, {"background": [C]}, proposal)
    assert dice(fixed == 1, truth == 1) > 0.95 and not fixed[false].any()
    assert dice(fixed == 2, truth == 2) == 1.0, "a label the clicks do not concern keeps its proposal"


def test_click_balls_are_balls_in_mm_and_stay_inside_the_image() -> None:
    offsets = {tuple(o) for o in ball_offsets(3.0, (1.0, 1.0, 3.0)).tolist()}
    assert len(offsets) == 29 + 2 and (0, 0, 1) in offsets and (0, 1, 1) not in offsets  # 3 mm, 3 mm slices
    mask = seed_mask((4, 4, 4), [(0, 0, 0), (3, 3, 3)], ball_offsets(1.0, (1.0, 1.0, 1.0)))
    assert mask[0, 0, 0] and mask[3, 3, 3] and mask.sum() == 2 * 4  # each corner and its 3 neighbours inside


# Balls of 3 mm on 1 mm voxels; a click 2 mm from one of the other side shares part of its ball.
@pytest.mark.parametrize(
    ("case", "mine", "others"),
    [
        ("far apart: whole balls", [(10, 10, 10)], [(20, 20, 20)]),
        ("2 mm apart: the shared voxels go to the nearer click", [(10, 10, 10)], [(12, 10, 10)]),
        ("1 mm apart", [(10, 10, 10)], [(10, 11, 10)]),
        ("several clicks each side", [(10, 10, 10), (5, 5, 5)], [(10, 12, 10), (6, 5, 5)]),
        ("clicks at the crop's corner", [(0, 0, 0)], [(0, 1, 0)]),
    ],
)
def test_seed_masks_keep_every_click_on_its_side(case: str, mine: list, others: list) -> None:
    spacing = (1.0, 1.0, 1.0)
    fg, bg = seed_masks((24, 24, 24), mine, others, ball_offsets(3.0, spacing), spacing)
    assert not (fg & bg).any(), case
    assert all(fg[q] for q in mine) and all(bg[q] for q in others), case
    grid = np.indices(fg.shape).transpose(1, 2, 3, 0).astype(float)

    def distance(points: list) -> np.ndarray:
        return np.min([np.sqrt(((grid - np.array(q)) ** 2).sum(-1)) for q in points], axis=0)

    # A seed voxel is never nearer to a click of the other side than to one of its own.
    assert (distance(mine)[fg] <= distance(others)[fg]).all(), case
    assert (distance(others)[bg] <= distance(mine)[bg]).all(), case


@pytest.mark.parametrize(("offset", "label"), [((2, 0, 0), "a"), ((0, 1, 0), "a"), ((0, 0, 2), "background")])
def test_a_click_beside_one_of_the_other_side_keeps_its_voxel(offset: tuple[int, int, int], label: str) -> None:
    """A click 1-2 mm from a click of the other side (inside its 3 mm ball) still says what its own
    voxel is: the structure's click stays in the structure, the background's stays out."""
    image, truth, affine = phantom()
    first = A
    second = tuple(c + o for c, o in zip(A, offset, strict=True))
    other = "background" if label == "a" else "a"
    clicks = {label: [first], other: [second]}
    out = GeodesicGraphCut(LABELS).segment(image, affine, clicks, None)
    inside = {"a": 1, "background": 0}
    assert out[first] == inside[label] and out[second] == inside[other], (out[first], out[second])


# Clicks of a session on the phantom: the structure's, a background click in the unlabelled ball
# beside it and one on the structure's edge.
@pytest.mark.parametrize(
    ("case", "spacing", "clicks"),
    [
        ("one click", ISO, {"a": [A]}),
        ("anisotropic voxels", ANISO, {"a": [A]}),
        ("with background clicks", ISO, {"a": [A, (22, 30, 40)], "background": [C, (22, 36, 40)]}),
        ("two labels", ISO, {"a": [A], "b": [B], "background": [C]}),
    ],
)
def test_the_intensity_term_only_takes_voxels_out(case: str, spacing: tuple[float, float, float], clicks: dict) -> None:
    """The intensity term (structure against the rest, from the image's own samples) may say a voxel
    the geodesic reached does not look like the structure; it never adds one the geodesic did not
    reach (letting it add flooded tissue next to small structures: docs/interactive.md)."""
    image, _, affine = phantom(spacing)
    sent = {name: [voxel(p, spacing) for p in points] for name, points in clicks.items()}
    without = GeodesicGraphCut(LABELS, params=GraphCutParams(intensity=0.0)).segment(image, affine, sent, None)
    with_term = GeodesicGraphCut(LABELS).segment(image, affine, sent, None)
    for value in LABELS.values():
        assert not ((with_term == value) & (without != value)).any(), (case, value)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_has_an_interactive_model_and_an_engine(model: str) -> None:
    assert model in ENGINES, f"add {model!r} to radiology.interactive.ENGINES"
    assert base_model(interactive_name(model)) == model and interactive_name(model).endswith(SUFFIX)
    assert hasattr(click_engine(MODELS[model]), "segment")


# -- refused clicks: 422, with what was wrong ------------------------------------------------------
SHAPE = (20, 30, 10)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"liver": [[20, 0, 0]]}, r"outside the image, whose voxel indices run from \[0, 0, 0\] to \[19, 29, 9\]"),
        ({"liver": [[-1, 0, 0]]}, "outside the image"),
        ({"background": [[0, 0, 10]]}, "outside the image"),
        ({"liver": [[1.5, 2, 3]]}, "not an integer voxel index"),
        ({"liver": [["1", 2, 3]]}, "not an integer voxel index"),
        ({"liver": [[True, 2, 3]]}, "not an integer voxel index"),
        ({"liver": [[float("nan"), 2, 3]]}, "not an integer voxel index"),
        ({"liver": [[1, 2]]}, r"three voxel indices \[i, j, k\]"),
        ({"liver": [5, 6, 7]}, r"three voxel indices \[i, j, k\]"),
        ({"liver": {"x": 1}}, "must be a list of"),
        ({"anterior": [[1, 2, 3]]}, "'anterior', which is no label of model 'organs_ct'"),
        ({"foreground": [[1, 2, 3]]}, "'foreground' clicks need 'label'"),
        ({"foreground": [[1, 2, 3]], "label_name": "lung"}, "'foreground' clicks need 'label'"),
        ({"liver": [[1, 2, 3]] * 150, "background": [[1, 1, 1]] * 51}, r"201 clicks in one request; at most 200"),
    ],
)
def test_bad_clicks_are_a_422_that_says_what(params: dict, match: str) -> None:
    with pytest.raises(RequestError, match=match) as refused:
        parse_clicks(params, ORGANS_CT, SHAPE, 200)
    assert refused.value.status_code == 422


@pytest.mark.parametrize(
    ("params", "clicks"),
    [
        ({}, {}),
        ({"liver": [[1, 2, 3]], "client_id": "x", "result_extension": ".nrrd"}, {"liver": [(1, 2, 3)]}),
        ({"liver": [[1.0, 2, 3]]}, {"liver": [(1, 2, 3)]}),  # a float with no fraction, as some viewers send
        ({"anterior": [], "spleen": [], "background": [[0, 0, 0]]}, {"background": [(0, 0, 0)]}),  # Slicer's empties
        ({"foreground": [[19, 29, 9]], "label_name": "liver"}, {"liver": [(19, 29, 9)]}),  # DeepGrow's names
        ({"label_info": [{"name": "liver", "id": 1}], "roi": [1, 2, 3, 4, 5, 6]}, {}),
    ],
)
def test_accepted_clicks(params: dict, clicks: dict) -> None:
    assert parse_clicks(params, ORGANS_CT, SHAPE, 200) == clicks


@pytest.mark.parametrize(
    ("params", "passed"),
    [
        ({"label": "liver"}, {"label_name": "liver"}),  # Slicer's current segment, sent with its clicks
        ({"label": "kidney_left", "liver": [[1, 2, 3]]}, {"label_name": "kidney_left", "liver": [[1, 2, 3]]}),
    ],
)
def test_a_segment_name_in_label_is_passed_on_as_label_name(params: dict, passed: dict) -> None:
    assert json.loads(str(_check_infer_params(json.dumps(params)))) == passed


def test_max_clicks_is_a_setting() -> None:
    assert AppSettings.from_conf({}, MODELS).max_clicks == 200
    assert AppSettings.from_conf({"max_clicks": "10"}, MODELS).max_clicks == 10
    with pytest.raises(ValueError, match="max_clicks: must be at least 1"):
        AppSettings.from_conf({"max_clicks": "0"}, MODELS)


# -- the app and a real server ---------------------------------------------------------------------
def slicer_params(info: dict[str, Any], clicks: dict[str, list], current: str) -> dict[str, Any]:
    """What 3D Slicer's MONAI Label module sends with a DeepEdit model: every label the server lists
    (its points, or an empty list), the current segment as ``label``, and NRRD asked for."""
    params: dict[str, Any] = {name: clicks.get(name, []) for name in info["labels"]}
    params.update({"label": current, "result_extension": ".nrrd", "result_dtype": "uint8"})
    return params


@requires_ct
@requires_shared
@pytest.mark.slow
def test_slicer_clicks_through_the_client_on_a_real_server(tmp_path: Path) -> None:
    import nrrd
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    from benchmarks.interactive import next_click
    from radiology.graphcut import voxel_spacing
    from tests.servers import monailabel_server

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copyfile(TOTALSEG / "example_ct_sm.nii.gz", studies / "ct.nii.gz")
    conf = {"models": "organs_ct,hippocampus", "score_on_start": "false", "score_new_images": "false"}
    with monailabel_server(tmp_path, str(studies), conf) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        info = client.info()
        model = info["models"]["organs_ct_interactive"]
        assert model["type"] == "deepedit" and model["labels"] == {**ORGANS_CT.labels.name_to_id(), "background": 0}
        assert info["models"]["hippocampus_interactive"]["type"] == "deepedit"
        assert "background" in info["labels"], "Slicer sends background clicks only for a listed 'background'"

        source = nib.load(studies / "ct.nii.gz")
        truth = remapped_truth()
        # The simulated annotator's first click: the centre of the liver (benchmarks.interactive).
        _, first = next_click(
            np.zeros_like(truth), np.where(truth == 5, 5, 0), {5: "liver"}, voxel_spacing(source.affine)
        )
        centre = list(first)
        out, params = client.infer("organs_ct_interactive", "ct", slicer_params(info, {"liver": [centre]}, "liver"))
        values, _ = nrrd.read(out, index_order="F")
        assert values.shape == source.shape and params["clicks"] == 1
        # 0.54 measured (benchmarks/RESULTS.md): a 40 mm crop around one click holds part of a liver
        assert dice(values == 5, truth == 5) > 0.4, "one click on an untrained model already finds the liver"

        _, empty = client.infer("organs_ct_interactive", "ct", slicer_params(info, {}, "liver"))
        _, automatic = client.infer("organs_ct", "ct", {"result_extension": ".nrrd"})
        assert empty["clicks"] == 0 and empty["model_trained"] is automatic["model_trained"] is False

        outside = [source.shape[0], 0, 0]
        with pytest.raises(MONAILabelClientException, match="422.*outside the image"):
            client.infer("organs_ct_interactive", "ct", slicer_params(info, {"liver": [outside]}, "liver"))
        with pytest.raises(MONAILabelClientException, match="422.*lung.*which is no label of model"):
            client.infer("organs_ct_interactive", "ct", {"lung": [[1, 2, 3]]})
        listing = client.datastore()["objects"]["ct"]
        assert not listing["labels"], "a refused request stores nothing"
        versions = server.http.get("/model/organs_ct_interactive/versions")
        assert versions.status_code == 404 and "no weights of its own" in versions.text

        # Scribbles as Slicer sends them: every segment exported into one volume, named by label_info.
        assert info["models"]["organs_ct_scribbles"]["type"] == "scribbles"
        segments = np.zeros(source.shape, np.uint8)
        segments[np.asarray(values) == 5] = 1  # the liver from the clicks above
        segments[tuple(centre)] = 3  # a foreground stroke
        strokes = tmp_path / "scribbles.nii.gz"
        nib.save(nib.Nifti1Image(segments, source.affine), strokes)
        label_info = [{"name": "liver", "id": 1}, {"name": "background_scribbles", "id": 2}]
        label_info += [{"name": "foreground_scribbles", "id": 3}]
        params = {"label_info": label_info, "selected_label_name": "liver", "result_extension": ".nrrd"}
        out, answer = client.infer("organs_ct_scribbles", "ct", params, label_in=str(strokes))
        refined, _ = nrrd.read(out, index_order="F")
        assert answer["selected_label_name"] == "liver" and set(np.unique(refined)) <= {0, 1}
        assert dice(refined == 1, np.asarray(values) == 5) > 0.8, "strokes inside the label keep it"
        with pytest.raises(MONAILabelClientException, match="422.*selected_label_name"):
            client.infer("organs_ct_scribbles", "ct", {"selected_label_name": "lung"}, label_in=str(strokes))


def remapped_truth() -> np.ndarray:
    from research.radiology.label_mapping import load_class_map, remap_by_name

    seg = np.asarray(nib.load(TOTALSEG / "example_seg.nii.gz").dataobj)
    return remap_by_name(seg, load_class_map(TOTALSEG / "class_map.json"), ORGANS_CT.labels)


# Dice after 10 simulated clicks on the liver of the TotalSegmentator example, organs_ct untrained.
# Measured 0.889 (benchmarks/RESULTS.md, "Interactive models: the intensity term", 2026-12-07; 0.849
# before it); the bound leaves a margin of about 0.03.
LIVER_MARGIN = 0.85


@requires_ct
@pytest.mark.slow
def test_ten_clicks_segment_the_liver_of_a_real_ct() -> None:
    from benchmarks.interactive import ct_sessions, run_session

    session = next(s for s in ct_sessions(SHARED) if s.name.endswith("liver"))
    run_session(click_engine(ORGANS_CT), session, 10)
    assert session.dice[0] == 0.0 and session.dice[10] >= LIVER_MARGIN, session.dice


# A structure outside the benchmark (its check set, benchmarks/RESULTS.md "Interactive models: the
# intensity term"): the pulmonary artery of the contrast chest CT crop (1.5 mm), 10 simulated clicks.
# 0.688 before the intensity term, 0.831 with it (measured); the bound leaves a margin.
PULMONARY_MARGIN = 0.78


@pytest.mark.skipif(
    not (TOTALSEG / "chest_pulm" / "pulmonary_artery.nii.gz").exists(), reason=f"{TOTALSEG}/chest_pulm is absent"
)
@pytest.mark.slow
def test_ten_clicks_segment_the_pulmonary_artery_of_a_chest_ct() -> None:
    from benchmarks.interactive import Session, run_session

    image = nib.load(TOTALSEG / "chest_pulm" / "ct_cropped.nii.gz")
    truth = np.asarray(nib.load(TOTALSEG / "chest_pulm" / "pulmonary_artery.nii.gz").dataobj) > 0
    # organs_ct has no pulmonary artery: its engine is label-agnostic, so the aorta's id stands in.
    session = Session(
        "chest_pulm pulmonary artery",
        np.asarray(image.dataobj, dtype=np.float32),
        image.affine,
        np.where(truth, 8, 0).astype(np.uint8),
        {"aorta": 8},
    )
    run_session(click_engine(ORGANS_CT), session, 10)
    assert session.dice[10] >= PULMONARY_MARGIN, session.dice


# -- scribbles ---------------------------------------------------------------------------------------
def test_scribbles_refine_a_proposal() -> None:
    image, truth, affine = phantom()
    engine = GeodesicGraphCut(LABELS)
    proposal = (truth == 1) | (((np.indices(truth.shape).transpose(1, 2, 3, 0) - np.array(C)) ** 2).sum(-1) <= 169)
    background = seed_mask(truth.shape, [C], ball_offsets(3.0, (1.0, 1.0, 1.0)))
    nothing = np.zeros_like(background)
    assert np.array_equal(engine.refine(image, affine, nothing, nothing, proposal), proposal), "no strokes"
    fixed = engine.refine(image, affine, nothing, background, proposal)
    assert dice(fixed, truth == 1) > 0.95, "a background stroke in the false ball removes it"
    grown = engine.refine(image, affine, seed_mask(truth.shape, [B], ball_offsets(3.0, (1, 1, 1))), nothing, None)
    assert dice(grown, truth == 2) > 0.65, "strokes alone segment (no proposal)"


@pytest.mark.parametrize(
    ("params", "volume", "match"),
    [
        ({"selected_label_name": "liver"}, None, "Send the scribbles as a label volume in the form field 'label'"),
        ({"selected_label_name": "liver"}, (20, 30, 9), r"scribbles volume has shape \(20, 30, 9\); the image's is"),
        ({"selected_label_name": "lung"}, SHAPE, r"'selected_label_name', one of \['spleen'"),
        ({}, SHAPE, "'selected_label_name'"),
        ({"selected_label_name": "liver", "label_info": [{"name": "x"}]}, SHAPE, "label_info must be a list of"),
        ({"selected_label_name": "liver", "label_info": "x"}, SHAPE, "label_info must be a list of"),
    ],
)
def test_bad_scribbles_are_a_422_that_says_what(tmp_path: Path, params: dict, volume: Any, match: str) -> None:
    from radiology.interactive import ScribblesInfer

    task = ScribblesInfer(ORGANS_CT, None, GeodesicGraphCut(ORGANS_CT.labels.name_to_id()))  # type: ignore[arg-type]
    request = dict(params)
    if volume is not None:
        request["label"] = str(tmp_path / "s.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros(volume, np.uint8), np.eye(4)), request["label"])
    with pytest.raises(RequestError, match=match) as refused:
        task.check_request(request, SHAPE)
    assert refused.value.status_code == 422


class _CountingAutomatic:
    """An automatic model's infer task that answers ``label`` and counts its runs."""

    def __init__(self, label: np.ndarray, affine: np.ndarray, weights: Path) -> None:
        self.label, self.affine, self.weights, self.runs = label, affine, weights, 0

    def get_path(self) -> str:
        return str(self.weights)

    def __call__(self, request: dict) -> tuple[str, dict]:
        self.runs += 1
        out = self.weights.with_name(f"proposal{self.runs}.nii.gz")
        nib.save(nib.Nifti1Image(self.label.astype(np.uint8), self.affine), out)
        return str(out), {}


def test_scribbles_refine_the_trained_model_s_proposal_computed_once_per_image(tmp_path: Path) -> None:
    from radiology.interactive import ScribblesInfer

    image, truth, affine = phantom()
    image_path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), image_path)
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"w")
    liver = ORGANS_CT.labels.name_to_id()["liver"]
    proposal = np.where((truth == 1) | (truth == 2), liver, 0)  # the model also took ball B as liver
    automatic = _CountingAutomatic(proposal, affine, weights)
    task = ScribblesInfer(ORGANS_CT, automatic, GeodesicGraphCut(ORGANS_CT.labels.name_to_id()))  # type: ignore[arg-type]
    strokes = seed_mask(truth.shape, [B], ball_offsets(3.0, ISO)).astype(np.uint8) * 2  # background on ball B
    strokes_path = tmp_path / "strokes.nii.gz"
    nib.save(nib.Nifti1Image(strokes, affine), strokes_path)
    label_info = [{"name": "background_scribbles", "id": 2}, {"name": "foreground_scribbles", "id": 3}]
    request = {"image": str(image_path), "label": str(strokes_path), "selected_label_name": "liver"}
    for _ in range(2):
        out, answer = task({**request, "label_info": label_info})
        mask = np.asarray(nib.load(out).dataobj)
        assert answer["label_names"] == {"liver": 1} and mask.shape == truth.shape
        assert dice(mask == 1, truth == 1) > 0.9, "the proposal kept where no stroke says otherwise, ball B removed"
    assert automatic.runs == 1, "the second request reuses the proposal of the same image and weights"

"""The app base both apps extend (``appcore.app.LabelingApp``): registry, settings, weights, tasks."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from appcore import seam
from appcore.app import LabelingApp
from appcore.settings import PathologySettings, RadiologySettings
from pathology.app import PathologyApp
from pathology.registry import MODELS as PATHOLOGY_MODELS
from radiology.app import RadiologyApp
from radiology.registry import MODELS as RADIOLOGY_MODELS
from tests.apps import unwatched_app
from tests.conftest import ROOT


def _pathology(tmp_path: Path, conf: dict[str, str]) -> PathologyApp:
    (tmp_path / "s").mkdir(exist_ok=True)
    return unwatched_app(tmp_path / "a", tmp_path / "s", {"score_on_start": "false", **conf}, PathologyApp)


@pytest.mark.parametrize(
    ("app", "registry", "settings"),
    [(RadiologyApp, RADIOLOGY_MODELS, RadiologySettings), (PathologyApp, PATHOLOGY_MODELS, PathologySettings)],
)
def test_both_apps_extend_the_base_with_their_registry_and_settings(app: type, registry: dict, settings: type) -> None:
    assert issubclass(app, LabelingApp)
    assert (app.registry, app.settings_class) == (registry, settings)


@pytest.mark.parametrize("app", ["radiology", "pathology"])
def test_monai_label_instantiates_the_entry_point_class(app: str) -> None:
    """``monailabel start_server`` takes the class of ``main.py`` with ``MONAILabelApp`` among its direct bases."""
    from monailabel.utils.others.class_utils import get_class_of_subclass_from_file

    found = get_class_of_subclass_from_file("main", str(ROOT / "apps" / app / "main.py"), "MONAILabelApp")
    assert found is not None and found.__name__ == "MyApp"
    assert issubclass(found, RadiologyApp if app == "radiology" else PathologyApp)


@pytest.mark.parametrize(
    ("models", "served"),
    [
        ("nuclei", ["nuclei"]),
        ("nuclick", ["nuclick"]),
        ("nuclick,nuclei", ["nuclick", "nuclei"]),
        ("all", ["nuclei", "nuclick"]),
    ],
)
def test_pathology_serves_the_models_conf_names(tmp_path: Path, models: str, served: list[str]) -> None:
    app = _pathology(tmp_path, {"models": models})
    assert list(seam.infers(app)) == served
    trainers = seam.trainers(app)
    assert list(trainers) == served
    assert len({id(t) for t in trainers.values()}) == 1, "models of one network share one trainer"
    assert {app.published_weights(m) for m in served} == {app.model_dir / "nuclei.pt"}


def test_pathology_ranks_patches_under_al_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = _pathology(tmp_path, {"models": "nuclei,nuclick", "al_model": "nuclick"})
    marker = object()
    monkeypatch.setattr(seam.infers(app)["nuclick"], "network", lambda: marker)
    assert app._strategies["wsi_uncertain"]._network() is marker


def test_pathology_refuses_a_radiology_only_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['infer_memory_mb'\] for the pathology app \(infer_memory_mb is an option"):
        _pathology(tmp_path, {"infer_memory_mb": "4096"})


@pytest.mark.parametrize(
    ("app", "settings", "name"),
    [(RadiologyApp, RadiologySettings, "radiology"), (PathologyApp, PathologySettings, "pathology")],
)
def test_each_app_refuses_an_option_it_does_not_know_naming_its_own(
    tmp_path: Path, app: type, settings: type, name: str
) -> None:
    """At the app's start, with the full list of that app's options (not the other app's)."""
    (tmp_path / "s").mkdir()
    valid = re.escape(str(sorted(settings.options())))
    with pytest.raises(
        ValueError, match=rf"Unknown --conf option\(s\) \['epochs'\] for the {name} app; valid options: {valid}$"
    ):
        unwatched_app(tmp_path / "a", tmp_path / "s", {"score_on_start": "false", "epochs": "3"}, app)


@pytest.mark.parametrize(
    ("app", "model", "registry"),
    [(RadiologyApp, "nuclei", RADIOLOGY_MODELS), (PathologyApp, "hippocampus", PATHOLOGY_MODELS)],
)
def test_each_app_picks_models_from_its_own_registry(tmp_path: Path, app: type, model: str, registry: dict) -> None:
    (tmp_path / "s").mkdir()
    valid = re.escape(str(list(registry)))
    with pytest.raises(ValueError, match=rf"--conf models: unknown model\(s\) \['{model}'\]; valid choices: {valid}"):
        unwatched_app(tmp_path / "a", tmp_path / "s", {"score_on_start": "false", "models": model}, app)


def test_radiology_models_have_their_own_published_file(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    conf = {"models": "hippocampus,organs_ct", "score_on_start": "false"}
    app = unwatched_app(tmp_path / "a", tmp_path / "s", conf, RadiologyApp)
    trainers = seam.trainers(app)
    assert trainers["hippocampus"] is not trainers["organs_ct"]
    assert app.weight_paths("organs_ct") == [str(tmp_path / "a" / "model" / "organs_ct.pt")], "no shipped weights"
    assert app.weight_paths("hippocampus")[-1] == str(tmp_path / "a" / "model" / "hippocampus.pt")


def test_a_missing_studies_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Studies folder '.*nowhere' does not exist; pass --studies DIR"):
        unwatched_app(tmp_path / "a", tmp_path / "nowhere", {"score_on_start": "false"}, PathologyApp)


def test_an_app_without_task_factories_says_which_to_define() -> None:
    class Bare(LabelingApp):
        pass

    bare = Bare.__new__(Bare)
    with pytest.raises(NotImplementedError, match="Bare builds no infer task \\(define new_infer\\)"):
        bare.new_infer("m")
    with pytest.raises(NotImplementedError, match="Bare builds no training task \\(define new_trainer\\)"):
        bare.new_trainer("m")


def test_the_entry_points_stay_thin() -> None:
    for app in ("radiology", "pathology"):
        spec = importlib.util.spec_from_file_location("main", ROOT / "apps" / app / "main.py")
        assert spec is not None and len((ROOT / "apps" / app / "main.py").read_text().splitlines()) < 15

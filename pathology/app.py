"""The pathology MONAI Label app: nuclei on tiles and slides for QuPath and Digital Slide Archive."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from monailabel.config import settings as ml_settings
from monailabel.interfaces.datastore import Datastore
from monailabel.utils.others.pathology import create_asap_annotations_xml, create_dsa_annotations_json

from appcore import seam
from appcore.app import LabelingApp
from appcore.errors import bad_request
from appcore.projectdb import project_db
from appcore.settings import PathologySettings
from pathology.activelearning import PatchMeasures, WSIDiverse, WSIRandom, WSIUncertain
from pathology.datastore import PathologyDatastore
from pathology.infer import NucleiInfer
from pathology.prefetch import PatchPrefetcher
from pathology.registry import MODELS, PathologyModel
from pathology.spec import NucleiSpec
from pathology.tile_scoring import TileScorer
from pathology.train import NucleiTrainer
from pathology.wsi import SlideSource, check_region, open_source
from strategies.background import BackgroundScoring
from strategies.ranked import RankedStrategy, ranked_strategies
from strategies.reservations import ReservationBook
from strategies.scores import ScoreStore
from strategies.scoring import UncertaintyScoring

logger = logging.getLogger(__name__)

OUTPUTS = ("json", "asap", "dsa")


class PathologyApp(BackgroundScoring, LabelingApp):
    """MONAI Label app serving ``pathology.registry.MODELS`` chosen by ``--conf models``.

    Weights: ``<app_dir>/model/<file>`` (the file name of the network's shipped weights, ``nuclei.pt``)
    once a training run has published it, the shipped ``pathology/weights/<file>`` before that; models
    running one network (``nuclei`` and ``nuclick``) share them, and one trainer.

    Next sample: the ``wsi_*`` strategies pick patches of one slide; ``random``, ``epistemic``
    (also ``entropy``), ``bald``, ``tta`` and ``diversity`` pick whole images of a folder of tiles,
    ranked by the scores of ``POST /scoring/epistemic`` (``pathology.tile_scoring``), which runs at
    start, after a training run or new weights, and for new images, as in the radiology app.
    """

    registry = MODELS
    settings_class = PathologySettings
    reservation_book = ReservationBook
    app_name = "Pathology (nuclei)"
    app_description = "Nuclei instance segmentation and interactive nuclei on H&E tiles and slides"

    settings: PathologySettings
    models: dict[str, PathologyModel]

    def prepare(self) -> None:
        # Tile scores: one store for the strategies, the scoring method and the new-image check.
        self._score_store = ScoreStore(
            self.model_dir / "scores_tiles.json", db=project_db(self.model_dir, self.settings.database_url)
        )

    # -- weights ---------------------------------------------------------------------------------
    def spec(self, model: str) -> NucleiSpec:
        return self.models[model].spec

    def published_weights(self, model: str) -> Path:
        return self.model_dir / self.spec(model).shipped_weights  # shared by the models of one network

    def export_bundle(self, model: str, version: int, out: Path) -> Path:
        """Version ``version`` of the network ``model`` runs as a MONAI Bundle in ``out``
        (``pathology.export``; ``nuclick`` shares the network and exports the nuclei bundle)."""
        from pathology.export import export_bundle

        return export_bundle(self.models[model].spec, self.version_store(model), version, out)

    # -- datastore -------------------------------------------------------------------------------
    def init_datastore(self) -> Datastore:
        return PathologyDatastore(
            self.studies_folder(),
            max_upload_mb=self.settings.max_upload_mb,
            on_image_replaced=self._score_store.forget,  # its score was the old file's
            auto_reload=ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=ml_settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    # -- tasks -----------------------------------------------------------------------------------
    def new_infer(self, model: str) -> NucleiInfer:
        return NucleiInfer(self.spec(model), self.weight_paths(model), name=model, nuclick=self.models[model].nuclick)

    def new_trainer(self, model: str) -> NucleiTrainer:
        spec, published = self.spec(model), self.published_weights(model)
        return NucleiTrainer(
            spec,
            published,
            spec.shipped_weights_path,
            published.with_name(f"{published.stem}_train_stats.json"),
            max_epochs=self.settings.max_epochs,
            batch_size=self.settings.train_batch_size,
            versions=self.version_store(model),
            review_gate=self.review_gate,
        )

    def score_store(self) -> ScoreStore:
        return self._score_store

    def init_strategies(self) -> dict[str, Any]:
        # The patches are ranked under the network of al_model (its infer task's, so the served weights).
        ranking = self.settings.al_model
        spec, network = self.spec(ranking), lambda: seam.infers(self)[ranking].network()
        entropy = PatchMeasures(spec)  # one entropy pass per patch for both strategies that rank by it
        book = self.book  # one for all strategies: a patch is held whoever picked it
        measuring = {
            "wsi_uncertain": WSIUncertain(spec, network, book=book, shared=entropy),
            "wsi_bald": WSIUncertain(spec, network, book=book, measure="bald"),
            "wsi_tta": WSIUncertain(spec, network, book=book, measure="tta"),
            "wsi_diversity": WSIDiverse(spec, network, book=book, shared=entropy),
        }
        self._prefetcher = PatchPrefetcher(list(measuring.values()), self.datastore, network)
        return {"wsi_random": WSIRandom(book=book), **measuring, **self._tile_strategies()}

    def _tile_strategies(self) -> dict[str, Any]:
        """Whole tiles of the folder, the radiology app's strategies over the tile scores."""
        store = self.score_store()
        tiles = ranked_strategies(self.book, store, items="tiles", under="the nuclei network")
        tiles["entropy"] = RankedStrategy(
            "The same as epistemic (the name this app's strategies use for the measure)",
            book=self.book,
            scores=lambda: store.measure(None),
            unusable=store.unusable,
        )
        return tiles

    def on_init_complete(self) -> None:
        super().on_init_complete()
        if self.settings.score_on_start:
            # Patch measures in the background: at start, then for new images and new weights, so
            # that the first next-patch request on a slide need not measure it.
            self._prefetcher.start()
            self.async_scoring("epistemic")  # tile scores, in a child process

    def init_scoring_methods(self) -> dict[str, Any]:
        ranking = self.settings.al_model  # the tiles are scored under al_model's served weights
        spec, paths, passes = self.spec(ranking), self.weight_paths(ranking), self.settings.mc_samples
        return {
            "epistemic": UncertaintyScoring(
                "Uncertainty of every unlabelled tile under the nuclei network: foreground entropy and "
                f"features, BALD ({passes} dropout passes), flip disagreement; rescores only stale tiles",
                scorer=lambda: TileScorer(spec, paths, passes=passes),
                store=self.score_store(),
                key="entropy",
            )
        }

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        result = super().train(request)
        if self.settings.score_after_train:  # every model shares the one network the tiles are scored with
            result = dict(result or {})
            result["scoring"] = self.scoring({"method": "epistemic"})
        return result

    def on_weights_changed(self, model: str) -> None:
        if self.settings.score_after_train and seam.scoring_methods(self):
            self.async_scoring("epistemic")  # the stored scores came from the weights served before

    # -- requests --------------------------------------------------------------------------------
    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        self.request_image(request, datastore, self.settings.max_upload_mb)
        return super().infer(request, datastore)

    def infer_wsi(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Tiled inference over a region (or the whole image), answered as JSON, ASAP XML or DSA JSON."""
        with self._infer_slot():
            return self._infer_region(request, datastore)

    def _infer_region(self, request: dict[str, Any], datastore: Datastore | None) -> dict[str, Any]:
        start = time.perf_counter()
        path = self.request_image(request, datastore, self.settings.max_upload_mb)
        output = request.get("output") or "dsa"
        if output not in OUTPUTS:
            raise bad_request(f"output must be one of {list(OUTPUTS)}, got {output!r}")
        task: NucleiInfer = seam.infers(self)[request["model"]]
        source = open_source(path)
        try:
            region = check_region(request.get("location"), request.get("size"), source.dimensions)
            result = task.annotate(source, region, request, with_mask=False)
        finally:
            if isinstance(source, SlideSource):
                source.close()
        seconds = time.perf_counter() - start
        tile_json = task.result_json(result, region, seconds)
        res_json = {
            "name": f"MONAILabel Annotations - {task.name} for {list(region)}",
            "description": task.description,
            "model": task.name,
            "location": list(region[:2]),
            "size": list(region[2:]),
            "count": tile_json["count"],
            "tiles": result.tiles,
            "model_trained": tile_json["model_trained"],
            "annotations": [tile_json],
            "latencies": {
                "total": round(seconds, 3),
                "tsum": round(seconds, 3),
                "pre": 0.0,
                "post": 0.0,
                "infer": round(seconds, 3),
            },
        }
        res_file = None
        if output == "asap":
            res_file, _ = create_asap_annotations_xml(res_json, loglevel="WARNING")
        elif output == "dsa":
            res_file, _ = create_dsa_annotations_json(res_json, loglevel="WARNING")
        logger.info("wsi infer %s %s: %d nuclei in %.2f s", task.name, list(region), len(result.polygons), seconds)
        return {"file": res_file, "params": res_json}

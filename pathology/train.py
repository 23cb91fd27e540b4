"""Fine-tuning the nuclei network in the server on the labels saved through ``/datastore/label``."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from appcore.errors import RequestError
from appcore.lifecycle import server_stopping
from appcore.versions import VersionStore, store_beside
from pathology.data import read_instances
from pathology.postprocess import rasterize
from pathology.spec import NucleiSpec
from pathology.training import Example, train_steps
from pathology.weights import load_network, save_weights_atomically
from pathology.wsi import SlideSource, open_source, read_tile

logger = logging.getLogger(__name__)

# Context read around the outlined nuclei of a slide label.
SLIDE_MARGIN = 32


def example_from_label(image_path: str, label_path: str) -> Example:
    """Image and label as a training example: a tile with its mask, or the outlined area of a slide."""
    if label_path.endswith(".png"):
        return Example.of(read_tile(image_path), read_instances(label_path))
    doc = json.loads(Path(label_path).read_text())
    polygons = doc["polygons"]
    source = open_source(image_path)
    try:
        width, height = source.dimensions
        pts = np.concatenate([np.asarray(p) for p in polygons])
        x0, y0 = (max(int(v) - SLIDE_MARGIN, 0) for v in pts.min(axis=0))
        x1, y1 = int(min(pts[:, 0].max() + SLIDE_MARGIN, width)), int(min(pts[:, 1].max() + SLIDE_MARGIN, height))
        rgb = source.read(x0, y0, x1 - x0, y1 - y0)
    finally:
        if isinstance(source, SlideSource):
            source.close()
    return Example.of(rgb, rasterize(polygons, rgb.shape[:2], offset=(x0, y0)))


class NucleiTrainer(TrainTask):
    """Fine-tunes from the served weights; publishes only a completed run, in one atomic rename.

    Args:
        spec: the network.
        served_path: the weights file the infer tasks serve (written only when a run completes).
        shipped_path: weights to start from before any run has published.
        stats_path: where the last run's summary is written.
        max_epochs: default passes per run (a request's ``max_epochs`` wins); one pass is one
            step per labelled image.
        batch_size: default crops per step.
        learning_rate: peak AdamW learning rate of the one-cycle schedule.
        versions: where a completed run publishes, as a new version (``appcore.versions``).
        review_gate: given an image id, why its ``final`` label is left out by review, or None.
    """

    def __init__(
        self,
        spec: NucleiSpec,
        served_path: str | Path,
        shipped_path: str | Path | None,
        stats_path: str | Path,
        *,
        max_epochs: int = 20,
        batch_size: int = 4,
        learning_rate: float = 5e-4,
        versions: VersionStore | None = None,
        review_gate: Callable[[str], str | None] | None = None,
    ) -> None:
        super().__init__("Fine-tune the nuclei network on the saved final labels")
        self.review_gate = review_gate
        self.spec = spec
        self.served_path = Path(served_path)
        self.shipped_path = Path(shipped_path) if shipped_path else None
        self.stats_path = Path(stats_path)
        self._max_epochs, self._batch_size, self._lr = max_epochs, batch_size, learning_rate
        self.versions = versions or store_beside(self.served_path, "nuclei", self.shipped_path)

    def config(self) -> dict[str, Any]:
        return {"max_epochs": self._max_epochs, "train_batch_size": self._batch_size}

    def start_path(self) -> Path | None:
        if self.served_path.exists():
            return self.served_path
        return self.shipped_path if self.shipped_path and self.shipped_path.exists() else None

    def no_training_data(self, datastore: Datastore) -> str | None:
        """Why no saved label is training data (for a 409 before a run starts), or None."""
        records = datastore.datalist()
        if not records:
            return "No 'final' labels to train on; save at least one label (PUT /datastore/label) first"
        if not self._reviewed(records, datastore):
            return (
                f"No 'final' label to train on: review leaves out all {len(records)} (rejected, or not approved "
                "under --conf train_on approved; PUT /datastore/label/review approves one)"
            )
        return None

    def _reviewed(self, records: list[dict[str, Any]], datastore: Datastore) -> list[dict[str, Any]]:
        """``records`` without the labels review leaves out (``review_gate``), each logged with the reason."""
        if self.review_gate is None:
            return records
        ids = {os.path.realpath(datastore.get_image_uri(i)): i for i in datastore.get_labeled_images()}
        kept = []
        for record in records:
            image_id = ids.get(os.path.realpath(record["image"]))
            reason = self.review_gate(image_id) if image_id else None
            if reason is None:
                kept.append(record)
            else:
                logger.warning("Training nuclei skips %s: %s", image_id, reason)
        return kept

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        records = self._reviewed(datastore.datalist(), datastore)
        if not records:
            raise ValueError(self.no_training_data(datastore) or "No 'final' labels to train on")
        examples = [example_from_label(r["image"], r["label"]) for r in records]
        epochs = int(request.get("max_epochs", self._max_epochs))
        batch = int(request.get("train_batch_size", self._batch_size))
        steps = max(1, epochs * len(examples))
        start = self.start_path()
        try:  # the version the run starts from (a published file the records do not describe taken in)
            parent = self.versions.served_record()["version"] if start else None
        except RequestError:
            parent = None
        device = "cuda" if torch.cuda.is_available() and request.get("device", "cuda") != "cpu" else "cpu"
        network = load_network(self.spec, start, device) if start else self.spec.network().to(device)
        began = time.perf_counter()
        losses = train_steps(
            network,
            self.spec,
            examples,
            steps=steps,
            batch_size=batch,
            lr=self._lr,
            seed=int(time.time()),
            device=device,
            on_step=lambda step, loss: server_stopping(),  # a run inside the server (run_sync)
        )
        if server_stopping():
            raise RuntimeError("The server was told to stop during the training: served weights unchanged")
        state = network.state_dict()
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            raise RuntimeError("Training produced NaN or Inf weights; served weights unchanged")
        record = {
            "source": "training",
            "started_by": str(request.get("started_by") or "anonymous"),
            "client": request.get("client_id"),  # the client's own name, not who it is
            "parent": parent,
            "trained_images": [Path(r["image"]).name.split(".")[0] for r in records],
            "validated_images": [],
            "steps": steps,
        }
        version = self.versions.publish(lambda path: save_weights_atomically(state, path), record)
        stats = {
            "images": len(examples),
            "steps": steps,
            "epoch": epochs,
            "loss": round(float(np.mean(losses[-max(1, len(examples)) :])), 4),
            "started_from": start.name if start else None,  # file names, not the server's paths
            "published": self.served_path.name,
            "version": version["version"],
            "seconds": round(time.perf_counter() - began, 1),
        }
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        self.stats_path.write_text(json.dumps(stats, indent=1))
        logger.info("Published %s after %d steps on %d images", self.served_path, steps, len(examples))
        return stats

    def stats(self) -> dict[str, Any]:
        return json.loads(self.stats_path.read_text()) if self.stats_path.exists() else {}

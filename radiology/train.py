"""Fine-tuning a registered model in the server on the labels clinicians saved."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import AsDiscreted, EnsureTyped
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from appcore import seam
from appcore.app import path_free_train_request
from appcore.errors import RequestError
from appcore.files import write_json
from appcore.lifecycle import server_stopping
from appcore.precision import autocast
from appcore.validation import check_segmentable, label_values, nifti_header, off_grid
from appcore.versions import VersionStore, store_beside
from appcore.weights import load_state_dict, save_weights_atomically
from radiology import recipe
from radiology.modality import wrong_modality
from radiology.spec import ModelSpec
from radiology.transforms import ClassIndexd, augment, preprocess
from radiology.uncertainty import numpy_dropout, torch_seeded_rng

logger = logging.getLogger(__name__)


def cannot_segment(image_path: str, spec: ModelSpec, memory_budget_mb: int | None = None) -> str | None:
    """Why infer would refuse this stored image by its header (complex or RGB voxels, not a volume,
    an unusable affine, too large a grid at the model's spacing or, with ``memory_budget_mb``, for
    that memory; unreadable), or ``None``. A label saved on such an image would otherwise fail every
    training run (validation segments whole volumes as infer does), not only its own case."""
    if not image_path.endswith((".nii", ".nii.gz")):
        return None
    try:
        header = nifti_header(image_path, "image")
        check_segmentable(header, spec.spacing, "image", classes=spec.num_classes, budget_mb=memory_budget_mb)
    except RequestError as e:
        return str(e.detail)
    return None


def segment_names(info: dict[str, Any]) -> frozenset[str]:
    """The segment names a viewer sent with a saved label (``label_info``, as 3D Slicer and OHIF
    send it: ``[{"name": ..., "idx": ...}]``), lower-cased, background left out."""
    entries = info.get("label_info")
    if not isinstance(entries, list):
        return frozenset()
    names = {str(e.get("name", "")).strip().lower() for e in entries if isinstance(e, dict)}
    return frozenset(names - {"", "background"})


def not_training_data(
    spec: ModelSpec, neighbours: Sequence[ModelSpec], info: dict[str, Any], label_path: str, image_path: str
) -> str | None:
    """Why a saved ``final`` label is not training data for ``spec``, or ``None`` if it is;
    ``neighbours`` are the other models served over the same datastore.

    In order: a label that no longer lies on its image's grid is nobody's (the image file was
    written over after the save). A label holding values outside ``spec``'s is not its, whatever it
    was saved for. The model it was saved for (``{"model": ...}`` in its save parameters, and every
    SEG from a PACS) decides next. Then the viewer's segment names, where they are the label names
    of one served model. Last, a modality the image's values rule out (``radiology.modality``): an
    MR image's label is no training data for a CT model.
    """
    moved = off_grid(label_path, image_path)
    if moved:
        return moved
    foreign = sorted(label_values(label_path) - spec.labels.allowed_values)
    if foreign:
        return f"it holds values {foreign}, which are not {spec.name}'s labels {sorted(spec.labels.ids)}"
    named = info.get("model")
    if named:
        return None if named == spec.name else f"it was saved for model {named!r}"
    names = segment_names(info)
    if names:
        owners = [m for m in (spec, *neighbours) if names <= {label.name.lower() for label in m.labels}]
        if len(owners) == 1:
            return None if owners[0] is spec else f"its segments {sorted(names)} are {owners[0].name}'s labels"
    return wrong_modality(image_path, spec)


class CpuForward(Inferer):
    """A MONAI engine's forward pass, made cheaper on the CPU; other devices go to ``inner`` untouched.

    MONAI's engines autocast on CUDA only (their ``amp``). For inputs on the CPU this runs ``inner``
    under ``appcore.precision.autocast`` (bfloat16 where the CPU computes it natively and
    ``cpu_bf16``) and hands float32 outputs to the loss, metrics and post-transforms. Given ``rng``,
    the network's training-mode dropout layers also draw their masks from it
    (``radiology.uncertainty.numpy_dropout``): torch's single-threaded ``bernoulli_`` took about a
    sixth of a hippocampus training step (``python -m benchmarks.training_precision --step-only``).
    """

    def __init__(self, inner: Inferer, *, cpu_bf16: bool = True, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.cpu_bf16 = cpu_bf16
        self.rng = rng

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        if inputs.device.type != "cpu":
            return self.inner(inputs, network, *args, **kwargs)
        masks = numpy_dropout(network, self.rng) if self.rng is not None else contextlib.nullcontext()
        with autocast("cpu", cpu_bf16=self.cpu_bf16), masks:
            out = self.inner(inputs, network, *args, **kwargs)
        return out.float()


class SegmentationTrainer(BasicTrainTask):
    """Fine-tunes from the served weights and publishes the best epoch only when the run completes.

    A run that fails, is stopped (``DELETE /train``) or is killed never touches the served file:
    checkpoints go to the run folder, and publishing is one atomic rename after the final epoch.

    When the run starts from trained weights and has validation images, those weights are validated
    first, as epoch 0, and an epoch must beat them on validation Dice to be published; otherwise the
    served weights stay as they are, and the log (``GET /train/``) and ``last_run`` in the stats
    (``/info``'s ``train_stats``) say so. MONAI Label's own
    checkpointing only compares the run's epochs with each other, so a run in which every epoch
    validated worse than the starting weights still replaced them (``benchmarks/RESULTS.md``,
    "Does training on a few labels help the shipped model?").

    Args:
        spec: the model.
        model_dir: folder for this model's run outputs (checkpoints, stats, TensorBoard events).
        served_path: the weights file the infer task serves; written only on a completed run.
        max_epochs: default epochs per run (a request's ``max_epochs`` wins).
        train_batch_size: default patches per step.
        val_split: share of labelled images kept for validation when at least 5 exist.
        cpu_bf16: on the CPU, train and validate in bfloat16 where the CPU computes it natively
            (``appcore.precision``); CUDA trains with MONAI's mixed precision either way.
        neighbours: the other models served over the same datastore, whose labels are not this
            model's training data (``not_training_data``).
        memory_budget_mb: images one infer of which would take more memory (``--conf
            infer_memory_mb``) are left out, with the reason, as infer refuses them.
        versions: where a completed run publishes, as a new version (``appcore.versions``); by
            default the versions kept beside ``served_path``.
        review_gate: given an image id, why its ``final`` label is left out by review (rejected,
            or not approved under ``--conf train_on approved``), or None (``appcore.history``).
    """

    def __init__(
        self,
        spec: ModelSpec,
        model_dir: str,
        served_path: str,
        *,
        max_epochs: int = 20,
        train_batch_size: int = 4,
        val_split: float = 0.2,
        cpu_bf16: bool = True,
        neighbours: Sequence[ModelSpec] = (),
        memory_budget_mb: int | None = None,
        versions: VersionStore | None = None,
        review_gate: Callable[[str], str | None] | None = None,
    ) -> None:
        self.memory_budget_mb = memory_budget_mb
        self.review_gate = review_gate
        shipped = spec.shipped_weights_path
        super().__init__(
            model_dir=model_dir,
            description=f"Fine-tune {spec.name} on the saved final labels",
            amp=torch.cuda.is_available(),
            load_path=str(shipped) if shipped and shipped.exists() else None,
            publish_path=None,  # published atomically on completion instead, see _publish
            config={
                "max_epochs": max_epochs,
                "train_batch_size": train_batch_size,
                "val_split": val_split,
                "dataset": ["CacheDataset", "Dataset"],
                "dataloader": ["ThreadDataLoader", "DataLoader"],
                "tracking": ["None"],
                "multi_gpu": False,
            },
            labels=spec.labels.name_to_id(),
            tracking=None,
            n_saved=1,
            train_save_interval=10**6,
        )
        self.spec = spec
        self.served_path = Path(served_path)
        self.cpu_bf16 = cpu_bf16
        self.neighbours = tuple(neighbours)
        self._starting_dice: float | None = None  # validation Dice of the weights the run started from
        self._data: dict[str, Any] = {}  # what the run trained on and left out, for ``last_run``
        self.versions = versions or store_beside(self.served_path, spec.name, spec.shipped_weights_path)
        self._run: dict[str, Any] = {}  # who started the run, from which version, on which images
        self._image_ids: dict[str, str] = {}  # image path -> datastore id, of the run's data

    # -- what to train -------------------------------------------------------------------------
    def network(self, context: Context) -> torch.nn.Module:
        return self.spec.network()

    def optimizer(self, context: Context) -> torch.optim.Optimizer:
        return recipe.optimizer(context.network.parameters(), self.spec.learning_rate)

    def loss_function(self, context: Context) -> torch.nn.Module:
        return recipe.loss()

    def lr_scheduler_handler(self, context: Context) -> None:
        return None

    def train_pre_transforms(self, context: Context) -> list:
        return [*preprocess(self.spec, with_label=True), *augment(self.spec), EnsureTyped(keys=("image", "label"))]

    def val_pre_transforms(self, context: Context) -> list:
        return preprocess(self.spec, with_label=True)

    def _onehot(self) -> list:
        n = self.spec.num_classes
        return [
            EnsureTyped(keys=("pred", "label")),
            ClassIndexd(keys="pred"),
            AsDiscreted(keys=("pred", "label"), to_onehot=(n, n)),
        ]

    def train_post_transforms(self, context: Context) -> list:
        return self._onehot()

    def val_post_transforms(self, context: Context) -> list:
        return self._onehot()

    def train_inferer(self, context: Context) -> Inferer:
        return CpuForward(SimpleInferer(), cpu_bf16=self.cpu_bf16, rng=torch_seeded_rng())

    def val_inferer(self, context: Context) -> Inferer:
        return CpuForward(recipe.validation_window(self.spec, sw_batch_size=2), cpu_bf16=self.cpu_bf16)

    # -- which data --------------------------------------------------------------------------
    def labels_with_reasons(self, datastore: Datastore) -> Iterator[tuple[dict, str, str | None]]:
        """Each ``final`` label as ``(case, image id, why it is not this model's training data or None)``."""
        cases = datastore.datalist()  # first: a PACS datastore fetches its SEGs here
        ids = {os.path.realpath(datastore.get_image_uri(i)): i for i in datastore.get_labeled_images()}
        for case in cases:
            known = ids.get(os.path.realpath(case["image"]))
            reason = cannot_segment(case["image"], self.spec, self.memory_budget_mb)
            if reason is None:
                info = datastore.get_label_info(known, "final") if known else {}
                reason = not_training_data(self.spec, self.neighbours, info, case["label"], case["image"])
            if reason is None and known and self.review_gate is not None:
                reason = self.review_gate(known)  # rejected, or not approved under --conf train_on approved
            yield case, known or Path(case["image"]).name, reason

    def no_training_data(self, datastore: Datastore) -> str | None:
        """``None`` as soon as one saved label is this model's training data; else why not, for a 409
        before a run starts (at most five labels' reasons)."""
        skipped = []
        for _, image_id, reason in self.labels_with_reasons(datastore):
            if reason is None:
                return None
            skipped.append(f"{image_id}: {reason}")
        return self._nothing_to_train(skipped[:5] + ([f"and {len(skipped) - 5} more"] if len(skipped) > 5 else []))

    def _nothing_to_train(self, skipped: list[str]) -> str:
        return (
            f"No 'final' label to train '{self.spec.name}' on"
            + (f" (skipped {'; '.join(skipped)})" if skipped else "")
            + f'; save at least one label of this model (PUT /datastore/label, params {{"model": "{self.spec.name}"}})'
        )

    # At most this many labels left out, with their reasons, in ``last_run`` (all are in the log).
    SKIPPED_IN_STATS = 20

    def pre_process(self, request: dict, datastore: Datastore) -> list[dict]:
        """The ``final`` labels this model trains on; each one left out is logged with the reason,
        and the run's ``last_run`` gives them too (``skipped``, the first ``SKIPPED_IN_STATS``)."""
        datalist, skipped = [], []
        reasons: dict[str, str] = {}
        self._image_ids: dict[str, str] = {}
        for case, image_id, reason in self.labels_with_reasons(datastore):
            if reason is None:
                datalist.append(case)
                self._image_ids[case["image"]] = image_id
            else:
                skipped.append(image_id)
                if len(reasons) < self.SKIPPED_IN_STATS:
                    reasons[image_id] = reason
                logger.warning("Training %s skips %s: %s", self.spec.name, image_id, reason)
        self._data = {"skipped": reasons, "skipped_count": len(skipped)}
        if not datalist:
            raise ValueError(
                self._nothing_to_train([f"{', '.join(skipped)}: reasons in the log above"] if skipped else [])
            )
        return datalist

    def partition_datalist(self, context: Context, shuffle: bool = False) -> tuple[list, list]:
        datalist = context.datalist
        split = float(context.request.get("val_split", 0.0))
        n_val = math.floor(len(datalist) * split) if len(datalist) >= 5 else 0
        # Deterministic: the last images (by id) validate, so reruns compare like with like.
        datalist = sorted(datalist, key=lambda d: d["image"])
        train, val = (datalist[:-n_val], datalist[-n_val:]) if n_val else (datalist, [])
        self._data.update(trained_on=len(train), validated_on=len(val))
        ids = self._image_ids
        self._run["trained_images"] = [ids.get(d["image"], Path(d["image"]).name) for d in train]
        self._run["validated_images"] = [ids.get(d["image"], Path(d["image"]).name) for d in val]
        logger.info("Training %s on %d images, validating on %d", self.spec.name, len(train), len(val))
        return train, val

    # -- where from and where to -------------------------------------------------------------
    def load_path(self, output_dir: str, pretrained: bool = True) -> str | None:
        """Start from what is served now: the last published weights, else the shipped ones."""
        if self.served_path.exists():
            return str(self.served_path)
        return seam.train_files(self).load_path if pretrained else None

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        # MONAI Label builds the run's folder from ``name`` (and reads a datalist from ``train_ds``):
        # a request that reached the task without the endpoint's checks is refused here too.
        path_free_train_request(request)
        return super().__call__(request, datastore)

    def train(self, rank: int, world_size: int, request: dict, datalist: list) -> dict:
        # A stale best checkpoint from an earlier (perhaps stopped) run must not be published.
        files = seam.train_files(self)
        stale = Path(files.model_dir) / request["name"] / files.key_metric_filename
        stale.unlink(missing_ok=True)
        # Before anything loads: the version this run starts from (load_path reads the same file).
        self._run = {
            "started_by": str(request.get("started_by") or "anonymous"),
            "client": request.get("client_id"),  # the client's own name, not who it is
            "parent": self._served_version(),
        }
        try:
            return super().train(rank, world_size, request, datalist)
        except Exception as e:  # /info's train_stats would otherwise still show the run before
            self._record({"published": False, "failed": f"{type(e).__name__}: {e}", **self._data})
            raise

    def _served_version(self) -> int | None:
        """The version served now, a published file the records do not describe taken in first."""
        try:
            return int(self.versions.served_record()["version"])
        except RequestError:  # no weights at all: an untrained model
            return None

    def finalize(self, context: Context) -> None:
        super().finalize(context)
        self._starting_dice = None
        started_from = self.load_path(context.output_dir, context.pretrained)
        if context.evaluator is not None and started_from and Path(started_from).exists():
            # After MONAI's CheckpointLoader, which is attached to STARTED before this handler.
            context.trainer.add_event_handler(Events.STARTED, lambda _: self._validate_start(context))
        context.trainer.add_event_handler(Events.ITERATION_COMPLETED, self._end_if_server_stops)
        context.trainer.add_event_handler(Events.COMPLETED, lambda _: self._publish(context))

    @staticmethod
    def _end_if_server_stops(engine: Any) -> None:
        """A run inside the server process (``run_sync``) ends at the next step once the server is told
        to stop; a run in a task process is killed with it instead (``appcore.lifecycle``)."""
        if server_stopping() and not engine.should_terminate:
            logger.warning("The server is stopping: this training ends now and publishes nothing")
            engine.terminate()

    def _validate_start(self, context: Context) -> None:
        """Validate the loaded weights before the first epoch; they become epoch 0 of the run.

        The evaluator's key-metric checkpoint then holds them until an epoch beats them, and its best
        metric and epoch count them as epoch 0.
        """
        evaluator = context.evaluator
        logger.info("Validating the weights the run starts from (epoch 0)")
        evaluator.run(1)
        state = evaluator.state
        self._starting_dice = float(state.metrics[state.key_metric_name])
        if state.best_metric_epoch == 1:
            state.best_metric_epoch = 0
        logger.info("Validation Dice of the weights the run starts from: %.4f", self._starting_dice)

    def _publish(self, context: Context) -> None:
        outcome: dict[str, Any] = {"published": False, "start_val_dice": self._starting_dice, **self._data}
        if server_stopping():  # ignite completes a terminated run too
            self._record({"published": False, "stopped": "the server was told to stop during the run", **self._data})
            return
        try:
            outcome["published"] = self._publish_best(context, outcome)
        finally:
            self._record(outcome)

    def _publish_best(self, context: Context, outcome: dict[str, Any]) -> bool:
        best = Path(context.output_dir) / seam.train_files(self).key_metric_filename
        if not best.exists():
            logger.warning("Training completed without a checkpoint at %s; served weights unchanged", best)
            return False
        if self._starting_dice is not None:
            best_dice = float(context.evaluator.state.best_metric)
            outcome["best_val_dice"] = best_dice
            if not best_dice > self._starting_dice:
                logger.warning(
                    "No epoch beat the weights the run started from on validation (best %.4f, start %.4f); "
                    "served weights unchanged",
                    best_dice,
                    self._starting_dice,
                )
                return False
        state = load_state_dict(best)
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            logger.error("Best checkpoint holds NaN or Inf weights; served weights unchanged")
            return False
        evaluator, trainer = getattr(context, "evaluator", None), getattr(context, "trainer", None)
        record = {
            "source": "training",
            **self._run,
            "start_val_dice": self._starting_dice,
            "best_val_dice": outcome.get("best_val_dice"),
            "best_epoch": int(evaluator.state.best_metric_epoch) if evaluator is not None else None,
            "epochs": int(trainer.state.epoch) if trainer is not None else None,
        }
        version = self.versions.publish(lambda path: save_weights_atomically(state, path), record)
        outcome["version"] = version["version"]
        logger.info("Published %s -> %s as version %d", best, self.served_path, version["version"])
        return True

    def record_stopped(self, how: str, *, unless_recorded_since: float | None = None) -> None:
        """A run was stopped before it completed (it published nothing): say so in ``last_run``.

        Not where the run recorded its outcome after ``unless_recorded_since`` (its start): it was
        stopped after its training, while the process rescored images, and ``last_run`` is right.
        """
        if unless_recorded_since is not None:
            last = self.stats().get("last_run") or {}
            if float(last.get("at", float("-inf"))) >= unless_recorded_since:
                return
        self._record({"published": False, "stopped": how})

    def _record(self, outcome: dict[str, Any]) -> None:
        """Add what the run did with its weights to MONAI Label's stats file as ``last_run``.

        The server trains in a child process; the file is how ``/info``'s ``train_stats`` learns it.
        """
        path = Path(seam.train_files(self).stats_path)
        stats = json.loads(path.read_text()) if path.exists() else {}
        stats["last_run"] = {**outcome, "at": round(time.time(), 3)}  # seconds since the epoch
        write_json(path, stats)

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        # The file's name, not its path on the server (the model folder holds it).
        stats["served_weights"] = self.served_path.name if self.served_path.exists() else None
        return stats

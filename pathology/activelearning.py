"""Next-patch strategies for slides (MONAI Label adapters): ``wsi_random``, ``wsi_uncertain``,
``wsi_bald``, ``wsi_tta`` and ``wsi_diversity``, honouring ``k`` and the reservation window as the
radiology strategies do."""

from __future__ import annotations

import copy
import logging
import os
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from appcore.errors import bad_request, not_found
from appcore.networks import bottleneck
from appcore.validation import check_image_id
from pathology.predict import foreground_passes, predict_maps
from pathology.spec import NucleiSpec
from pathology.wsi import RegionSource, SlideSource, open_source
from strategies.patches import Box, patch_grid, ranked_patches
from strategies.ranked import holder, request_k
from strategies.reservations import ReservationBook
from strategies.selection import diverse_top_k

logger = logging.getLogger(__name__)

# Side of the windows probed at the corners of a patch to score it.
PROBE = 256
# Mean brightness above which a probe is glass, not tissue (nothing to label there).
GLASS = 220.0
# Patches scored per request at most; a large slide is sampled so that an answer takes seconds.
MAX_CANDIDATES = 64
# Patch scores kept for later requests at most (a few hundred kilobytes).
MAX_STORED_SCORES = 20_000
# Monte Carlo dropout behind ``bald``. The nuclei network was trained without dropout, so dropout is
# injected at test time, on the input of its bottleneck (the deepest layer), in a private copy of
# the served network; MC_DROPOUT is its probability, MC_PASSES the passes per probe window.
MC_DROPOUT = 0.2
MC_PASSES = 8


def _pair(request: dict[str, Any], key: str, default: tuple[int, int]) -> tuple[int, int]:
    raw = request.get(key) or default
    try:
        a, b = (int(v) for v in raw)
    except (TypeError, ValueError):
        raise bad_request(f"'{key}' must be two integers [w, h], got {raw!r}") from None
    if a < 1 or b < 1:
        raise bad_request(f"'{key}' must be positive, got {[a, b]}")
    return a, b


def _image(request: dict[str, Any], datastore: Datastore, rng: random.Random) -> str:
    image = request.get("image")
    if image:
        check_image_id(image)
        if image not in datastore.list_images():
            raise not_found(f"Image {image!r} is not in the datastore")
        return str(image)
    candidates = sorted(datastore.get_unlabeled_images("final")) or sorted(datastore.list_images())
    if not candidates:
        raise not_found("The datastore holds no images")
    return rng.choice(candidates)


def file_version(uri: str) -> str:
    """Names an image file's state: measures of its patches hold until the file is replaced."""
    return f"{uri}:{os.stat(uri).st_mtime_ns}"


def patch_key(image: str, box: Box) -> str:
    """How a patch is named in the reservation book."""
    x, y, w, h = box
    return f"{image}@{x},{y},{w},{h}"


class _PatchStrategy(Strategy):
    """Picks an image (the request's, else a random unlabelled one) and ``k`` patches of it.

    Patches tile the image (``patch_size``, 1024 x 1024 by default, shrunk to a smaller image); the
    answer's ``bbox`` is the first pick (what QuPath opens) and ``bboxes`` holds all ``k``. A patch
    handed out stays reserved for ``reservation_s`` (the book's window), so annotators asking at once
    never get the same patch; when every patch of the image is held the answer is empty.
    """

    def __init__(self, description: str, rng: random.Random | None = None, book: ReservationBook | None = None) -> None:
        super().__init__(description)
        self._rng = rng or random.Random()
        self._book = book or ReservationBook(0)

    def rank(self, source: RegionSource, boxes: list[Box], image: str, version: str) -> list[Box]:
        """Candidate patches, the one to hand out first first; ``version`` names the image file's state."""
        raise NotImplementedError

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        k = request_k(request, 1, self._book)
        client = holder(request)
        image = _image(request, datastore, self._rng)
        patch = _pair(request, "patch_size", (1024, 1024))
        uri = datastore.get_image_uri(image)
        source = open_source(uri)
        try:
            ranked = self.rank(source, patch_grid(source.dimensions, patch), image, file_version(uri))
        finally:
            if isinstance(source, SlideSource):
                source.close()
        by_key = {patch_key(image, box): box for box in ranked}
        chosen = self._book.pick(list(by_key), lambda free: free[:k], client)
        if not chosen:
            logger.info("No patch of %s is free (%d patches, all reserved)", image, len(by_key))
            return None
        boxes = [list(by_key[key]) for key in chosen]
        return {"id": image, "bbox": boxes[0], "bboxes": boxes, "size": list(source.dimensions)}


class WSIRandom(_PatchStrategy):
    """Patches of the grid in random order; a slide smaller than the patch is one patch."""

    def __init__(self, rng: random.Random | None = None, book: ReservationBook | None = None) -> None:
        super().__init__("Random patch of a slide (the whole slide when it is smaller than the patch)", rng, book)

    def rank(self, source: RegionSource, boxes: list[Box], image: str, version: str) -> list[Box]:
        return self._rng.sample(boxes, len(boxes))


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def patch_uncertainty(foreground: np.ndarray) -> float:
    """Mean binary entropy (bits) of the foreground probability: 0 when sure, 1 when p = 0.5 everywhere."""
    return float(np.mean(_binary_entropy(foreground)))


def mutual_information(passes: np.ndarray) -> float:
    """BALD of a window from Monte Carlo passes of its foreground probability (passes, H, W).

    The mean over pixels of the mutual information (bits) between the prediction and the dropout
    masks: the entropy of the mean probability minus the mean entropy of each pass. 0 when every
    pass agrees (however unsure), at most 1.
    """
    return float(np.mean(_binary_entropy(passes.mean(0)) - _binary_entropy(passes).mean(0)))


def tta_disagreement(maps: list[np.ndarray]) -> float:
    """Mean over pixels of the standard deviation of the foreground probability across augmentations
    (0 when every flip agrees, at most 0.5)."""
    return float(np.mean(np.std(np.stack(maps), axis=0)))


# Flips of a probe window (array axes of an H x W x 3 image): each is its own inverse.
FLIPS: tuple[tuple[int, ...], ...] = ((), (1,), (0,), (0, 1))

MEASURES = {
    "entropy": "foreground entropy",
    "bald": "mutual information between the foreground and Monte Carlo dropout masks",
    "tta": "disagreement of the foreground between flipped copies",
}


def scoring_copy(network: torch.nn.Module, *, dropout: float | None = None) -> torch.nn.Module:
    """A private copy of the served network in evaluation mode, with ``dropout`` injected on the
    input of its bottleneck (its deepest layer) when given: the Monte Carlo dropout behind ``bald``,
    the nuclei network having been trained without dropout."""
    private = copy.deepcopy(network).eval()
    if dropout is not None:
        layer = bottleneck(private)
        if layer is None:
            logger.warning("%s: the network has no bottleneck to drop out; bald is 0", type(network).__name__)
        else:
            layer.register_forward_pre_hook(lambda _m, args: (F.dropout(args[0], dropout, training=True), *args[1:]))
    return private


def window_measures(
    measure: str, network: torch.nn.Module, spec: NucleiSpec, rgb: np.ndarray, *, passes: int = MC_PASSES
) -> dict[str, Any]:
    """One measure of an RGB window (H, W, 3): ``entropy`` (with the window's mean bottleneck
    features as ``embedding``), ``bald`` over ``passes`` Monte Carlo passes (``network`` is a
    ``scoring_copy`` with dropout) or ``tta``."""
    if measure == "bald":
        return {"bald": mutual_information(foreground_passes(network, spec, rgb, passes))}
    if measure == "tta":
        maps = []
        for axes in FLIPS:
            flipped = np.ascontiguousarray(np.flip(rgb, axes)) if axes else rgb
            fg = predict_maps(network, spec, flipped).foreground
            maps.append(np.flip(fg, axes) if axes else fg)
        return {"tta": tta_disagreement(maps)}
    if measure != "entropy":
        raise ValueError(f"measure must be one of {sorted(MEASURES)}, got {measure!r}")
    layer, captured = bottleneck(network), []
    hook = layer.register_forward_hook(lambda _m, _i, out: captured.append(out)) if layer is not None else None
    try:
        fg = predict_maps(network, spec, rgb).foreground
    finally:
        if hook is not None:
            hook.remove()
    features = captured[0].float().flatten(2).mean(2)[0].cpu().numpy() if captured else np.zeros(0)
    return {"entropy": patch_uncertainty(fg), "embedding": features}


def probe_windows(box: Box) -> list[Box]:
    """The ``PROBE``-sized windows at the corners of ``box`` (the box itself when smaller) that
    measure it: at most four, whatever the box's size, so that a measure costs the same for every patch."""
    x, y, w, h = box
    pw, ph = min(PROBE, w), min(PROBE, h)
    xs = sorted({x, x + w - pw}) if w > pw else [x]
    ys = sorted({y, y + h - ph}) if h > ph else [y]
    return [(px, py, pw, ph) for py in ys for px in xs]


def box_measures(
    source: RegionSource,
    box: Box,
    networks: Mapping[str, torch.nn.Module],
    spec: NucleiSpec,
    *,
    passes: int = MC_PASSES,
) -> dict[str, Any]:
    """The measures named by ``networks`` (each computed on its network) of a box of ``source``: each
    the mean over the box's non-glass probe windows; 0 when every window is glass (nothing to label)."""
    windows: list[dict[str, Any]] = []
    for px, py, pw, ph in probe_windows(box):
        rgb = source.read(px, py, pw, ph)
        if rgb.mean() <= GLASS:
            window: dict[str, Any] = {}
            for measure, network in networks.items():
                window.update(window_measures(measure, network, spec, rgb, passes=passes))
            windows.append(window)
    if not windows:
        return dict.fromkeys(networks, 0.0)
    return {name: np.mean([m[name] for m in windows], axis=0) for name in windows[0]}


class PatchMeasures:
    """One measure of slide patches under the served nuclei network, kept for later requests.

    Each patch is measured over up to four ``PROBE``-sized windows at its corners (glass windows are
    skipped). ``measure``: ``entropy`` (the mean binary entropy of the foreground probability; one
    pass per window; the pass also keeps the window's mean bottleneck features, which
    ``WSIDiverse`` uses), ``bald`` (the mutual information between the foreground and dropout masks
    over ``MC_PASSES`` passes with dropout injected at the bottleneck: where the weights, not the
    image, make the network unsure) or ``tta`` (the spread of the foreground over the window and its
    three flips, nuclei having no orientation; four passes). Measures are kept per image file and
    served weights, and computed on a private copy of the served network, so that neither the
    feature hook nor the injected dropout can touch an infer running at the same time. Strategies
    ranking by the same measure can share one (``wsi_uncertain`` and ``wsi_diversity`` both use the
    entropy pass), so that each patch is measured once for both.

    Args:
        spec: the network's settings.
        measure: ``entropy``, ``bald`` or ``tta``.
        dropout: the injected dropout probability for ``bald``.
    """

    def __init__(self, spec: NucleiSpec, *, measure: str = "entropy", dropout: float = MC_DROPOUT) -> None:
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {sorted(MEASURES)}, got {measure!r}")
        if not 0.0 < dropout < 1.0:
            raise ValueError(f"dropout must be in (0, 1), got {dropout}")
        self.spec, self.measure, self._dropout = spec, measure, dropout
        self.lock = threading.Lock()
        # Measures under the network they were computed with: {(image version, box): {name: value}}.
        # Reused by later requests (other annotators, the next patch), emptied when new weights are served.
        self.stored: dict[tuple[str, Box], dict[str, Any]] = {}
        self._scored_with: torch.nn.Module | None = None
        self._private: torch.nn.Module | None = None  # the copy of _scored_with that measures run on

    def _scoring_copy(self, network: torch.nn.Module) -> torch.nn.Module:
        return scoring_copy(network, dropout=self._dropout if self.measure == "bald" else None)

    def measures(self, source: RegionSource, box: Box, network: torch.nn.Module) -> dict[str, Any]:
        """The patch's measures: each the mean over its non-glass probe windows (0 if all glass)."""
        return box_measures(source, box, {self.measure: network}, self.spec)

    def scored(
        self, source: RegionSource, boxes: list[Box], version: str, network: torch.nn.Module, who: str
    ) -> dict[Box, dict[str, Any]]:
        """``{box: measures}``, computing only those not kept from an earlier request."""
        with self.lock:
            if network is not self._scored_with:
                self.stored, self._scored_with, self._private = {}, network, self._scoring_copy(network)
            elif len(self.stored) > MAX_STORED_SCORES:
                self.stored = {}
            new = [b for b in boxes if (version, b) not in self.stored]
            for b in new:
                self.stored[version, b] = self.measures(source, b, self._private)
            logger.info("%s: %d patches (%d measured now)", who, len(boxes), len(new))
            return {b: self.stored[version, b] for b in boxes}


class WSIUncertain(_PatchStrategy):
    """The patches of a slide where the nuclei network is least sure which pixels are nuclei.

    Patches tile the slide (at most ``MAX_CANDIDATES`` of them on a large slide: see ``candidates``);
    each is measured as ``PatchMeasures`` says, and the highest are handed out first.

    Args:
        spec: the network's settings.
        network: returns the served network (``None`` while untrained: then random patches).
        rng: random source for ties and sampling.
        book: reservations shared with the app's other patch strategies.
        measure: ``entropy``, ``bald`` or ``tta``.
        dropout: the injected dropout probability for ``bald``.
        shared: measures to share with another strategy (its ``store``) instead of keeping its own;
            their measure is used, and ``measure`` and ``dropout`` must then be left out.
    """

    summary: str | None = None  # the description /info shows; by default it names the measure

    def __init__(
        self,
        spec: NucleiSpec,
        network: Callable[[], torch.nn.Module | None],
        rng: random.Random | None = None,
        book: ReservationBook | None = None,
        *,
        measure: str | None = None,
        dropout: float | None = None,
        shared: PatchMeasures | None = None,
    ) -> None:
        if shared is not None and (measure is not None or dropout is not None):
            raise ValueError("shared measures come with their own measure and dropout: give one or the other")
        if shared is None:
            shared = PatchMeasures(
                spec, measure=measure or "entropy", dropout=MC_DROPOUT if dropout is None else dropout
            )
        self.store = shared
        self._measure = shared.measure
        summary = (
            self.summary or f"Most uncertain patches of a slide under the nuclei network ({MEASURES[self._measure]})"
        )
        super().__init__(summary, rng, book)
        self._network = network

    def scored(self, source: RegionSource, boxes: list[Box], version: str, network: torch.nn.Module) -> dict:
        """``{box: measures}``, computing only those not kept from an earlier request."""
        return self.store.scored(source, boxes, version, network, self.description)

    def candidates(self, boxes: list[Box], image: str, version: str) -> list[Box]:
        """At most ``MAX_CANDIDATES`` of ``boxes``: the free ones already measured (by the background
        measuring or an earlier request) first, topped up with others at random, so that a request
        mostly ranks stored measures yet always has fresh patches once the measured ones are held."""
        if len(boxes) <= MAX_CANDIDATES:
            return boxes
        held = set(self._book.reserved())
        with self.store.lock:
            measured = [b for b in boxes if (version, b) in self.store.stored and patch_key(image, b) not in held]
        measured = measured[:MAX_CANDIDATES]
        chosen = set(measured)
        others = [b for b in boxes if b not in chosen and patch_key(image, b) not in held]
        return measured + self._rng.sample(others, min(len(others), MAX_CANDIDATES - len(measured)))

    def prefetch(self, source: RegionSource, image: str, version: str, patch: tuple[int, int]) -> int:
        """Measures the candidate patches of ``image`` now, so that a later request on it only ranks;
        the number of candidates, all measured now or before (0 while the model is untrained or the
        store is full)."""
        network = self._network()
        if network is None or len(self.store.stored) + MAX_CANDIDATES > MAX_STORED_SCORES:
            return 0
        boxes = self.candidates(patch_grid(source.dimensions, patch), image, version)
        self.scored(source, boxes, version, network)
        return len(boxes)

    def rank(self, source: RegionSource, boxes: list[Box], image: str, version: str) -> list[Box]:
        network = self._network()
        boxes = self.candidates(boxes, image, version)
        if network is None:  # untrained: random order
            return self._rng.sample(boxes, len(boxes))
        measured = self.scored(source, boxes, version, network)
        return ranked_patches(boxes, {b: float(m[self._measure]) for b, m in measured.items()}, self._rng)


class WSIDiverse(WSIUncertain):
    """Patches that are uncertain and unlike each other and unlike the patches other annotators hold.

    The radiology ``diversity`` strategy on patches: greedy uncertainty-weighted coverage
    (``strategies.selection.diverse_top_k``) of the foreground entropy and the mean bottleneck
    features of each patch, with the reserved patches of the slide counting as covered. Its
    measures are those of ``wsi_uncertain`` when the two share them (``shared``).
    """

    summary = (
        "A batch of k uncertain patches of a slide unlike each other and the patches others hold "
        "(foreground entropy x distance in the nuclei network's feature space)"
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._measure != "entropy":
            raise ValueError(f"wsi_diversity ranks by the entropy pass and its features, not {self._measure!r}")

    def rank(self, source: RegionSource, boxes: list[Box], image: str, version: str) -> list[Box]:
        network = self._network()
        held = {key for key in self._book.reserved() if key.startswith(f"{image}@")}
        grid = boxes
        boxes = self.candidates(boxes, image, version)
        if network is None:
            return self._rng.sample(boxes, len(boxes))
        key = {b: patch_key(image, b) for b in boxes}
        measured = self.scored(source, boxes, version, network)
        free = [key[b] for b in boxes if key[b] not in held]
        scores = {key[b]: float(m["entropy"]) for b, m in measured.items()}
        with self.store.lock:  # held patches left out of the candidates still cover their part of the space
            covering = {k: self.store.stored.get((version, b)) for b in grid if (k := patch_key(image, b)) in held}
        pairs = [*((key[b], m) for b, m in measured.items()), *((k, m) for k, m in covering.items() if m)]
        embeddings = {k: m["embedding"] for k, m in pairs if len(m.get("embedding", ())) > 0}
        order = diverse_top_k(free, scores, embeddings, max(len(free), 1), self._rng, covered=sorted(held))
        by_key = {k: b for b, k in key.items()}
        return [by_key[k] for k in order] + [b for b in boxes if key[b] in held]

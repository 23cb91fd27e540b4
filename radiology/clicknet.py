"""A click-conditioned network (DeepEdit's input encoding) as a ``radiology.clicks.ClickEngine``.

The network is the automatic model's UNet with ``1 + num_classes`` input channels: the normalised
image, then one guidance map per class (background first, then each label by id), each the maximum
over that class's clicks of a Gaussian of the distance to the click (peak 1, ``sigma`` voxels of the
model's grid), as ``monai.apps.deepedit.transforms.AddGuidanceSignalDeepEditd`` encodes them. Its
weights start as the automatic model's with zero weights on the guidance channels
(``widen_input``), so with no clicks it first answers exactly as the automatic network; it is then
trained with simulated clicks (``research.radiology.clicks_training``).

With no clicks at all the engine answers the automatic model's own label (the proposal when the
caller has one, else the automatic network run here), so a session starts from the same label as
``/infer/<model>``. With clicks it answers, by default, the automatic model's log-probabilities
plus what the clicks change in the click network's, plus a correction around each click as strong
as the networks' disagreement with it there (``click_correction``; ``ClickNet``). Clicks arrive
in voxel indices of the image as sent and are mapped to the model's grid through the
voxel-to-world affines (reorientation and resampling included), and the answer is taken back to
the image's grid as the automatic infer does it (``radiology.inverse``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.networks.nets import UNet
from monai.transforms import Compose
from monai.utils import MetaKeys

from appcore.precision import autocast
from appcore.weights import load_state_dict
from radiology.clicks import Clicks
from radiology.ensemble import members_in
from radiology.infer import window_inferer
from radiology.inverse import InvertClassIndexd
from radiology.spec import WEIGHTS_DIR, ModelSpec
from radiology.transforms import class_index, preprocess

BACKGROUND = "background"
CLICK_WEIGHT = 0.0
"""Default ``ClickNet.click_weight``: no fixed term, the correction below holds the clicks."""
SIGMA = 2.0
"""Width (standard deviation, in voxels of the model's grid) of a click's guidance Gaussian."""
CORRECTION_REACH = 3.0
"""Default ``ClickNet.correction_reach``: width (voxels of the model's grid) of a click's correction."""
CORRECTION_MARGIN = 2.0
"""Default ``ClickNet.correction_margin`` (log-probability); the model card says how both were chosen."""


def guidance_channels(spec: ModelSpec) -> list[str]:
    """The guidance channels' class names in input order: background, then the labels by id."""
    names = [BACKGROUND] + [""] * (spec.num_classes - 1)
    for label in spec.labels:
        names[label.id] = label.name
    return names


def click_network(spec: ModelSpec) -> UNet:
    """A fresh UNet of ``spec``'s architecture taking the image plus one guidance map per class."""
    args = spec.unet_args()
    args["in_channels"] = 1 + spec.num_classes
    return UNet(**args)


def widen_input(state: Mapping[str, torch.Tensor], network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state`` (one automatic UNet's weights) for ``network`` (the same UNet with more input
    channels): every tensor that reads the input gets zero weights for the added channels, so the
    widened network answers exactly as the automatic one while the guidance maps are ignored.

    Raises ``ValueError`` if ``state`` is not the automatic network of ``network``'s architecture.
    """
    target = network.state_dict()
    if set(state) != set(target):
        missing, extra = sorted(set(target) - set(state))[:3], sorted(set(state) - set(target))[:3]
        raise ValueError(
            f"the automatic weights do not fit the click network: missing {missing}, unexpected {extra}; "
            "pass the weights of one automatic network of the same model (one member of an ensemble)"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        want = target[key].shape
        if value.shape == want:
            out[key] = value.to(target[key].dtype)
        elif value.ndim == len(want) and value.ndim >= 2 and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
            wide = torch.zeros(want, dtype=target[key].dtype)
            wide[:, : value.shape[1]] = value
            out[key] = wide
        else:
            raise ValueError(f"{key}: automatic weights of shape {tuple(value.shape)}, click network {tuple(want)}")
    return out


def member_state(state: Mapping[str, torch.Tensor], member: int) -> dict[str, torch.Tensor]:
    """One network's weights out of ``state``: member ``member`` of an ensemble, or ``state`` itself."""
    prefix = f"members.{member}."
    if not any(k.startswith("members.") for k in state):
        return dict(state)
    found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not found:
        raise ValueError(f"the weights hold no ensemble member {member}")
    return found


def guidance_maps(points: Sequence[torch.Tensor], shape: Sequence[int], sigma: float = SIGMA) -> torch.Tensor:
    """``[len(points), *shape]`` guidance maps: map ``c`` is the maximum over the rows of
    ``points[c]`` (``[K, 3]`` voxel coordinates, fractional allowed) of a Gaussian of the distance
    to that point, 1 at the point; 0 everywhere for a class without clicks.

    Separable: each click is an outer product of three 1D Gaussians, so a map costs ``K`` products
    of the volume's size and no convolution.
    """
    out = torch.zeros((len(points), *shape), dtype=torch.float32)
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    for c, pts in enumerate(points):
        for p in torch.as_tensor(pts, dtype=torch.float32).reshape(-1, 3):
            g = [torch.exp(-((axes[a] - p[a]) ** 2) / (2 * sigma**2)) for a in range(3)]
            blob = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
            torch.maximum(out[c], blob, out=out[c])
    return out


def click_correction(
    scores: torch.Tensor, points: Sequence[torch.Tensor], *, reach: float, margin: float
) -> torch.Tensor:
    """What to add to ``scores`` (``[C, *spatial]`` class log-probabilities) so that each click holds
    and corrects the voxels around it that the networks hold no more firmly than the clicked one.

    A click of class ``c`` at a point where ``c`` loses by ``d`` (the best class' score minus
    ``c``'s at the nearest voxel; 0 where ``c`` already wins) adds ``(d + margin)`` times a Gaussian
    of width ``reach`` centred on the click to class ``c``; several clicks of one class take the
    largest. The clicked voxel thus takes its class whatever the networks' confidence, and a voxel
    nearby follows it where its own disagreement is less than the click's scaled by the
    Gaussian: a click where the networks are confidently wrong reaches as far as that confidence
    does, instead of the fixed reach of a constant weight, which either leaves the clicked voxel
    wrong or overrides sure voxels around an unsure one.

    Args:
        scores: class log-probabilities, ``[C, *spatial]``.
        points: per class, its clicks as ``[K, 3]`` (fractional) voxel coordinates of ``scores``' grid.
        reach: the Gaussian's standard deviation in voxels (more than 0).
        margin: what the clicked class wins by at the click (0 or more).
    """
    if not reach > 0:
        raise ValueError(f"the correction's reach must be more than 0 voxels, got {reach}")
    if not margin >= 0:
        raise ValueError(f"the correction's margin must be 0 or more, got {margin}")
    if len(points) != scores.shape[0]:
        raise ValueError(f"clicks for {len(points)} classes, scores for {scores.shape[0]}")
    spatial = tuple(scores.shape[1:])
    upper = torch.tensor(spatial, dtype=torch.float32) - 1
    best = scores.max(dim=0).values
    strength: list[list[float]] = []
    for c, pts in enumerate(points):
        pts = torch.as_tensor(pts, dtype=torch.float32).reshape(-1, 3)
        nearest = torch.minimum(torch.clamp(pts.round(), min=0), upper).long()
        losing = best[tuple(nearest.T)] - scores[c][tuple(nearest.T)]
        strength.append((torch.clamp(losing, min=0) + margin).tolist())
    out = torch.zeros_like(scores)
    axes = [torch.arange(n, dtype=torch.float32) for n in spatial]
    for c, pts in enumerate(points):
        for p, s in zip(torch.as_tensor(pts, dtype=torch.float32).reshape(-1, 3), strength[c], strict=True):
            g = [torch.exp(-((axes[a] - p[a]) ** 2) / (2 * reach**2)) for a in range(3)]
            bump = s * g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
            torch.maximum(out[c], bump.to(out.dtype), out=out[c])
    return out


class ClickNet:
    """A ``ClickEngine``: the click-conditioned UNet of one model, on the image's own grid.

    Weights are read at the first ``segment`` (nothing at construction), then kept.

    Args:
        spec: the model (labels, spacing, intensity handling, architecture).
        weights: the click network's weights (one UNet, ``click_network(spec)``).
        automatic_weights: candidate weights of the automatic model, oldest first, the last one that
            exists used (as ``SegmentationInfer`` serves them); its label answers a request with no
            clicks and no proposal.
        automatic_channels: the automatic network's channels where they are not ``spec``'s (weights
            of an earlier architecture; ``research.radiology.clicks_evaluate --automatic-channels``).
        sigma: the guidance Gaussians' width, as the network was trained with.
        click_weight: added, times each class's guidance map, to the log-probability of that class
            before the argmax, so that a click holds near it where the networks are unsure (a voxel
            whose winning margin is under ``click_weight`` times the map there takes the click's
            class; the clicked voxel itself, unless the margin there is over ``click_weight``).
            0 (the default): none; ``correction_margin`` holds the clicks.
        correction_reach, correction_margin: each click's correction (``click_correction``): its
            width in voxels of the model's grid, and what the clicked class wins by at the click.
            ``correction_margin=None``: no correction (the networks and ``click_weight`` alone).
        on_automatic: apply the clicks' effect to the automatic model's answer: the automatic
            log-probabilities plus the click network's with the clicks minus its own with none.
            The automatic model (an ensemble of four for the hippocampus) is better than the one
            network the click network started from, and a first click then changes the label near
            it instead of swapping one network's answer for another's. The two no-click passes
            are kept for the last image. ``False``: the click network's answer alone.
        cpu_bf16: on the CPU, run the networks in bfloat16 where the CPU computes it natively.
        device: where the networks run.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        weights: Path,
        automatic_weights: Sequence[Path] = (),
        automatic_channels: Sequence[int] | None = None,
        sigma: float = SIGMA,
        click_weight: float = CLICK_WEIGHT,
        correction_reach: float = CORRECTION_REACH,
        correction_margin: float | None = CORRECTION_MARGIN,
        on_automatic: bool = True,
        cpu_bf16: bool = True,
        device: str = "cpu",
    ) -> None:
        self.spec = spec
        self.weights = Path(weights)
        self.automatic_weights = [Path(p) for p in automatic_weights]
        self.automatic_channels = None if automatic_channels is None else tuple(int(c) for c in automatic_channels)
        self.sigma = float(sigma)
        self.on_automatic = on_automatic
        if not click_weight >= 0:
            raise ValueError(f"click_weight must be 0 or more, got {click_weight}")
        self.click_weight = float(click_weight)
        if not correction_reach > 0:
            raise ValueError(f"correction_reach must be more than 0 voxels, got {correction_reach}")
        if correction_margin is not None and not correction_margin >= 0:
            raise ValueError(f"correction_margin must be 0 or more (or None: no correction), got {correction_margin}")
        self.correction_reach = float(correction_reach)
        self.correction_margin = None if correction_margin is None else float(correction_margin)
        self.cpu_bf16 = cpu_bf16
        self.device = torch.device(device)
        self.channels = guidance_channels(spec)
        self._pre = Compose(preprocess(spec, with_label=False, load=False))
        self._invert = InvertClassIndexd(keys="pred", transform=self._pre, orig_key="image")
        self._lock = threading.Lock()
        self._network: torch.nn.Module | None = None
        self._automatic: tuple[Path, float, torch.nn.Module] | None = None
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def network(self) -> torch.nn.Module:
        """The click network, loaded at the first call."""
        with self._lock:
            if self._network is None:
                net = click_network(self.spec)
                net.load_state_dict(load_state_dict(self.weights), strict=True)
                self._network = net.to(self.device).eval()
            return self._network

    def automatic_network(self) -> torch.nn.Module:
        """The automatic model's network from the newest existing ``automatic_weights`` (reloaded
        when that file changes, as a training run publishes new weights)."""
        found = [p for p in self.automatic_weights if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"no automatic weights for {self.spec.name} among {[str(p) for p in self.automatic_weights]}: "
                "pass the proposal, or weights that exist"
            )
        path = found[-1]
        mtime = path.stat().st_mtime
        with self._lock:
            if self._automatic is None or self._automatic[:2] != (path, mtime):
                state = load_state_dict(path)
                # One network or an ensemble, as the file holds (a training run keeps the count).
                arch = replace(self.spec, members=members_in(state))
                if self.automatic_channels is not None:
                    arch = replace(arch, channels=self.automatic_channels)
                net = arch.network()
                net.load_state_dict(state, strict=True)
                self._automatic = (path, mtime, net.to(self.device).eval())
            return self._automatic[2]

    def segment(
        self,
        image: np.ndarray,
        affine: np.ndarray,
        clicks: Clicks,
        proposal: np.ndarray | None = None,
    ) -> np.ndarray:
        """The label (uint8, ``image``'s shape) for ``clicks``; the automatic label when there are none."""
        unknown = sorted(set(clicks) - set(self.channels) - {""})
        if unknown:
            raise ValueError(f"clicks under unknown label names {unknown}; this model's names: {self.channels}")
        if not any(len(v) for v in clicks.values()):
            if proposal is not None:
                if tuple(proposal.shape) != tuple(image.shape):
                    raise ValueError(f"the proposal's shape {proposal.shape} is not the image's {image.shape}")
                return np.asarray(proposal, dtype=np.uint8)
            return self._run(image, affine, None)
        return self._run(image, affine, clicks)

    def network_answer(self, image: np.ndarray, affine: np.ndarray, clicks: Clicks) -> np.ndarray:
        """The click network's own label for ``clicks`` (not applied to the automatic model's answer),
        also with none (then its guidance maps are all 0)."""
        return self._run(image, affine, clicks, alone=True)

    def model_points(self, data_image: MetaTensor, source_affine: np.ndarray, clicks: Clicks) -> list[torch.Tensor]:
        """Each guidance channel's clicks in (fractional) voxel coordinates of the model's grid."""
        to_model = np.linalg.solve(np.asarray(data_image.affine, np.float64), np.asarray(source_affine, np.float64))
        points = []
        for name in self.channels:
            voxels = np.asarray(clicks.get(name, []), np.float64).reshape(-1, 3)
            homogeneous = np.concatenate([voxels, np.ones((len(voxels), 1))], axis=1)
            points.append(torch.from_numpy((homogeneous @ to_model.T)[:, :3]).float())
        return points

    def _scores(self, network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities ``[C, *spatial]`` of ``network`` on ``x`` (``[1, channels, *spatial]``)."""
        with autocast(self.device, cpu_bf16=self.cpu_bf16):
            logits = window_inferer(self.spec)(x.to(self.device), network)
        return torch.log_softmax(logits[0].float().cpu(), dim=0)

    def _base(
        self, image: np.ndarray, affine: np.ndarray, model_image: MetaTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The automatic model's log-probabilities and the click network's with no clicks, for this
        image; the last image's are kept, as a session sends the same image with every click."""
        automatic = self.automatic_network()
        key = (
            hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest(),
            image.shape,
            str(image.dtype),
            affine.tobytes(),
            self._automatic[:2] if self._automatic else None,
        )
        cached = self._cache
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        x = model_image.as_tensor()[None]
        base = self._scores(automatic, x)
        silent = torch.zeros((1, self.spec.num_classes, *x.shape[2:]))
        reference = self._scores(self.network(), torch.cat([x, silent], dim=1))
        self._cache = (key, base, reference)
        return base, reference

    @torch.inference_mode()
    def _run(self, image: np.ndarray, affine: np.ndarray, clicks: Clicks | None, *, alone: bool = False) -> np.ndarray:
        affine = np.asarray(affine, np.float64)
        meta = {
            MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.SPATIAL_SHAPE: np.asarray(image.shape),
        }
        data = self._pre({"image": MetaTensor(torch.as_tensor(np.asarray(image)), affine=affine, meta=meta)})
        model_image = data["image"]
        if clicks is None:
            scores = self._scores(self.automatic_network(), model_image.as_tensor()[None])
        else:
            points = self.model_points(model_image, affine, clicks)
            maps = guidance_maps(points, model_image.shape[1:], self.sigma)
            scores = self._scores(self.network(), torch.cat([model_image.as_tensor(), maps])[None])
            if self.on_automatic and not alone:
                # What the clicks change in the click network, applied to the automatic model's answer.
                base, reference = self._base(image, affine, model_image)
                scores = base + (scores - reference)
            scores = scores + self.click_weight * maps
            if self.correction_margin is not None and not alone:
                scores = scores + click_correction(
                    scores, points, reach=self.correction_reach, margin=self.correction_margin
                )
        pred = MetaTensor(class_index(scores).to(torch.float32), meta=dict(model_image.meta))
        out = self._invert({"image": model_image, "pred": pred})["pred"]
        return np.asarray(torch.as_tensor(out)[0].numpy(), dtype=np.uint8)


def hippocampus_clicks(**kwargs: object) -> ClickNet:
    """The ``hippocampus`` click engine with its shipped weights (``radiology/weights/hippocampus_clicks.pt``).

    ``kwargs`` go to ``ClickNet`` (``automatic_weights`` defaults to the shipped automatic weights;
    a server passes its served ones).
    """
    from radiology.hippocampus import HIPPOCAMPUS

    kwargs.setdefault("weights", WEIGHTS_DIR / "hippocampus_clicks.pt")
    kwargs.setdefault("automatic_weights", [HIPPOCAMPUS.shipped_weights_path])
    return ClickNet(HIPPOCAMPUS, **kwargs)  # type: ignore[arg-type]

"""A click engine for every model: graph cut on a crop around the clicks, with a geodesic prior from them.

Why this method (``docs/interactive.md`` has the measurements): random walker and a plain graph cut
with seed histograms do little after one small seed in 3D; a geodesic distance from the clicks is
what makes a click reach the whole organ. The geodesic here grows cheaply through voxels of the
clicked intensity and pays for every intensity step it crosses, so a click floods its organ and
stops at its boundary; a background click (or another label's click) competes for the voxels
closer to it. The voxels the geodesic reaches are then weighed by their intensity against the
structure's and the rest's, sampled from the image (``_intensity_logit``): that takes out the
partial-volume shell which the reach alone decided as a whole. The graph cut (SciPy's
``maximum_flow``, BSD; PyMaxflow is GPL) then smooths that decision along image edges. Everything
runs on a crop (the clicks' box plus a margin), coarsened to a voxel budget, so a click costs about
the same on any image size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import ndimage
from scipy.sparse.csgraph import breadth_first_order, dijkstra, maximum_flow

from radiology.clicks import Clicks, Voxel

BACKGROUND = "background"


@dataclass(frozen=True)
class GraphCutParams:
    """The engine's settings; one set for every model (chosen in ``docs/interactive.md``).

    Args:
        margin_mm: the crop is the box of a label's clicks (and of its proposal) plus this margin.
        ball_mm: a click marks the voxels within this radius as certain (a hard seed).
        max_voxels: a larger crop is coarsened by whole factors per axis (finest axes first).
        smooth_voxels: Gaussian smoothing (in voxels of the crop) before the intensity terms.
        step: geodesic cost per mm of path, so that distance still counts in a uniform region.
        edge: geodesic cost per noise unit (the image's robust spread of neighbour differences)
            an intensity step crosses beyond ``noise`` units.
        noise: intensity step, in noise units, that is taken for noise and costs nothing.
        band: geodesic cost per mm through voxels whose intensity is off the clicked one by more than
            ``band_width`` scales (per scale beyond it, up to 4).
        band_width: see ``band``.
        reach: geodesic cost beyond which a voxel is not the clicked structure's (soft, ``softness``).
        softness: scale of the soft decisions, in geodesic cost.
        smoothness: weight of the graph cut's boundary term against the geodesic unary term.
        prior: weight of the automatic proposal in the unary term, where there is one.
        refine_mm: with a proposal, the crop margin, and how far beyond the proposal a click of the
            label may add to it.
        intensity: weight of the intensity term in the unary term: the log-likelihood ratio of a
            voxel's intensity, structure against the rest (samples the geodesics give), where it is
            negative, clipped at -3. It takes out partial-volume voxels and other tissue the
            geodesic's reach let in (at most 1.5 logit units, 12 units of geodesic cost at 0.5), and
            never adds a voxel.
        intensity_bins: histogram bins of the intensity term, over the crop's clipped range.
        sample_mm: the structure's intensity is sampled within this distance of its clicks (and
            where its geodesic is short): far from them it may already be leaking.
    """

    margin_mm: float = 40.0
    ball_mm: float = 3.0
    max_voxels: int = 160_000
    smooth_voxels: float = 1.0
    step: float = 0.05
    edge: float = 1.0
    noise: float = 3.0
    band: float = 1.0
    band_width: float = 1.0
    reach: float = 30.0
    softness: float = 8.0
    smoothness: float = 0.3
    prior: float = 2.0
    refine_mm: float = 4.0
    intensity: float = 0.5
    intensity_bins: int = 64
    sample_mm: float = 15.0


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def ball_offsets(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Voxel offsets (n x 3) within ``radius_mm`` of a voxel, the voxel itself always included."""
    reach = [int(math.floor(radius_mm / s)) for s in spacing]
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1).reshape(-1, 3)
    inside = ((grid * np.asarray(spacing)) ** 2).sum(1) <= radius_mm**2
    return grid[inside]


def seed_masks(
    shape: tuple[int, ...],
    mine: Sequence[Voxel],
    others: Sequence[Voxel],
    offsets: np.ndarray,
    spacing: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background seeds of one structure (disjoint): balls around its clicks
    (``mine``) and around every other click (``others``), points given relative to a crop of
    ``shape``. A voxel in balls of both sides goes to the nearer click (in mm), and each click's own
    voxel is always its side's: a click next to another of the other side keeps its meaning."""
    fg = seed_mask(shape, mine, offsets)
    bg = seed_mask(shape, others, offsets)
    both = fg & bg
    if both.any():
        where = np.argwhere(both).astype(float) * np.asarray(spacing)

        def nearest(points: Sequence[Voxel]) -> np.ndarray:
            centres = np.asarray(points, dtype=float) * np.asarray(spacing)
            return np.sqrt(((where[:, None, :] - centres[None]) ** 2).sum(-1)).min(1)

        mine_nearer = nearest(mine) < nearest(others)
        fg[tuple(np.argwhere(both)[~mine_nearer].T)] = False
        bg[tuple(np.argwhere(both)[mine_nearer].T)] = False
    for points, own, other in ((mine, fg, bg), (others, bg, fg)):
        for q in points:
            if all(0 <= c < n for c, n in zip(q, shape, strict=True)):
                own[tuple(q)], other[tuple(q)] = True, False
    return fg, bg


def seed_mask(shape: tuple[int, ...], points: Sequence[Voxel], offsets: np.ndarray) -> np.ndarray:
    """Boolean mask of the balls (``offsets``) around ``points``, clipped to ``shape``."""
    mask = np.zeros(shape, dtype=bool)
    if not len(points):
        return mask
    voxels = (np.asarray(points, dtype=int)[:, None, :] + offsets[None]).reshape(-1, 3)
    voxels = voxels[((voxels >= 0) & (voxels < np.asarray(shape))).all(1)]
    mask[tuple(voxels.T)] = True
    return mask


class GeodesicGraphCut:
    """Segments each clicked label of a model: graph cut with a geodesic prior from the clicks.

    A label's own clicks are its foreground; ``background`` clicks and every other label's clicks are
    its background. With an automatic ``proposal``, a label's proposed region is a prior (and, for a
    label with no click of its own, its seed), so clicks correct the proposal instead of replacing it.

    Args:
        label_ids: the model's label names and ids (no background).
        params: the engine's settings.

    Examples:
        >>> engine = GeodesicGraphCut({"liver": 5})
        >>> label = engine.segment(image, affine, {"liver": [(60, 40, 12)]}, None)  # doctest: +SKIP
    """

    def __init__(self, label_ids: Mapping[str, int], *, params: GraphCutParams | None = None) -> None:
        self.label_ids = dict(label_ids)
        self.params = params or GraphCutParams()

    def _offsets(self, spacing: np.ndarray) -> np.ndarray:
        return ball_offsets(self.params.ball_mm, spacing)

    def segment(self, image: np.ndarray, affine: np.ndarray, clicks: Clicks, proposal: np.ndarray | None) -> np.ndarray:
        image = np.asarray(image, dtype=np.float32)
        spacing = voxel_spacing(affine)
        out = np.zeros(image.shape, np.uint8) if proposal is None else np.asarray(proposal, np.uint8).copy()
        positive = {name: list(clicks.get(name, [])) for name in self.label_ids}
        for name, label_id in sorted(self.label_ids.items(), key=lambda item: item[1]):
            mine = positive[name]
            others = [p for other, pts in clicks.items() if other != name for p in pts]
            proposed = None if proposal is None else np.asarray(proposal) == label_id
            if not mine and (proposed is None or not proposed.any()):
                continue
            if not mine and not any(proposed[tuple(p)] for p in others):
                continue  # nothing said about this label: its proposal stays
            box = self._box(image.shape, spacing, mine, proposed, others if not mine else [])
            origin = np.array([s.start for s in box])
            fg, bg = seed_masks(
                tuple(b.stop - b.start for b in box),
                [tuple(np.asarray(q) - origin) for q in mine],
                [tuple(np.asarray(q) - origin) for q in others],
                self._offsets(spacing),
                spacing,
            )
            mask = self._segment_masks(image[box], spacing, fg, bg, None if proposed is None else proposed[box])
            region = out[box]
            region[region == label_id] = 0
            # Another label's voxels stay its own (its clicks decide them), but under this label's clicks.
            region[mask & ((region == 0) | fg)] = label_id
        return out

    # -- one label ---------------------------------------------------------------------------------
    def _box(
        self,
        shape: tuple[int, ...],
        spacing: np.ndarray,
        points: Sequence[Voxel],
        proposed: np.ndarray | None,
        extra: Sequence[Voxel],
    ) -> tuple[slice, ...]:
        """The crop: the box of ``points``, the proposed region and ``extra`` points, plus the margin."""
        corners = [np.asarray(p) for p in [*points, *extra]]
        if proposed is not None and proposed.any():
            where = np.argwhere(proposed)
            corners += [where.min(0), where.max(0)]
        low, high = np.min(corners, 0), np.max(corners, 0)
        margin_mm = self.params.margin_mm if proposed is None else self.params.refine_mm
        margin = np.ceil(margin_mm / spacing).astype(int)
        low = np.maximum(low - margin, 0)
        high = np.minimum(high + margin + 1, shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))

    def refine(
        self,
        image: np.ndarray,
        affine: np.ndarray,
        foreground: np.ndarray,
        background: np.ndarray,
        proposal: np.ndarray | None,
    ) -> np.ndarray:
        """One structure from painted strokes (scribbles): ``foreground`` and ``background`` voxel
        masks of ``image``'s grid, ``proposal`` (a mask) the structure as it is now, if any. Outside
        the crop around the strokes and the proposal, the proposal stays."""
        image = np.asarray(image, dtype=np.float32)
        spacing = voxel_spacing(affine)
        out = np.zeros(image.shape, bool) if proposal is None else np.asarray(proposal, bool).copy()
        if not foreground.any() and (proposal is None or not background.any()):
            return out
        points = [tuple(int(c) for c in q) for q in np.argwhere(foreground | background)[[0, -1]]]
        box = self._box(image.shape, spacing, points, None if proposal is None else out, [])
        if proposal is not None:  # strokes anywhere near the proposal: the box covers them all
            where = np.argwhere(foreground | background | out)
            low, high = where.min(0), where.max(0) + 1
            margin = np.ceil(self.params.refine_mm / spacing).astype(int)
            box = tuple(
                slice(int(max(a - m, 0)), int(min(b + m, n)))
                for a, b, m, n in zip(low, high, margin, image.shape, strict=True)
            )
        out[box] = self._segment_masks(
            image[box], spacing, foreground[box], background[box], None if proposal is None else out[box]
        )
        return out

    def _segment_masks(
        self,
        crop: np.ndarray,
        spacing: np.ndarray,
        marked: np.ndarray,
        bg: np.ndarray,
        proposed: np.ndarray | None,
    ) -> np.ndarray:
        """One structure on a crop: ``marked`` voxels are the user's (clicks' balls, strokes), ``bg``
        the background's, ``proposed`` the structure as proposed."""
        p = self.params
        marked = marked & ~bg
        fg = marked.copy()
        if proposed is not None:
            # The proposal's interior is a seed too (the clicks correct it, they do not start over), but
            # for its connected parts that a background mark (another label's click, a background click
            # or stroke) falls in: the marks say those are wrong, and the geodesic decides them afresh.
            parts, _ = ndimage.label(proposed)
            wrong = np.unique(parts[bg])
            interior = ndimage.binary_erosion(proposed, iterations=1)
            kept = interior & ~np.isin(parts, wrong[wrong > 0])
            if interior.any() and not kept.any():
                # The marks fall in every part: only the interior near them is in question.
                near = ndimage.distance_transform_edt(~bg, sampling=spacing) <= 2 * p.refine_mm
                kept = interior & ~near
            fg |= kept
        fg &= ~bg
        if not fg.any():
            return np.zeros(crop.shape, bool)
        # The intensity the structure is sought by: under the user's marks where there are some (a
        # proposal can hold other tissue), else under the proposal's seeds.
        clicked = marked if marked.any() else fg

        factors = _coarsening(crop.shape, spacing, p.max_voxels)
        image = _block_mean(crop.astype(np.float32), factors)
        step_mm = spacing * factors
        fg_c = _block_any(fg, factors)
        bg_c = _block_any(bg, factors) & ~fg_c
        prior = None if proposed is None else _block_mean(proposed.astype(np.float32), factors) > 0.5

        mask = self._cut(image, step_mm, fg_c, bg_c, prior, _block_any(clicked, factors))
        if any(f > 1 for f in factors):
            for axis, f in enumerate(factors):
                mask = np.repeat(mask, f, axis=axis)
            mask = mask[tuple(slice(0, n) for n in crop.shape)]
        mask |= fg
        mask &= ~bg
        if proposed is not None:  # beyond the proposal, a mark corrects its neighbourhood only
            near = ndimage.distance_transform_edt(~marked, sampling=spacing) <= p.refine_mm
            mask &= proposed | near
        return mask

    def _cut(
        self,
        image: np.ndarray,
        spacing: np.ndarray,
        fg: np.ndarray,
        bg: np.ndarray,
        prior: np.ndarray | None,
        clicked: np.ndarray,
    ) -> np.ndarray:
        p = self.params
        low, high = np.percentile(image, [0.5, 99.5])
        image = np.clip(image, low, high)
        if p.smooth_voxels > 0:
            image = ndimage.gaussian_filter(image, p.smooth_voxels)
        a, b, axis = _edges(image.shape)
        flat = image.ravel()
        step = np.abs(flat[a] - flat[b])
        # Intensity steps in units of the image's own noise: the robust spread of neighbour differences.
        # (Voxels clipped to the same value, air in CT, are left out: they have no noise.)
        moving = step[step > 1e-6 * float(high - low)]
        noise = max(1.4826 * float(np.median(moving)) if moving.size else 0.0, 1e-3 * float(high - low), 1e-6)
        jump = step / noise
        seeds = image[clicked]
        centre = float(np.median(seeds))
        spread = max(float(seeds.std()), noise)
        off = np.clip(np.abs(flat - centre) / spread - p.band_width, 0.0, 4.0)
        length = spacing[axis]
        cost = p.step * length + p.edge * np.maximum(jump - p.noise, 0.0) + p.band * length * 0.5 * (off[a] + off[b])
        n = image.size
        graph = sp.csr_matrix((cost + 1e-6, (a, b)), shape=(n, n))
        d_fg = _geodesic(graph, np.flatnonzero(fg.ravel()), n)
        d_bg = _geodesic(graph, np.flatnonzero(bg.ravel()), n)
        logit = np.minimum(p.reach - d_fg, d_bg - d_fg) / p.softness
        if p.intensity > 0:
            near = np.ones(n, bool)
            if math.isfinite(p.sample_mm):
                near = (ndimage.distance_transform_edt(~fg, sampling=spacing) <= p.sample_mm).ravel()
            logit = logit + p.intensity * _intensity_logit(flat, d_fg, d_bg, p.reach, p.intensity_bins, near)
        if prior is not None:
            logit = logit + p.prior * np.where(prior.ravel(), 1.0, -1.0)
        logit = np.clip(logit, -20.0, 20.0)

        weight = p.smoothness * np.exp(-0.5 * (jump / p.noise) ** 2) * (spacing.min() / length)
        mask = _min_cut(logit, weight, a, b, fg.ravel(), bg.ravel()).reshape(image.shape)
        # A region cut off from every click of the label is a leak, not a correction.
        parts, count = ndimage.label(mask)
        keep = np.unique(parts[fg & mask])
        return np.isin(parts, keep[keep > 0]) if count else mask


def _intensity_logit(
    values: np.ndarray, d_fg: np.ndarray, d_bg: np.ndarray, reach: float, bins: int, near: np.ndarray
) -> np.ndarray:
    """Log-likelihood ratio of each voxel's intensity, structure against the rest, where it is
    negative (zero elsewhere), from two samples the geodesics give: the structure's is what its
    clicks reach easily (within half the reach, nearer to them than to any background click, and
    ``near`` them), the rest's what they do not reach or a background click reaches first. Zero
    where either sample is too small to say anything."""
    inner = (d_fg <= 0.5 * reach) & (d_fg <= d_bg) & near
    outer = (d_fg > reach) | (d_bg < d_fg)
    if inner.sum() < 20 or outer.sum() < 20:
        return np.zeros(values.shape, np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.float64)
    edges = np.linspace(low, high, bins + 1)
    which = np.clip(np.digitize(values, edges) - 1, 0, bins - 1)
    fg = np.bincount(which[inner], minlength=bins).astype(np.float64)
    bg = np.bincount(which[outer], minlength=bins).astype(np.float64)
    # Laplace smoothing: an intensity neither sample holds says nothing either way.
    ratio = np.log((fg + 1.0) / (fg.sum() + bins)) - np.log((bg + 1.0) / (bg.sum() + bins))
    # Only against: an intensity can take a voxel out (a partial-volume shell, other tissue), never
    # add one the geodesic does not reach. Letting it add (clipped to +3) flooded same-intensity
    # tissue next to small and thin structures on the check set (docs/interactive.md).
    return np.clip(ratio, -3.0, 0.0)[which]


def _coarsening(shape: tuple[int, ...], spacing: np.ndarray, budget: int) -> tuple[int, ...]:
    """Whole factors per axis, coarsening the finest axes first, until the crop fits ``budget`` voxels."""
    factors = [1, 1, 1]
    while math.prod(math.ceil(n / f) for n, f in zip(shape, factors, strict=True)) > budget:
        sizes = [s * f for s, f in zip(spacing, factors, strict=True)]
        candidates = [i for i in range(3) if math.ceil(shape[i] / factors[i]) > 8]
        if not candidates:
            break
        axis = min(candidates, key=lambda i: sizes[i])
        factors[axis] += 1
    return tuple(factors)


def _pad_to(array: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    pad = [(0, (-n) % f) for n, f in zip(array.shape, factors, strict=True)]
    return np.pad(array, pad, mode="edge")


def _block_mean(array: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    if all(f == 1 for f in factors):
        return array
    a = _pad_to(array, factors)
    shape = [x for n, f in zip(a.shape, factors, strict=True) for x in (n // f, f)]
    return a.reshape(shape).mean(axis=(1, 3, 5))


def _block_any(mask: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    if all(f == 1 for f in factors):
        return mask
    a = np.pad(mask, [(0, (-n) % f) for n, f in zip(mask.shape, factors, strict=True)])
    shape = [x for n, f in zip(a.shape, factors, strict=True) for x in (n // f, f)]
    return a.reshape(shape).any(axis=(1, 3, 5))


def _edges(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 6-neighbourhood of a grid: first voxel, second voxel (flat indices) and the axis of each edge."""
    index = np.arange(math.prod(shape)).reshape(shape)
    firsts, seconds, axes = [], [], []
    for axis in range(3):
        n = shape[axis]
        firsts.append(np.take(index, range(n - 1), axis=axis).ravel())
        seconds.append(np.take(index, range(1, n), axis=axis).ravel())
        axes.append(np.full(firsts[-1].size, axis))
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(axes)


def _geodesic(graph: sp.csr_matrix, seeds: np.ndarray, n: int) -> np.ndarray:
    """Least path cost from any of ``seeds`` to every node (infinite without seeds or path)."""
    if not seeds.size:
        return np.full(n, np.inf)
    return dijkstra(graph, directed=False, indices=seeds, min_only=True)


def _min_cut(
    logit: np.ndarray, weight: np.ndarray, a: np.ndarray, b: np.ndarray, fg: np.ndarray, bg: np.ndarray
) -> np.ndarray:
    """Foreground of the minimum cut: unary ``logit`` (positive favours foreground), boundary
    ``weight`` on the edges ``a``-``b``, hard foreground ``fg`` and background ``bg`` seeds."""
    n = logit.size
    source, sink = n, n + 1
    scale = 100.0
    hard = 10**6
    to_source = np.where(fg, hard, np.rint(np.maximum(logit, 0) * scale)).astype(np.int64)
    to_sink = np.where(bg, hard, np.rint(np.maximum(-logit, 0) * scale)).astype(np.int64)
    to_source[bg] = 0
    to_sink[fg] = 0
    pair = np.maximum(np.rint(weight * scale), 0).astype(np.int64)
    nodes = np.arange(n)
    s_keep, t_keep, e_keep = to_source > 0, to_sink > 0, pair > 0
    rows = np.concatenate([np.full(s_keep.sum(), source), nodes[t_keep], a[e_keep], b[e_keep]])
    cols = np.concatenate([nodes[s_keep], np.full(t_keep.sum(), sink), b[e_keep], a[e_keep]])
    caps = np.concatenate([to_source[s_keep], to_sink[t_keep], pair[e_keep], pair[e_keep]]).astype(np.int32)
    graph = sp.csr_matrix((caps, (rows, cols)), shape=(n + 2, n + 2))
    flow = maximum_flow(graph, source, sink, method="dinic").flow
    residual = (graph - flow).tocsr()
    residual.data[residual.data < 0] = 0
    residual.eliminate_zeros()
    reached = breadth_first_order(residual, source, directed=True, return_predecessors=False)
    mask = np.zeros(n + 2, dtype=bool)
    mask[reached] = True
    return mask[:n]

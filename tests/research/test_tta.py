"""Test-time rotations and zooms (research.radiology.tta): each pass is undone on the probabilities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from research.radiology.tta import AffineTTA, rotation, tta_matrices, voxel_affine


def blob(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> torch.Tensor:
    grids = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape), indexing="ij")
    distance = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)).sqrt()
    return torch.sigmoid(radius - distance)[None, None]  # smooth edge, 1 inside


def warp(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    theta = voxel_affine(tuple(image.shape[2:]), matrix)[None]
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def centroid(image: torch.Tensor) -> list[float]:
    grids = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in image.shape[2:]), indexing="ij")
    return [float((g * image[0, 0]).sum() / image.sum()) for g in grids]


def test_the_identity_matrix_leaves_a_non_cubic_volume_as_it_is() -> None:
    image = blob((20, 28, 16), (8.0, 15.0, 7.0), 4.0)
    assert torch.allclose(warp(image, torch.eye(3, dtype=torch.float64)), image, atol=1e-5)


@pytest.mark.parametrize(("axis", "moves"), [(0, (1, 2)), (1, (0, 2)), (2, (0, 1))])
def test_a_rotation_turns_about_the_given_voxel_axis_and_the_centre(axis: int, moves: tuple[int, int]) -> None:
    # On a non-cubic volume: a rotation built in normalised coordinates would shear it instead.
    shape = (24, 32, 20)
    centre = [(s - 1) / 2 for s in shape]
    start = list(centre)
    start[moves[0]] += 6.0
    turned = centroid(warp(blob(shape, tuple(start), 3.0), rotation(axis, math.pi / 2)))
    assert turned[axis] == pytest.approx(centre[axis], abs=0.2), "the rotation axis stays put"
    off = [turned[a] - centre[a] for a in moves]
    assert abs(off[0]) < 0.3 and abs(abs(off[1]) - 6.0) < 0.3, f"a quarter turn moves the blob to the other axis: {off}"


def test_a_zoom_above_one_makes_anatomy_look_smaller() -> None:
    image = blob((24, 24, 24), (11.5, 11.5, 11.5), 6.0)
    assert 0.5 * float(image.sum()) < float(warp(image, torch.eye(3, dtype=torch.float64) * 1.25).sum())
    assert float(warp(image, torch.eye(3, dtype=torch.float64) * 1.25).sum()) < 0.6 * float(image.sum())


def test_the_pass_set_is_the_identity_six_rotations_and_the_zooms() -> None:
    matrices = tta_matrices(0.15, (0.9, 1.1))
    assert len(matrices) == 9 and torch.equal(matrices[0], torch.eye(3, dtype=torch.float64))
    for m in matrices[1:7]:
        assert torch.allclose(m @ m.T, torch.eye(3, dtype=torch.float64)) and not torch.equal(m, torch.eye(3))
    assert len(tta_matrices(0.0, ())) == 1


class PerVoxel(torch.nn.Module):
    """A network that commutes with any resampling: each voxel's logits depend on that voxel alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 8.0 * (x - 0.5)], dim=1)


@pytest.mark.parametrize("index", range(9))
def test_each_pass_is_undone_so_a_resampling_invariant_network_gives_its_plain_answer(index: int) -> None:
    image = blob((30, 36, 26), (11.0, 23.0, 9.0), 4.0)
    network = PerVoxel()
    plain = torch.softmax(network(image), 1)
    one_pass = AffineTTA(lambda x, n: n(x), matrices=[tta_matrices(0.15, (0.9, 1.1))[index]])
    averaged = one_pass(image, network)
    assert averaged.shape == plain.shape
    assert torch.allclose(averaged.sum(1), torch.ones_like(averaged[:, 0]), atol=1e-5), "still probabilities"
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    error = (averaged - plain)[inner].abs()
    # Bilinear resampling there and back blurs the blob's edge a little (at most 0.06-0.11 here); a
    # pass resampled back with the forward matrix instead of its inverse is off by 0.57-0.74.
    assert float(error.max()) < 0.15 and float(error.mean()) < 0.006, (float(error.max()), float(error.mean()))


def test_the_passes_are_averaged() -> None:
    image = blob((30, 36, 26), (11.0, 23.0, 9.0), 4.0)
    matrices = tta_matrices(0.15, (0.9, 1.1))
    network = PerVoxel()
    singles = [AffineTTA(lambda x, n: n(x), matrices=[m])(image, network) for m in matrices]
    assert torch.allclose(AffineTTA(lambda x, n: n(x))(image, network), sum(singles) / 9, atol=1e-6)


def test_a_pass_not_undone_would_be_caught() -> None:
    # The same check as above fails for a network whose answer moves with the pass: a fixed offset.
    image = blob((30, 36, 26), (11.0, 23.0, 9.0), 4.0)

    def shifted(x: torch.Tensor, n: torch.nn.Module) -> torch.Tensor:
        return n(torch.roll(x, 4, 2))

    network = PerVoxel()
    plain = torch.softmax(network(image), 1)
    averaged = AffineTTA(shifted)(image, network)
    assert float((averaged - plain).abs().max()) > 0.5


def test_only_a_single_image_batch_is_taken() -> None:
    with pytest.raises(ValueError, match=r"\[1, C, X, Y, Z\]"):
        AffineTTA(lambda x, n: n(x))(torch.zeros(2, 1, 8, 8, 8), PerVoxel())

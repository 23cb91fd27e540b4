"""Interactive nuclei: the nucleus under each foreground click, with background clicks cutting parts away.

Built on the ``nuclei`` network's output rather than a separate click-conditioned network: the
instance under a foreground click is returned; where the network found no nucleus there, the
connected region of weaker foreground evidence around the click is used; a background click inside
a chosen nucleus keeps only the pixels nearer the foreground click than the background one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from appcore.errors import bad_request

Click = tuple[int, int]  # (x, y)

# Foreground probability above which a pixel may belong to a nucleus the network was unsure of.
WEAK_FOREGROUND = 0.25


def parse_clicks(raw: object, name: str) -> list[Click]:
    """``[[x, y], ...]`` from a request (QuPath sends integers; DSA floats); a 400 for anything else."""
    if raw is None:
        return []
    try:
        clicks = [(round(float(p[0])), round(float(p[1]))) for p in raw]  # type: ignore[union-attr]
    except (TypeError, ValueError, IndexError):
        raise bad_request(f"'{name}' must be a list of [x, y] points, got {raw!r}") from None
    return clicks


def nucleus_at(
    labels: np.ndarray,
    foreground: np.ndarray,
    click: Click,
    background: list[Click],
    *,
    max_radius: int,
) -> np.ndarray:
    """Boolean mask of the nucleus under ``click`` (array coordinates); empty if the click is on glass."""
    x, y = click
    h, w = labels.shape
    if not (0 <= x < w and 0 <= y < h):
        return np.zeros(labels.shape, dtype=bool)
    if labels[y, x] > 0:
        region = labels == labels[y, x]
    else:
        weak, _ = ndimage.label(foreground > WEAK_FOREGROUND)
        if weak[y, x] == 0:
            return np.zeros(labels.shape, dtype=bool)
        region = weak == weak[y, x]
        # Weak evidence can leak into neighbours: keep it within a nucleus-sized disc of the click.
        yy, xx = np.ogrid[:h, :w]
        region &= (xx - x) ** 2 + (yy - y) ** 2 <= max_radius**2
    for bx, by in background:
        if 0 <= bx < w and 0 <= by < h and region[by, bx]:
            yy, xx = np.ogrid[:h, :w]
            nearer_fg = (xx - x) ** 2 + (yy - y) ** 2 <= (xx - bx) ** 2 + (yy - by) ** 2
            region &= nearer_fg
    # A cut may leave islands: keep the piece under the click.
    pieces, _ = ndimage.label(region)
    return pieces == pieces[y, x] if pieces[y, x] else np.zeros(labels.shape, dtype=bool)


def clicked_nuclei(
    labels: np.ndarray,
    foreground: np.ndarray,
    foreground_clicks: list[Click],
    background_clicks: list[Click],
    *,
    max_radius: int = 40,
) -> np.ndarray:
    """Instance mask with one id per distinct clicked nucleus (in click order); 0 elsewhere.

    Several clicks on one nucleus give one nucleus; a foreground click on a pixel that a background
    click excludes gives nothing.
    """
    out = np.zeros(labels.shape, dtype=np.int32)
    next_id = 1
    for click in foreground_clicks:
        x, y = click
        if 0 <= x < out.shape[1] and 0 <= y < out.shape[0] and out[y, x]:
            continue  # this nucleus is already in the answer
        region = nucleus_at(labels, foreground, click, background_clicks, max_radius=max_radius) & (out == 0)
        if region.any():
            out[region] = next_id
            next_id += 1
    return out

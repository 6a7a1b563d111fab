"""A rule-based shape classifier for the organisms' 32 x 32 scenes: template matching, no learning.

1. Foreground: the background is the median CIELAB colour of the border ring (as in
   `experiments.metrics.dominant_colour`); a pixel is foreground when its CIEDE2000 from it exceeds
   half that of the far end of the image (the FAR_QUANTILE quantile), and at least MIN_DELTA.
   The largest 4-connected foreground component is the object.
2. The object's bounding box is resampled to TEMPLATE x TEMPLATE (area average), and compared
   with each shape's canonical template (the shape drawn to fill its own bounding box) by soft
   IoU, sum(min) / sum(max).
3. Square and bar both fill their box; the bounding box's aspect ratio (long / short side) tells
   them apart: each shape's score is its IoU minus ASPECT_WEIGHT |log aspect - log expected|.

Validated on ground-truth scenes in tests/organisms/test_organisms.py (at least 95 % required).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from fluxjax.metrics import ciede2000, srgb_to_lab
from organisms.data import SHAPES, coverage

TEMPLATE = 16
FAR_QUANTILE = 0.98
MIN_DELTA = 10.0  # CIEDE2000; below this nothing stands out (the metrics' background_delta)
ASPECT_WEIGHT = 1.0
ELONGATED = 1.5  # boxes longer than wide by this much are turned on their side before matching
BAR_ASPECT = 1.0 / 0.35  # long / short side of a bar (organisms.data.inside)
_BOX = {"circle": 1.0, "square": 0.85, "triangle": 1.0, "cross": 1.0, "ring": 1.0, "bar": 1.0}  # half-extent, size 1


def _templates() -> dict[str, np.ndarray]:
    """Each shape drawn to fill its bounding box, [TEMPLATE, TEMPLATE] coverage in [0, 1]."""
    out = {}
    for shape in SHAPES:
        # draw at size TEMPLATE / (2 * half-extent) centred in a TEMPLATE-pixel box: the shape's box
        # then spans the template exactly along its long side; stretch the short side of a bar.
        half = _BOX[shape]
        size = TEMPLATE / (2 * half)
        cover = coverage(shape, (TEMPLATE / 2, TEMPLATE / 2), size, 0, side=TEMPLATE)
        if shape == "bar":
            cover = np.ones_like(cover)  # a bar fills its box; only the aspect ratio differs from square
        out[shape] = cover
    return out


TEMPLATES = _templates()
EXPECTED_ASPECT = {s: (BAR_ASPECT if s == "bar" else 1.0) for s in SHAPES}


def foreground(image: np.ndarray) -> np.ndarray:
    """bool [H, W]: the object's pixels (the largest connected foreground component)."""
    lab = srgb_to_lab(np.asarray(image))
    edge = np.ones(lab.shape[:2], bool)
    edge[1:-1, 1:-1] = False
    delta = ciede2000(lab, np.median(lab[edge], axis=0))
    far = np.quantile(delta, FAR_QUANTILE)
    if far < MIN_DELTA:
        return np.zeros(delta.shape, bool)
    return _largest_component(delta > max(MIN_DELTA, far / 2))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, current = 0, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        current += 1
        labels[start] = current
        queue, size = deque([start]), 0
        while queue:
            r, c = queue.popleft()
            size += 1
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not labels[rr, cc]:
                    labels[rr, cc] = current
                    queue.append((rr, cc))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros(mask.shape, bool)


def _resample(mask: np.ndarray, side: int) -> np.ndarray:
    """Area-average a [h, w] mask onto [side, side] (each output cell averages what it covers)."""
    h, w = mask.shape
    up = np.repeat(np.repeat(mask.astype(np.float64), side, axis=0), side, axis=1)  # [h side, w side]
    return up.reshape(side, h, side, w).mean(axis=(1, 3))


def shape_scores(image: np.ndarray) -> dict[str, float]:
    """Score of each shape (higher: more alike); all -inf when no object stands out."""
    mask = foreground(image)
    if mask.sum() < 4:
        return {s: -np.inf for s in SHAPES}
    rows, cols = np.nonzero(mask)
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = box.shape
    aspect = max(h, w) / min(h, w)
    if h > w * ELONGATED:
        box = box.T  # a vertical bar compares like a horizontal one
    cells = _resample(box, TEMPLATE)
    scores = {}
    for shape, template in TEMPLATES.items():
        iou = np.minimum(cells, template).sum() / np.maximum(cells, template).sum()
        scores[shape] = float(iou - ASPECT_WEIGHT * abs(np.log(aspect) - np.log(EXPECTED_ASPECT[shape])))
    return scores


def classify(image: np.ndarray) -> str | None:
    """The shape of a uint8 [H, W, 3] scene, or None when no object stands out."""
    scores = shape_scores(image)
    best = max(scores, key=scores.get)
    return None if scores[best] == -np.inf else best

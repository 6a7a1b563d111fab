"""Automatic metrics: colour transfer in CIELAB, change against a baseline edit, pass rates.

The study scored its results with a VLM judge only; these metrics are this project's addition.

Images are uint8 RGB arrays [H, W, 3] or PIL images, read as sRGB. Colours are compared in CIELAB
(D65) with CIEDE2000, the CIE's colour difference formula (about 1 = a just noticeable difference).

- `dominant_colour(image)`: the colour of what stands out from the background. The background is
  the median colour of a thin ring of border pixels; the foreground is every pixel more than
  `background_delta` CIEDE2000 away from it. The dominant colour is the mode of the foreground in
  the (a*, b*) chroma plane (a histogram with `bin_size` bins, smoothed over 3 x 3 bins, so shading
  of one hue counts as one colour), summarised as the per-channel median (L*, a*, b*) of the
  foreground pixels within the winning 3 x 3 bins. No clustering, nothing random. When almost
  nothing stands out from the border (a flat or full-bleed image), the whole image is the region.
- `colour_error(output, reference)`: CIEDE2000 between the output's dominant colour and the
  reference's colour; an edit takes the colour when it is at most `COLOUR_MATCH_DE00`.
- `foreground_share(image)`: the share of pixels that stand out from the border (no object: about 0).
- `mean_abs_diff`, `ssim`: change of an intervened edit against the baseline edit.
- `pass_rates`: the share of passes per setting, written as CSV, each with its 95 % interval
  (`percent`, `rate_text`, `pass_rate_text`: the one way reports write them):
  `wilson_interval` for a proportion, `paired_difference_interval` for the difference between two
  proportions measured on the same tasks (a rate against its control; Bonett and Price's adjusted
  Wald interval).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fluxjax.files import atomic_write_text

# The study's colour bucket (8 flat references, paper protocol): these RGB values, by name.
STUDY_COLOURS: Mapping[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (230, 120, 40),
    "yellow": (240, 210, 60),
    "green": (50, 170, 80),
    "blue": (40, 90, 220),
    "purple": (140, 60, 180),
    "pink": (230, 120, 170),
    "brown": (120, 75, 45),
}

# An edit "has" a colour when its dominant colour is within this CIEDE2000 of it. 15 stays under
# the closest pair of the colour bucket's colours (blue/purple, 18.8; red/orange 21.6; checked in
# tests/experiments/test_experiment_infra.py), and leaves room for the shading of a drawn object.
COLOUR_MATCH_DE00 = 15.0

# D65 reference white (CIE 1931 2-degree observer), XYZ scaled to Y = 1.
D65_WHITE = np.array([0.95047, 1.0, 1.08883])
# Linear sRGB -> XYZ (D65), IEC 61966-2-1 primaries as tabulated by Lindbloom; its rows sum to
# D65_WHITE, so sRGB white maps to L* = 100, a* = b* = 0.
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_DELTA = 6.0 / 29.0  # CIELAB's linear-segment threshold on f(t)


def as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image (any mode) or a uint8 array [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise TypeError(f"expected a uint8 RGB image [H, W, 3], got {array.dtype} {array.shape}; "
                        "convert model outputs to uint8 before measuring")
    return array


# ---------------------------------------------------------------------------------------------
# colour spaces


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB values in [0, 255] (any leading shape, last axis 3) to CIELAB (D65), float64."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / D65_WHITE
    f = np.where(xyz > _DELTA**3, np.cbrt(xyz), xyz / (3 * _DELTA**2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0,
                     500.0 * (f[..., 0] - f[..., 1]),
                     200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65) to sRGB in [0, 255] as float64, clipped to the gamut."""
    lab = np.asarray(lab, np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    xyz = np.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4.0 / 29.0)) * D65_WHITE
    linear = np.clip(xyz @ _XYZ_TO_RGB.T, 0.0, 1.0)
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return c * 255.0


def ciede2000(lab1: np.ndarray, lab2: np.ndarray, kL: float = 1.0, kC: float = 1.0,
              kH: float = 1.0) -> np.ndarray:
    """CIEDE2000 colour difference, broadcast over leading axes (last axis: L*, a*, b*).

    Follows Sharma, Wu and Dalal (2005), "The CIEDE2000 color-difference formula: implementation
    notes, supplementary test data, and mathematical observations", eqs. (1)-(22), including their
    conventions for hue when a chroma is zero and for the mean hue across the 0/360 seam.
    """
    lab1, lab2 = np.asarray(lab1, np.float64), np.asarray(lab2, np.float64)
    L1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    L2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]

    c_bar7 = ((np.hypot(a1, b1) + np.hypot(a2, b2)) / 2.0) ** 7
    g = 0.5 * (1.0 - np.sqrt(c_bar7 / (c_bar7 + 25.0**7)))
    a1p, a2p = (1.0 + g) * a1, (1.0 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360.0  # arctan2(0, 0) = 0: the paper's h' = 0 case
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360.0

    chroma_zero = c1p * c2p == 0.0
    dhp = h2p - h1p
    dhp = np.where(dhp > 180.0, dhp - 360.0, np.where(dhp < -180.0, dhp + 360.0, dhp))
    dhp = np.where(chroma_zero, 0.0, dhp)
    dLp, dCp = L2 - L1, c2p - c1p
    dHp = 2.0 * np.sqrt(c1p * c2p) * np.sin(np.radians(dhp) / 2.0)

    Lp_bar, Cp_bar = (L1 + L2) / 2.0, (c1p + c2p) / 2.0
    h_sum = h1p + h2p
    hp_bar = np.where(np.abs(h1p - h2p) <= 180.0, h_sum / 2.0,
                      np.where(h_sum < 360.0, (h_sum + 360.0) / 2.0, (h_sum - 360.0) / 2.0))
    hp_bar = np.where(chroma_zero, h_sum, hp_bar)

    t = (1.0 - 0.17 * np.cos(np.radians(hp_bar - 30.0)) + 0.24 * np.cos(np.radians(2.0 * hp_bar))
         + 0.32 * np.cos(np.radians(3.0 * hp_bar + 6.0)) - 0.20 * np.cos(np.radians(4.0 * hp_bar - 63.0)))
    d_theta = 30.0 * np.exp(-(((hp_bar - 275.0) / 25.0) ** 2))
    cp_bar7 = Cp_bar**7
    r_c = 2.0 * np.sqrt(cp_bar7 / (cp_bar7 + 25.0**7))
    s_l = 1.0 + 0.015 * (Lp_bar - 50.0) ** 2 / np.sqrt(20.0 + (Lp_bar - 50.0) ** 2)
    s_c = 1.0 + 0.045 * Cp_bar
    s_h = 1.0 + 0.015 * Cp_bar * t
    r_t = -np.sin(np.radians(2.0 * d_theta)) * r_c

    l_term, c_term, h_term = dLp / (kL * s_l), dCp / (kC * s_c), dHp / (kH * s_h)
    return np.sqrt(l_term**2 + c_term**2 + h_term**2 + r_t * c_term * h_term)


# ---------------------------------------------------------------------------------------------
# colour transfer


@dataclasses.dataclass(frozen=True)
class DominantColour:
    lab: tuple[float, float, float]  # CIELAB (D65)
    rgb: tuple[int, int, int]  # the same colour in sRGB, for display
    foreground: float  # share of the image that stands out from the border (1.0: whole image used)
    support: float  # share of the region's pixels that back the dominant colour


def _shrink(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w, _ = rgb.shape
    if max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def dominant_colour(image: Image.Image | np.ndarray, *, exclude_background: bool = True,
                    background_delta: float = 10.0, bin_size: float = 6.0, border: float = 0.03,
                    min_foreground: float = 0.005, max_side: int = 256) -> DominantColour:
    """The dominant colour of what stands out from the border (see the module docstring).

    exclude_background: False measures the whole image (e.g. a flat reference).
    background_delta: CIEDE2000 from the border colour beyond which a pixel is foreground.
    bin_size: width in a*/b* units of the chroma histogram's bins.
    border: width of the border ring as a share of the shorter side (at least one pixel).
    min_foreground: below this share of foreground pixels the whole image is measured.
    max_side: larger images are box-downsampled to this longest side first (speed only).
    """
    rgb = _shrink(as_rgb_array(image), max_side)
    lab = srgb_to_lab(rgb).reshape(-1, 3)
    region, foreground = lab, 1.0
    if exclude_background:
        mask = _foreground_mask(lab, rgb.shape[:2], background_delta, border)
        if mask.mean() >= min_foreground:
            region, foreground = lab[mask], float(mask.mean())

    nbins = int(math.ceil(256.0 / bin_size))
    idx = np.clip(((region[:, 1:] + 128.0) / bin_size).astype(int), 0, nbins - 1)
    hist = np.zeros((nbins + 2, nbins + 2))
    np.add.at(hist, (idx[:, 0] + 1, idx[:, 1] + 1), 1.0)
    smooth = sum(hist[1 + da:nbins + 1 + da, 1 + db:nbins + 1 + db] for da in (-1, 0, 1) for db in (-1, 0, 1))
    ia, ib = np.unravel_index(np.argmax(smooth), smooth.shape)
    near = (np.abs(idx[:, 0] - ia) <= 1) & (np.abs(idx[:, 1] - ib) <= 1)
    colour = np.median(region[near], axis=0)
    rgb_out = tuple(int(v) for v in np.clip(np.round(lab_to_srgb(colour)), 0, 255))
    return DominantColour(lab=tuple(float(v) for v in colour), rgb=rgb_out, foreground=foreground,
                          support=float(near.mean()))


def _foreground_mask(lab: np.ndarray, shape: tuple[int, int], background_delta: float, border: float) -> np.ndarray:
    """bool [H * W]: the pixels (CIELAB [H * W, 3]) more than `background_delta` CIEDE2000 from the
    median colour of a border ring `border` of the shorter side wide (at least one pixel)."""
    h, w = shape
    ring = max(1, round(border * min(h, w)))
    edge = np.ones((h, w), bool)
    edge[ring:h - ring, ring:w - ring] = False
    background = np.median(lab[edge.ravel()], axis=0)
    return ciede2000(lab, background) > background_delta


def foreground_mask(image: Image.Image | np.ndarray, *, background_delta: float = 10.0,
                    border: float = 0.03) -> np.ndarray:
    """bool [H, W]: the pixels that stand out from the image's border colour (as `dominant_colour`
    sees the foreground, at full size): more than `background_delta` CIEDE2000 from the median
    colour of a border ring `border` of the shorter side wide."""
    rgb = as_rgb_array(image)
    return _foreground_mask(srgb_to_lab(rgb).reshape(-1, 3), rgb.shape[:2], background_delta,
                            border).reshape(rgb.shape[:2])


def foreground_share(image: Image.Image | np.ndarray, *, background_delta: float = 10.0, border: float = 0.03,
                     max_side: int = 256) -> float:
    """The share of the image that stands out from its border colour, as `dominant_colour` sees it:
    about 0 for a flat or full-bleed image, where no object is drawn."""
    rgb = _shrink(as_rgb_array(image), max_side)
    return float(_foreground_mask(srgb_to_lab(rgb).reshape(-1, 3), rgb.shape[:2], background_delta, border).mean())


def reference_colour(reference: Image.Image | np.ndarray) -> tuple[float, float, float]:
    """The colour of a (flat) colour reference: its dominant colour over the whole image."""
    return dominant_colour(reference, exclude_background=False).lab


def colour_error(output: Image.Image | np.ndarray, colour_lab: Sequence[float]) -> float:
    """CIEDE2000 between the output's dominant colour and a colour given in CIELAB."""
    return float(ciede2000(np.asarray(dominant_colour(output).lab), np.asarray(colour_lab, np.float64)))


def closer_to_source(output: Image.Image | np.ndarray, source_lab: Sequence[float],
                     target_lab: Sequence[float]) -> tuple[bool, float, float]:
    """I2I -> I2I transfer: is the output's colour closer to the source's colour than the target's?

    Returns (closer, CIEDE2000 to the source colour, CIEDE2000 to the target colour).
    """
    d_source, d_target = colour_error(output, source_lab), colour_error(output, target_lab)
    return d_source < d_target, d_source, d_target


def nearest_colour(lab: Sequence[float], palette: Mapping[str, Sequence[int]]) -> tuple[str, float]:
    """The name of the palette colour (sRGB values) closest to `lab` in CIEDE2000, and that distance."""
    if not palette:
        raise ValueError("the palette is empty")
    names = list(palette)
    distances = ciede2000(np.asarray(lab, np.float64), srgb_to_lab(np.asarray([palette[n] for n in names])))
    i = int(np.argmin(distances))
    return names[i], float(distances[i])


# ---------------------------------------------------------------------------------------------
# change against a baseline


def _same_shape(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_rgb_array(a), as_rgb_array(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} vs {b.shape}; compare edits of the same size")
    return a.astype(np.float64), b.astype(np.float64)


def mean_abs_diff(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Mean absolute difference over pixels and channels, on the 0-255 scale."""
    a, b = _same_shape(a, b)
    return float(np.mean(np.abs(a - b)))


SSIM_WINDOW = 11  # Wang et al. (2004): 11 x 11 circular-symmetric Gaussian window, sigma 1.5
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_RANGE = 255.0


def _gaussian_window() -> np.ndarray:
    x = np.arange(SSIM_WINDOW) - (SSIM_WINDOW - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * SSIM_SIGMA**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable Gaussian filtering of [H, W, C] over H and W, keeping only full windows ('valid')."""
    n = len(g)
    rows = sum(g[k] * x[k:x.shape[0] - n + 1 + k] for k in range(n))
    return sum(g[k] * rows[:, k:x.shape[1] - n + 1 + k] for k in range(n))


def ssim_map(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> np.ndarray:
    """Local SSIM [H - 10, W - 10, 3] per channel (Wang, Bovik, Sheikh, Simoncelli 2004, eq. 13).

    Statistics are Gaussian-weighted over each full 11 x 11 window (no padding), as in the
    authors' reference implementation; C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2.
    """
    a, b = _same_shape(a, b)
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {a.shape[:2]}")
    g = _gaussian_window()
    c1, c2 = (SSIM_K1 * SSIM_RANGE) ** 2, (SSIM_K2 * SSIM_RANGE) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Mean SSIM over the full windows and the three RGB channels (1.0 for identical images)."""
    return float(np.mean(ssim_map(a, b)))


# ---------------------------------------------------------------------------------------------
# pass rates


Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: two-sided 95 % intervals


def wilson_interval(passed: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval (95 % by default) of a proportion passed / n; None when n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 / n or n / n
    (0 / 8: [0, 0.32]), which is where small samples of pass rates live.
    """
    if n <= 0:
        return None
    if not 0 <= passed <= n:
        raise ValueError(f"{passed} passes of {n}: passes must lie in 0..n")
    p, z2 = passed / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at 0 / n and n / n the bound is exactly 0 or 1; rounding must not move it off
    return (0.0 if passed == 0 else max(0.0, centre - half), 1.0 if passed == n else min(1.0, centre + half))


def paired_difference_interval(pairs: Sequence[tuple[bool, bool]], z: float = Z95) -> tuple[float, float, float] | None:
    """(difference, low, high): the difference p1 - p2 of two proportions measured on the same n
    tasks, from pairs (first passes, second passes), with the adjusted Wald interval for paired
    data of Bonett and Price (2012, Journal of Educational and Behavioral Statistics 37: 479-488):
    one pseudo-observation added to each kind of discordant pair. It keeps close to 95 % coverage
    at small n and, unlike the hybrid score interval, is never empty when no pair disagrees. The
    difference is the observed one, (b - c) / n. None when n = 0.
    """
    n = len(pairs)
    if n == 0:
        return None
    b = sum(1 for x, y in pairs if x and not y)  # first passes, second fails
    c = sum(1 for x, y in pairs if not x and y)
    first, second = (b + 1) / (n + 2), (c + 1) / (n + 2)
    centre = first - second
    half = z * math.sqrt((first + second - centre * centre) / (n + 2))
    return (b - c) / n, max(-1.0, centre - half), min(1.0, centre + half)


def percent(value: float | None) -> str:
    """A share as every report writes it: '86 %', '12.5 %', '0.4 %' (the study's way), 'n/a' for none."""
    if value is None or value == "":
        return "n/a"
    text = f"{100 * float(value):.1f}"
    return f"{text[:-2] if text.endswith('.0') else text} %"


def rate_text(rate: float | None, low: float | None, high: float | None) -> str:
    """'62.5 % [30.6 %, 86.3 %]': a rate and its 95 % interval in the reports' one format
    (`percent`; '' where there is no rate)."""
    if rate is None:
        return ""
    return f"{percent(rate)} [{percent(low)}, {percent(high)}]"


def pass_rate_text(passed: int, n: int) -> str:
    """'5/8 = 62.5 % [30.6 %, 86.3 %]': passes of n, the rate and its 95 % Wilson interval ('0/0 = n/a')."""
    interval = wilson_interval(passed, n)
    if interval is None:
        return f"{passed}/{n} = n/a"
    return f"{passed}/{n} = {rate_text(passed / n, *interval)}"


def interval_fields(passed: int, n: int) -> dict:
    """{n, passed, rate, low, high}: a pass rate with its 95 % Wilson interval, as the pass-rate
    files write it (rate, low and high None where n = 0)."""
    interval = wilson_interval(passed, n)
    return {"n": n, "passed": passed, "rate": passed / n if n else None,
            "low": None if interval is None else interval[0], "high": None if interval is None else interval[1]}


@dataclasses.dataclass(frozen=True)
class PassRate:
    setting: str
    criterion: str  # what a pass means, e.g. "colour lost: CIEDE2000 to the reference > 15"
    threshold: float | None
    n: int
    passed: int

    @property
    def rate(self) -> float:
        return self.passed / self.n if self.n else float("nan")

    @property
    def low(self) -> float | None:
        """The lower end of the rate's 95 % Wilson interval (None for n = 0)."""
        interval = wilson_interval(self.passed, self.n)
        return None if interval is None else interval[0]

    @property
    def high(self) -> float | None:
        interval = wilson_interval(self.passed, self.n)
        return None if interval is None else interval[1]

    @property
    def text(self) -> str:
        """'5/8 = 62.5 % [30.6 %, 86.3 %]' (`pass_rate_text`)."""
        return pass_rate_text(self.passed, self.n)


def pass_rates(records: Iterable[Mapping], *, criterion: str, threshold: float | None,
               setting_key: str = "setting", pass_key: str = "pass") -> list[PassRate]:
    """Passes per setting, settings in order of first appearance; `pass_key` must hold a bool."""
    counts: dict[str, list[int]] = {}
    for r in records:
        verdict = r[pass_key]
        if not isinstance(verdict, (bool, np.bool_)):
            raise TypeError(f"record {dict(r)!r}: {pass_key!r} must be a bool, got {verdict!r}")
        n_pass = counts.setdefault(str(r[setting_key]), [0, 0])
        n_pass[0] += 1
        n_pass[1] += int(bool(verdict))
    return [PassRate(setting=s, criterion=criterion, threshold=threshold, n=n, passed=p)
            for s, (n, p) in counts.items()]


def rows_to_csv(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """CSV text of dict rows; columns default to the keys in first-seen order; floats to 4 decimals."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else f"{r[c]:.4f}" if isinstance(r[c], float) else r[c]
                         for c in columns])
    return buf.getvalue()


# low, high: the rate's 95 % Wilson interval
PASS_RATE_COLUMNS = ("setting", "criterion", "threshold", "n", "passed", "rate", "low", "high")


def pass_rates_csv(rates: Sequence[PassRate]) -> str:
    return rows_to_csv([{c: getattr(p, c) for c in PASS_RATE_COLUMNS} for p in rates], PASS_RATE_COLUMNS)


def write_pass_rates_csv(path: str | os.PathLike, rates: Sequence[PassRate]) -> Path:
    return atomic_write_text(path, pass_rates_csv(rates))

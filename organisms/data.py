"""Synthetic editing tasks for the model organisms: 32 x 32 RGB scenes of one shape on a light
background, drawn with numpy, deterministic from integer seeds.

Three tasks, as instructions and (reference, target) pairs:

    t2i       `a {colour} {shape}`            no reference; a named colour, jittered
                                              (with probability P_EMPTY the empty prompt "":
                                              any scene, the unconditional case the T2I Lens needs)
    swatch    `draw a {shape} in this color`  the reference is a flat swatch of one colour; the
                                              target is the shape in exactly that colour
    recolour  `make it {colour}`              the reference is a scene; the target is the same
                                              scene (shape, place, size, background) in a named colour

Colours: the study's eight (`experiments.tasks.COLOURS`) plus a few more named ones, each jittered
by up to COLOUR_JITTER per channel when drawn; half of the swatches are unnamed random colours, so
copying the swatch cannot be done by naming it. Every object colour stands out from its background
by at least MIN_CONTRAST CIEDE2000.

Seeds. Every example comes from its own numpy Generator, seeded with a SeedSequence entropy list
whose first entry names the split: training examples are `(TRAIN, run seed, step, index, kind)`,
held-out examples `(HELD_OUT, kind, index)` (kind: its index in KINDS). The two splits draw from
different seed sequences, so no held-out example is a training example. The training noise (eps
and t of the flow-matching loss) is the stream `(TRAIN_NOISE, run seed, step)`. So a training
batch is a pure function of (run seed, step): the step number is the whole state of the data
stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from fluxjax.metrics import STUDY_COLOURS, ciede2000, srgb_to_lab

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # anti-aliasing: coverage of each pixel from 4 x 4 sub-pixel samples
SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
KINDS = ("t2i", "swatch", "recolour")

COLOURS: Mapping[str, tuple[int, int, int]] = {
    **STUDY_COLOURS,
    "cyan": (40, 190, 200),
    "black": (35, 35, 35),
}
COLOUR_JITTER = 12  # +- per RGB channel
MIN_CONTRAST = 25.0  # CIEDE2000 between an object's colour and its background
MIN_UNNAMED_CONTRAST = 30.0  # CIEDE2000 between an unnamed colour and white (the named ones reach 29)
MIN_RECOLOUR_CHANGE = 20.0  # CIEDE2000 between a recolour edit's old and new colour
P_EMPTY = 0.1  # share of text-to-image examples with the empty prompt
P_NAMED_SWATCH = 0.5  # share of swatches drawn from the named colours (the rest: random colours)



@dataclasses.dataclass(frozen=True)
class SceneDesign:
    """Where shapes sit and how big they are.

    Centred shapes are a choice for the one-hour training budget: in short trainings
    (organisms.design_sweep, docs/organisms.md) shapes placed anywhere were drawn right in under
    30 % of samples after 1,000 steps, centred ones in 75 %; the scenes still vary in size,
    orientation, colour and background.
    """

    size_range: tuple[float, float] = (8.0, 11.0)  # half-extent of a shape in pixels
    centre_jitter: float | None = 0.0  # most a centre strays from the image centre, per axis (None: anywhere)


DESIGN = SceneDesign()  # the organisms' scenes
MARGIN = 2.0  # pixels kept free along the border (the metrics read the background there)

INSTRUCTIONS = {
    "t2i": "a {colour} {shape}",
    "swatch": "draw a {shape} in this color",
    "recolour": "make it {colour}",
}

TRAIN, HELD_OUT, TRAIN_NOISE = 0, 1, 2  # first SeedSequence entry of each stream
_KIND_DRAW = 100  # last entry of the seed that picks a training slot's edit task (not a KINDS index)


@dataclasses.dataclass(frozen=True)
class Scene:
    """One shape on a flat background; `render` draws it."""

    shape: str
    centre: tuple[float, float]  # (x, y) in pixels, x to the right, y down
    size: float  # half-extent in pixels
    orientation: int  # bar only: 0 horizontal, 1 vertical
    colour: tuple[int, int, int]
    background: tuple[int, int, int]

    def render(self) -> np.ndarray:
        """uint8 [SIZE, SIZE, 3]."""
        alpha = coverage(self.shape, self.centre, self.size, self.orientation)[..., None]
        image = (1.0 - alpha) * np.asarray(self.background, np.float64) + alpha * np.asarray(self.colour, np.float64)
        return np.clip(np.round(image), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Example:
    """One task. `reference` is None for text-to-image; `colour` is the target object's colour."""

    kind: str
    instruction: str
    target: np.ndarray  # uint8 [SIZE, SIZE, 3]
    reference: np.ndarray | None  # uint8 [SIZE, SIZE, 3]
    shape: str
    colour: tuple[int, int, int]
    colour_name: str | None  # the named colour asked for, None for an unnamed swatch or "" prompt
    reference_colour: tuple[int, int, int] | None  # swatch colour, or the reference scene's object colour


def inside(shape: str, x: np.ndarray, y: np.ndarray, centre, size: float, orientation: int = 0) -> np.ndarray:
    """Boolean mask of the points (x, y) inside `shape` (see the geometry per shape below)."""
    cx, cy = centre
    dx, dy = x - cx, y - cy
    s = size
    if shape == "circle":
        return dx**2 + dy**2 <= s**2
    if shape == "square":  # 0.85 s: about a circle's visual weight
        return (np.abs(dx) <= 0.85 * s) & (np.abs(dy) <= 0.85 * s)
    if shape == "triangle":  # apex up at (cx, cy - s), base from (cx - s, cy + s) to (cx + s, cy + s)
        return (dy <= s) & (np.abs(dx) <= (dy + s) / 2)
    if shape == "cross":  # a plus sign, arms 0.7 s thick
        arm = 0.35 * s
        return ((np.abs(dx) <= s) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= s) & (np.abs(dx) <= arm))
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= s**2) & (d2 >= (0.55 * s) ** 2)
    if shape == "bar":  # 2s x 0.7s, horizontal or vertical
        long, short = (np.abs(dx), np.abs(dy)) if orientation == 0 else (np.abs(dy), np.abs(dx))
        return (long <= s) & (short <= 0.35 * s)
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def coverage(shape: str, centre, size: float, orientation: int = 0, side: int = SIZE) -> np.ndarray:
    """float [side, side] in [0, 1]: the share of each pixel inside the shape (pixel (i, j) spans
    [j, j + 1) x [i, i + 1))."""
    n = side * SUPERSAMPLE
    sub = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(sub, sub)
    mask = inside(shape, x, y, centre, size, orientation)
    return mask.reshape(side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(1, 3))


def _contrast(a, b) -> float:
    return float(ciede2000(srgb_to_lab(np.asarray(a, np.float64)), srgb_to_lab(np.asarray(b, np.float64))))


def _jitter(rng: np.random.Generator, rgb) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, nearly grey background: a level in [215, 250], each channel +- 8."""
    level = rng.integers(215, 251)
    return tuple(int(v) for v in np.clip(level + rng.integers(-8, 9, 3), 0, 255))


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """An unnamed colour: uniform hue, saturation 0.45-1, value 0.35-0.95 (HSV)."""
    h, s, v = rng.uniform(0, 6), rng.uniform(0.45, 1.0), rng.uniform(0.35, 0.95)
    i, f = int(h) % 6, h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return tuple(int(round(255 * c)) for c in rgb)


def _named_colour(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> tuple[str, tuple[int, int, int]]:
    names = [n for n in COLOURS if n not in exclude]
    name = names[rng.integers(len(names))]
    return name, _jitter(rng, COLOURS[name])


def _scene(rng: np.random.Generator, shape: str, colour, design: SceneDesign, background=None) -> Scene:
    """A scene of `shape` in `colour`: random size, place (within `design`) and (bar) orientation;
    the background is redrawn until the colour stands out from it."""
    size = rng.uniform(*design.size_range)
    lo, hi = MARGIN + size, SIZE - MARGIN - size
    if design.centre_jitter is not None:
        lo, hi = max(lo, SIZE / 2 - design.centre_jitter), min(hi, SIZE / 2 + design.centre_jitter)
    centre = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    orientation = int(rng.integers(2))
    for _ in range(1000):
        if background is not None and _contrast(colour, background) >= MIN_CONTRAST:
            break
        background = _background(rng)
    else:
        raise ValueError(f"no light background sets off the colour {colour}")
    return Scene(shape, centre, float(size), orientation, tuple(colour), tuple(background))


def _unnamed_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random colour that a light background can set off (CIEDE2000 >= MIN_UNNAMED_CONTRAST from white)."""
    while True:
        colour = _random_colour(rng)
        if _contrast(colour, (255, 255, 255)) >= MIN_UNNAMED_CONTRAST:
            return colour


def make_example(rng: np.random.Generator, kind: str, design: SceneDesign = DESIGN) -> Example:
    """One example of task `kind` drawn from `rng`."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    if kind == "t2i":
        name, colour = _named_colour(rng)
        scene = _scene(rng, shape, colour, design)
        if rng.uniform() < P_EMPTY:
            return Example(kind, "", scene.render(), None, shape, scene.colour, None, None)
        instruction = INSTRUCTIONS[kind].format(colour=name, shape=shape)
        return Example(kind, instruction, scene.render(), None, shape, scene.colour, name, None)
    if kind == "swatch":
        if rng.uniform() < P_NAMED_SWATCH:
            name, colour = _named_colour(rng)
        else:
            name, colour = None, _unnamed_colour(rng)
        scene = _scene(rng, shape, colour, design)
        swatch = np.broadcast_to(np.asarray(colour, np.uint8), (SIZE, SIZE, 3)).copy()
        instruction = INSTRUCTIONS[kind].format(shape=shape)
        return Example(kind, instruction, scene.render(), swatch, shape, scene.colour, name, scene.colour)
    if kind == "recolour":
        old = _unnamed_colour(rng)
        source = _scene(rng, shape, old, design)
        while True:
            name, new = _named_colour(rng)
            if _contrast(new, old) >= MIN_RECOLOUR_CHANGE and _contrast(new, source.background) >= MIN_CONTRAST:
                break
        target = dataclasses.replace(source, colour=new)
        instruction = INSTRUCTIONS[kind].format(colour=name)
        return Example(kind, instruction, target.render(), source.render(), shape, new, name, source.colour)
    raise ValueError(f"unknown task kind {kind!r}; use one of {KINDS}")


def train_example(seed: int, step: int, index: int, kind: str, design: SceneDesign = DESIGN) -> Example:
    """Example `index` of training step `step` of the run seeded `seed`."""
    return make_example(np.random.default_rng([TRAIN, seed, step, index, KINDS.index(kind)]), kind, design)


def heldout_example(kind: str, index: int, design: SceneDesign = DESIGN) -> Example:
    """Held-out example `index` of task `kind`: never drawn by training (a different seed sequence)."""
    return make_example(np.random.default_rng([HELD_OUT, KINDS.index(kind), index]), kind, design)


def heldout_examples(kind: str, n: int, start: int = 0, design: SceneDesign = DESIGN) -> list[Example]:
    return [heldout_example(kind, i, design) for i in range(start, start + n)]


def train_noise(seed: int, step: int, shapes) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The flow-matching noise of training step `step`: for each token shape [B, N, C], eps ~ N(0, 1)
    (float32 [B, N, C]) and t ~ logit-normal (float32 [B], t = sigmoid(u), u ~ N(0, 1))."""
    rng = np.random.default_rng([TRAIN_NOISE, seed, step])
    eps = [rng.standard_normal(shape, np.float32) for shape in shapes]
    ts = [(1.0 / (1.0 + np.exp(-rng.standard_normal(shape[0])))).astype(np.float32) for shape in shapes]
    return eps, ts


def edit_kind(seed: int, step: int, index: int, p_swatch: float) -> str:
    """Which edit task slot `index` of a training step holds: swatch with probability p_swatch."""
    u = np.random.default_rng([TRAIN, seed, step, index, _KIND_DRAW]).uniform()
    return "swatch" if u < p_swatch else "recolour"

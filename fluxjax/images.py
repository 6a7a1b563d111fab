"""Reference images to tokens, preprocessed as the diffusers FLUX.2 pipelines do.

Preprocessing follows the diffusers FLUX.2 pipelines (`Flux2Pipeline`, `Flux2KleinPipeline`;
spec section 8.3), in their order:

    1. check: both sides >= 64 px, aspect ratio <= 8   (`Flux2ImageProcessor.check_image_input`)
    2. if the area exceeds 1024 x 1024: Lanczos resize to that area, int() of the scaled sides
    3. floor both sides to multiples of 16 by a centre crop (`Flux2ImageProcessor._resize_and_crop`)
    4. convert to RGB (after the crop, as `VaeImageProcessor.preprocess` does), scale to [-1, 1]

(BFL's own code caps a single reference at 2024^2 px instead; this module follows diffusers.)

Image modes (`to_rgb`). diffusers converts every reference with PIL's `image.convert("RGB")`, and so
does this module for every mode where that is right: RGB, L, 1, CMYK, YCbCr, P (the palette's
colours), and the alpha modes RGBA, LA, PA, whose alpha channel is dropped, keeping the colours the
file stores (diffusers' choice: no compositing onto a background). Where PIL's conversion is wrong,
this module differs from diffusers: 16-bit greyscale (I;16, I;16B, I;16L, and I, PIL's mode for
16-bit PNG greyscale) is scaled to 8 bits (round(v / 257)) before anything else, where PIL clips it
at 255 and a mid grey (20000) becomes white. F (float) keeps PIL's convention, 0..255 (as
diffusers). PIL opens a 16-bit RGB PNG as 8-bit RGB (its high bytes) by itself.

Pixels are channels-last, [H, W, 3], like every image and latent in fluxjax (`fluxjax.vae`
defines the latent layouts: grid, patchified, packed tokens). The VAE is a function argument:
`encode(pixels)` maps [1, H, W, 3] float32 in [-1, 1] to the bn-normalised, patchified latent
[1, H/16, W/16, P] (`fluxjax.vae.encode_to_grid`: diffusers' `_encode_vae_image`, channels-last).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image

from fluxjax.layout import TokenLayout
from fluxjax.vae import pack

MIN_SIDE = 64
MAX_ASPECT_RATIO = 8
MAX_AREA = 1024 * 1024
MULTIPLE_OF = 16  # VAE downsampling 8 x patch 2


# PIL errors of a file that is not a readable image: truncated or corrupt data, a format it cannot
# decode, or a picture too large to decode safely.
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, struct.error, PIL.Image.DecompressionBombError)
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _name(source) -> str:
    return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "given as a PIL image"


def load_image(source) -> PIL.Image.Image:
    """A PIL image from a path or an already open image, its pixels read (so a truncated file fails
    here); a file that is missing or not a readable image raises one ValueError naming it."""
    if isinstance(source, PIL.Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a PIL image or a file path, got {type(source).__name__}")
    try:
        with PIL.Image.open(source) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise ValueError(f"reference image {_name(source)} does not exist") from None
    except (PIL.UnidentifiedImageError, *_UNREADABLE) as err:
        reason = "empty file" if os.path.isfile(source) and os.path.getsize(source) == 0 else str(err)
        raise ValueError(f"cannot read reference image {_name(source)} as an image ({reason})") from None


def to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit greyscale image as 8-bit greyscale (L): v becomes round(v / 257); any other mode
    unchanged (module docstring)."""
    if image.mode in SIXTEEN_BIT_GREY:
        values = np.asarray(image, dtype=np.float64)
        return PIL.Image.fromarray(np.round(np.clip(values, 0, 65535) / 257).astype(np.uint8), mode="L")
    return image


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode that holds a picture as 8-bit RGB (module docstring); ValueError for one that does not."""
    image = to_8bit(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the palette's colours; PIL warns when going to RGB directly
    try:
        return image.convert("RGB")
    except ValueError:
        pass
    try:
        return image.convert("RGBA").convert("RGB")
    except ValueError:
        raise ValueError(f"cannot convert an image of PIL mode {image.mode!r} to RGB") from None


def check_reference(image: PIL.Image.Image, name: str | None = None) -> None:
    """Raise ValueError unless both sides are >= 64 px and the aspect ratio is <= 8; `name` (the
    file) is named in the message."""
    width, height = image.size
    what = "reference image" + (f" {name}" if name else "")
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ValueError(f"{what} is {width}x{height}; both sides must be at least {MIN_SIDE} px")
    ratio = max(width / height, height / width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"{what} is {width}x{height} (aspect ratio {ratio:.1f}); "
                         f"the ratio must be at most {MAX_ASPECT_RATIO}")


def open_reference(source, *, min_side: int = MIN_SIDE) -> PIL.Image.Image:
    """A reference image (path or PIL), read and checked before any model work: readable, of a mode
    `to_rgb` converts, and (min_side > 0) the size the FLUX.2 pipelines accept (`check_reference`).
    Every failure is one ValueError naming the file."""
    image = load_image(source)
    try:
        to_rgb(image)
    except ValueError as err:
        raise ValueError(f"reference image {_name(source)}: {err}") from None
    if min_side > 0:
        check_reference(image, _name(source) if isinstance(source, (str, os.PathLike)) else None)
    return image


def cap_area(image: PIL.Image.Image, max_area: int = MAX_AREA) -> PIL.Image.Image:
    """Lanczos-resize to `max_area` pixels if larger (`Flux2ImageProcessor._resize_to_target_area`).

    Note that PIL resizes palette and 1-bit images with nearest neighbour whatever the filter; the
    reference resizes before converting to RGB, and so does this.
    """
    width, height = image.size
    if width * height <= max_area:
        return image
    scale = math.sqrt(max_area / (width * height))
    return image.resize((int(width * scale), int(height * scale)), PIL.Image.Resampling.LANCZOS)


def center_crop(image: PIL.Image.Image, multiple_of: int = MULTIPLE_OF) -> PIL.Image.Image:
    """Crop both sides down to multiples of `multiple_of`, keeping the centre."""
    width, height = image.size
    new_w, new_h = width // multiple_of * multiple_of, height // multiple_of * multiple_of
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return image.crop((left, top, left + new_w, top + new_h))


def preprocess_reference(image, max_area: int = MAX_AREA, multiple_of: int = MULTIPLE_OF) -> np.ndarray:
    """A reference image (path or PIL) -> float32 pixels [H, W, 3] in [-1, 1], H and W multiples of 16."""
    image = to_8bit(open_reference(image))
    image = to_rgb(center_crop(cap_area(image, max_area), multiple_of))
    return 2.0 * (np.asarray(image, dtype=np.float32) / 255.0) - 1.0


# references -------------------------------------------------------------------------------------


def reference_tokens(images: Sequence, encode: Callable, max_area: int = MAX_AREA,
                     multiple_of: int = MULTIPLE_OF) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
    """Reference images -> (tokens [1, N_ref, P], token grids), in the order given.

    Each image is preprocessed and encoded on its own (`encode`: module docstring), packed, and
    the references are concatenated along the sequence. Any number of references. Pass the grids
    to `TokenLayout(ref_grids=...)` for the position ids (reference r has T = 10 (r + 1)); repeat
    the tokens over the batch as needed (the sampler broadcasts a leading 1).
    """
    if isinstance(images, (str, os.PathLike, PIL.Image.Image)):
        images = [images]
    tokens, grids = [], []
    for image in images:
        pixels = preprocess_reference(image, max_area, multiple_of)
        latent = np.asarray(encode(pixels[None]))
        want = (pixels.shape[0] // multiple_of, pixels.shape[1] // multiple_of)
        if latent.ndim != 4 or latent.shape[0] != 1 or latent.shape[1:3] != want:
            raise ValueError(f"encode() must return a patchified latent [1, {want[0]}, {want[1]}, P] for "
                             f"{pixels.shape[0]}x{pixels.shape[1]} pixels, got shape {latent.shape}")
        tokens.append(pack(latent))
        grids.append(want)
    if not tokens:
        raise ValueError("no reference images given")
    return np.concatenate(tokens, axis=1), tuple(grids)


def reference_layout(n_txt: int, img_grid: tuple[int, int], ref_grids: Sequence[tuple[int, int]]) -> TokenLayout:
    """The layout of an edit: text, the noisy image's token grid, then the references."""
    return TokenLayout(n_txt=n_txt, img_grid=tuple(img_grid), ref_grids=tuple(tuple(g) for g in ref_grids))


def image_grid(height: int, width: int, multiple_of: int = MULTIPLE_OF) -> tuple[int, int]:
    """Token grid of an output image of height x width pixels (floored to multiples of 16, as diffusers)."""
    if height < multiple_of or width < multiple_of:
        raise ValueError(f"output size {height}x{width} is smaller than one {multiple_of} px token")
    return height // multiple_of, width // multiple_of

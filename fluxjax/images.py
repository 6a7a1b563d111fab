"""Reference images to tokens, preprocessed as the diffusers FLUX.2 pipelines do.

Preprocessing follows the diffusers FLUX.2 pipelines (`Flux2Pipeline`, `Flux2KleinPipeline`;
spec section 8.3), in their order:

    1. check: both sides >= 64 px, aspect ratio <= 8   (`Flux2ImageProcessor.check_image_input`)
    2. if the area exceeds 1024 x 1024: Lanczos resize to that area, int() of the scaled sides
    3. floor both sides to multiples of 16 by a centre crop (`Flux2ImageProcessor._resize_and_crop`)
    4. convert to RGB (after the crop, as `VaeImageProcessor.preprocess` does), scale to [-1, 1]

(BFL's own code caps a single reference at 2024^2 px instead; this module follows diffusers.)

Pixels are channels-last, [H, W, 3], like every image and latent in fluxjax (`fluxjax.vae`
defines the latent layouts: grid, patchified, packed tokens). The VAE is a function argument:
`encode(pixels)` maps [1, H, W, 3] float32 in [-1, 1] to the bn-normalised, patchified latent
[1, H/16, W/16, P] (`fluxjax.vae.encode_to_grid`: diffusers' `_encode_vae_image`, channels-last).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image

from fluxjax.layout import TokenLayout
from fluxjax.vae import pack

MIN_SIDE = 64
MAX_ASPECT_RATIO = 8
MAX_AREA = 1024 * 1024
MULTIPLE_OF = 16  # VAE downsampling 8 x patch 2


def load_image(source) -> PIL.Image.Image:
    """A PIL image from a path or an already open image; unreadable files raise ValueError."""
    if isinstance(source, PIL.Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a PIL image or a file path, got {type(source).__name__}")
    try:
        with PIL.Image.open(source) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise ValueError(f"reference image {os.fspath(source)!r} does not exist") from None
    except (PIL.UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read reference image {os.fspath(source)!r} as an image: {err}") from err


def check_reference(image: PIL.Image.Image) -> None:
    """Raise ValueError unless both sides are >= 64 px and the aspect ratio is <= 8."""
    width, height = image.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ValueError(f"reference image is {width}x{height}; both sides must be at least {MIN_SIDE} px")
    ratio = max(width / height, height / width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"reference image is {width}x{height} (aspect ratio {ratio:.1f}); "
                         f"the ratio must be at most {MAX_ASPECT_RATIO}")


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
    image = load_image(image)
    check_reference(image)
    image = center_crop(cap_area(image, max_area), multiple_of).convert("RGB")
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

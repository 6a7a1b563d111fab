"""The organisms' codec: it plays the VAE's part, fixed and exact, with no learning.

Pixels [H, W, 3] in [-1, 1] <-> tokens [(H/4)(W/4), 48] by 4 x 4 patchify. Tokens are row-major
over the patch grid (token index = row * cols + col, as `TokenLayout.img_ids` numbers them), and a
token's channels are (c ph pw), channel-major as FLUX.2 packs its latents' 2 x 2 patches. So a
32 x 32 image is 64 tokens of in_channels = 48.

uint8 <-> [-1, 1]: x / 127.5 - 1 and back with rounding; the round trip is exact.
"""

from __future__ import annotations

import numpy as np

PATCH = 4
CHANNELS = 3 * PATCH * PATCH  # in_channels of the organisms' transformer


def grid(height: int, width: int) -> tuple[int, int]:
    """The token grid (rows, cols) of an image of `height` x `width` pixels."""
    if height % PATCH or width % PATCH:
        raise ValueError(f"image sides must be multiples of {PATCH}, got {height} x {width}")
    return height // PATCH, width // PATCH


def to_unit(images) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 in [-1, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(pixels) -> np.ndarray:
    """float [..., H, W, 3] in [-1, 1] (clipped) -> uint8."""
    pixels = np.asarray(pixels, np.float32)
    return np.clip(np.round((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)


def encode(pixels):
    """[B, H, W, 3] -> tokens [B, (H/4)(W/4), 48]; works on numpy and jax arrays alike."""
    b, h, w, c = pixels.shape
    rows, cols = grid(h, w)
    x = pixels.reshape(b, rows, PATCH, cols, PATCH, c)  # b r ph q pw c
    x = x.transpose(0, 1, 3, 5, 2, 4)  # b r q c ph pw
    return x.reshape(b, rows * cols, c * PATCH * PATCH)


def decode(tokens, token_grid: tuple[int, int] = (8, 8)):
    """tokens [B, rows * cols, 48] -> pixels [B, rows * 4, cols * 4, 3]."""
    b, n, channels = tokens.shape
    rows, cols = token_grid
    if n != rows * cols or channels != CHANNELS:
        raise ValueError(f"tokens [B, {n}, {channels}] do not fit a {rows} x {cols} grid of {CHANNELS} channels")
    x = tokens.reshape(b, rows, cols, 3, PATCH, PATCH)  # b r q c ph pw
    x = x.transpose(0, 1, 4, 2, 5, 3)  # b r ph q pw c
    return x.reshape(b, rows * PATCH, cols * PATCH, 3)


def images_to_tokens(images) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 tokens."""
    return encode(to_unit(images))


def tokens_to_images(tokens, token_grid: tuple[int, int] = (8, 8)) -> np.ndarray:
    """tokens -> uint8 [B, H, W, 3]."""
    return to_uint8(decode(np.asarray(tokens, np.float32), token_grid))

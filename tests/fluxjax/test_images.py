"""Reference images to tokens: preprocessing vs diffusers' `Flux2ImageProcessor` as the FLUX.2
pipelines call it, latent layouts vs the pipelines' static helpers, and position ids."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from fluxjax import images


def synthetic(width, height, mode="RGB", seed=0):
    """A smooth gradient plus noise, so resampling and cropping errors show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * xx / width, 255 * yy / height, 128 + 60 * np.sin(xx / 7.0 + yy / 11.0)], -1)
    rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    image = PIL.Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = PIL.Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        image = image.copy()
        image.putalpha(alpha)
        return image
    if mode == "P":
        return image.quantize(colors=32)
    return image.convert(mode)


def pipeline_preprocess(image):
    """Exactly what `Flux2Pipeline` / `Flux2KleinPipeline.__call__` do to each reference image, channels-last."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    processor = Flux2ImageProcessor(vae_scale_factor=16)  # vae_scale_factor 8 x 2
    processor.check_image_input(image)
    width, height = image.size
    if width * height > 1024 * 1024:
        image = processor._resize_to_target_area(image, 1024 * 1024)
        width, height = image.size
    width, height = width // 16 * 16, height // 16 * 16
    return processor.preprocess(image, height=height, width=width, resize_mode="crop").numpy()[0].transpose(1, 2, 0)


CASES = ([(size, mode) for size in [(64, 64), (100, 130), (333, 77), (512, 64)]
          for mode in ["RGB", "L", "RGBA", "P", "LA", "CMYK"]]
         # above 1024^2 px: the Lanczos area cap (PIL resamples palette images with nearest neighbour)
         + [((1500, 900), "RGB"), ((1030, 1030), "RGB"), ((1500, 900), "P"), ((1100, 1000), "L")])


@pytest.mark.parity
@pytest.mark.parametrize("size,mode", CASES)
def test_preprocess_matches_pipeline(size, mode):
    image = synthetic(*size, mode=mode, seed=sum(size))
    want = pipeline_preprocess(image)
    got = images.preprocess_reference(image)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert got.shape[0] % 16 == 0 and got.shape[1] % 16 == 0 and got.shape[2] == 3
    np.testing.assert_array_equal(got, want)


def test_preprocess_from_file(tmp_path):
    image = synthetic(200, 150, seed=3)
    path = tmp_path / "ref.png"
    image.save(path)
    want = images.preprocess_reference(image)  # (which is the pipeline's: test_preprocess_matches_pipeline)
    np.testing.assert_array_equal(images.preprocess_reference(str(path)), want)
    np.testing.assert_array_equal(images.preprocess_reference(path), want)


def test_area_cap_keeps_aspect_and_bounds():
    out = images.preprocess_reference(synthetic(2048, 1024))
    assert out.shape[0] * out.shape[1] <= 1024 * 1024
    assert out.shape == (720, 1440, 3)  # int(2048 s) x int(1024 s) = 1448 x 724, cropped to multiples of 16
    assert out.min() >= -1 and out.max() <= 1


REFUSED = [((63, 200), "at least 64"), ((64, 40), "at least 64"), ((520, 64), "aspect ratio 8.1"),
           ((64, 600), "aspect ratio 9.4")]


@pytest.mark.parametrize("size,match", REFUSED)
def test_rejects_small_and_extreme_images(size, match):
    with pytest.raises(ValueError, match=match):
        images.preprocess_reference(synthetic(*size))


@pytest.mark.parity
@pytest.mark.parametrize("size", [size for size, _ in REFUSED])
def test_the_pipeline_refuses_the_same_images(size):
    with pytest.raises(ValueError):
        pipeline_preprocess(synthetic(*size))


def test_unreadable_files_raise_clearly(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read reference image"):
        images.preprocess_reference(bad)
    with pytest.raises(ValueError, match="does not exist"):
        images.preprocess_reference(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="PIL image or a file path"):
        images.preprocess_reference(np.zeros((64, 64, 3)))


@pytest.mark.parity
def test_reference_tokens_and_ids_match_pipeline():
    """Tokens of several references are packed and concatenated in order; their ids have
    T = 10, 20, 30 as in `_prepare_image_ids`, after the noisy image's (`_prepare_latent_ids`)."""
    import torch
    from diffusers import Flux2KleinPipeline as P

    refs = [synthetic(64, 96, seed=1), synthetic(128, 64, "L", seed=2), synthetic(80, 80, "RGBA", seed=3)]
    calls = []

    def encode(pixels):  # a stand-in VAE: 16x16 average pooling to a "patchified latent" [1, H/16, W/16, 3]
        calls.append(pixels.shape)
        b, h, w, c = pixels.shape
        return pixels.reshape(b, h // 16, 16, w // 16, 16, c).mean(axis=(2, 4))

    tokens, grids = images.reference_tokens(refs, encode)
    assert grids == ((6, 4), (4, 8), (5, 5))
    assert calls == [(1, 96, 64, 3), (1, 64, 128, 3), (1, 80, 80, 3)]
    # the pipeline packs its channels-first latents
    latents = [torch.from_numpy(encode(images.preprocess_reference(r)[None]).transpose(0, 3, 1, 2).copy())
               for r in refs]
    want = torch.cat([P._pack_latents(lat).squeeze(0) for lat in latents])[None]
    np.testing.assert_array_equal(tokens, want.numpy())

    layout = images.reference_layout(512, (2, 3), grids)
    noisy = P._prepare_latent_ids(torch.zeros(1, 4, 2, 3))
    want_ids = torch.cat([noisy, P._prepare_image_ids(latents)], dim=1)[0]
    np.testing.assert_array_equal(layout.img_ids(), want_ids.numpy())
    np.testing.assert_array_equal(layout.txt_ids(), P._prepare_text_ids(torch.zeros(1, 512, 1))[0].numpy())
    assert layout.n_ref == tokens.shape[1]

    with pytest.raises(ValueError, match="patchified latent"):
        images.reference_tokens(refs[:1], lambda px: px)


def test_image_grid():
    assert images.image_grid(1024, 1024) == (64, 64)
    assert images.image_grid(770, 1370) == (48, 85)  # floored to multiples of 16, as diffusers
    with pytest.raises(ValueError):
        images.image_grid(8, 64)

"""Image-level generation against diffusers' `Flux2KleinPipeline` on a tiny random model folder.

The folder is what users download (diffusers layout); fluxjax converts it on first use, so these
tests run the real loading path: model_index.json, transformer/ and vae/ conversion into the
native cache, the Qwen3 text encoder and tokenizer through transformers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest

from fluxjax import images, pipeline, vae
from reference import LATENT_TOL, pipeline_tokens, rel_err


PIXEL_MEAN_TOL = 1.0  # mean |diff| on 0..255: the study's own regression bar for re-running a task
HEIGHT, WIDTH = 64, 96


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from flux2ref.folder import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("models") / "tiny-klein", seed=0)


@pytest.fixture(scope="module")
def loaded(folder, tmp_path_factory):
    """(our model loaded from the folder, its conversion cache)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    return pipeline.load_model(folder, cache=cache, progress=False), cache


@pytest.fixture(scope="module")
def pipe(folder):
    """diffusers' pipeline on the same folder, the reference."""
    import torch
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(folder).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flat(rgb, size):
    return PIL.Image.new("RGB", size, rgb)


def noisy(seed, size):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parity
@pytest.mark.parametrize("refs", [[], [("flat", (64, 80))], [("flat", (64, 80)), ("noisy", (96, 64))]],
                         ids=["t2i", "1ref", "2refs"])
def test_images_match_diffusers_pipeline(loaded, pipe, refs):
    import torch
    model, _ = loaded
    references = [flat((220, 40, 40), size) if kind == "flat" else noisy(i, size) for i, (kind, size) in enumerate(refs)]
    prompt = "draw a ball in this color"
    text = model.text_encoder.encode([prompt])
    grid = images.image_grid(HEIGHT, WIDTH)
    noise = np.random.default_rng(7).standard_normal((1, model.config.in_channels, *grid)).astype(np.float32)

    with torch.no_grad():
        expected = pipe(image=references or None, prompt_embeds=torch.from_numpy(np.asarray(text.embeds, np.float32)),
                        height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=1.0,
                        latents=torch.from_numpy(noise), output_type="np").images
    expected = np.round(expected * 255).astype(np.uint8)  # diffusers' numpy_to_pil

    got = pipeline.generate(model, text=text, references=references, noise=pipeline_tokens(noise),
                            height=HEIGHT, width=WIDTH)
    ours = np.stack([np.asarray(im) for im in got.images])
    assert ours.shape == expected.shape
    diff = np.abs(ours.astype(np.int16) - expected.astype(np.int16))
    print(f"pixel |diff| mean {diff.mean():.4f} max {diff.max()} ({len(references)} references)")
    assert diff.mean() <= PIXEL_MEAN_TOL


@pytest.mark.parity
@pytest.mark.parametrize("with_reference", [False, True], ids=["t2i", "1ref"])
def test_latents_match_diffusers_output_type_latent(loaded, pipe, with_reference):
    """`fluxjax.vae.diffusers_latents` of generate's latents is the array `Flux2KleinPipeline` returns
    with output_type="latent" (denormalised, unpatchified, channels-first), from the same noise."""
    import torch
    model, _ = loaded
    references = [noisy(3, (80, 64))] if with_reference else []
    text = model.text_encoder.encode(["draw a vase in this color"])
    grid = images.image_grid(HEIGHT, WIDTH)
    noise = np.random.default_rng(11).standard_normal((1, model.config.in_channels, *grid)).astype(np.float32)
    with torch.no_grad():
        expected = pipe(image=references or None, prompt_embeds=torch.from_numpy(np.asarray(text.embeds, np.float32)),
                        height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=1.0,
                        latents=torch.from_numpy(noise), output_type="latent").images.numpy()
    got = pipeline.generate(model, text=text, references=references, noise=pipeline_tokens(noise),
                            height=HEIGHT, width=WIDTH)
    ours = np.asarray(vae.diffusers_latents(model.vae_params, model.vae_config, got.latents, grid))
    assert ours.shape == expected.shape == (1, model.vae_config.latent_channels, HEIGHT // 8, WIDTH // 8)
    assert ours.dtype == expected.dtype
    err = rel_err(ours, expected)
    print(f"latent rel err {err:.2e} ({len(references)} references)")
    assert err <= LATENT_TOL


def test_prompt_path_equals_given_embeddings(loaded):
    model, _ = loaded
    text = model.text_encoder.encode(["draw a mug in this color"])
    a = pipeline.generate(model, "draw a mug in this color", seed=5, height=32, width=32)
    b = pipeline.generate(model, text=text, seed=5, height=32, width=32)
    np.testing.assert_array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert a.content_mask.sum() > 0 and a.layout.n_txt == 512


def test_default_size_follows_first_reference_and_layout_is_planned(loaded):
    model, _ = loaded
    ref = flat((40, 90, 220), (96, 64))  # width 96, height 64
    planned = pipeline.plan_layout(model, [ref])
    got = pipeline.generate(model, text=model.text_encoder.encode(["draw a car in this color"]), references=[ref],
                            seed=1)
    assert got.images[0].size == (96, 64)
    assert got.layout == planned


def test_conversion_cache_is_reused(folder, loaded):
    _, cache = loaded
    entries = sorted(os.listdir(os.path.join(cache, "native")))
    assert [e.split("-")[0] for e in entries] == ["transformer", "vae"]
    stamp = {e: os.stat(os.path.join(cache, "native", e)).st_mtime_ns for e in entries}
    pipeline.load_model(folder, cache=cache, text_encoder=False, progress=False)
    assert {e: os.stat(os.path.join(cache, "native", e)).st_mtime_ns for e in entries} == stamp


def test_cache_in_an_older_format_is_converted_again(folder, loaded):
    """A VAE cached by older fluxjax (format 1, Orbax's legacy layout) is never misread: loading it
    refuses, and the pipeline converts it again."""
    from fluxjax.checkpoint import CheckpointError
    from fluxjax.vae_checkpoint import CONFIG_FILE, FORMAT_VERSION, load_vae

    _, cache = loaded
    vae_dir = pipeline.native_component(folder, "vae", cache=cache)
    meta_file = os.path.join(vae_dir, CONFIG_FILE)
    with open(meta_file) as f:
        meta = json.load(f)
    with open(meta_file, "w") as f:
        json.dump({**meta, "format_version": 1}, f)
    with pytest.raises(CheckpointError, match="no longer reads"):
        load_vae(vae_dir)
    assert pipeline.native_component(folder, "vae", cache=cache) == vae_dir
    with open(meta_file) as f:
        assert json.load(f)["format_version"] == FORMAT_VERSION
    load_vae(vae_dir)


def test_bad_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pipeline.load_model(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        pipeline.load_model(tmp_path)


# --- the conversion cache recovers by itself ---------------------------------------------------


def _flip(path) -> None:
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 100] = bytes(b ^ 0xFF for b in data[mid:mid + 100])
    with open(path, "wb") as f:
        f.write(bytes(data))


def _largest_file(folder: str) -> str:
    files = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if not n.endswith(".json")]
    return max(files, key=os.path.getsize)


def test_a_damaged_cache_entry_is_converted_again_with_one_line(folder, loaded, tmp_path, caplog):
    import jax

    model, _ = loaded
    cache = str(tmp_path / "cache")
    entry = pipeline.native_component(folder, "transformer", cache=cache)
    _flip(_largest_file(os.path.join(entry, "params")))
    with caplog.at_level("WARNING", logger="fluxjax.pipeline"):
        again = pipeline.load_model(folder, cache=cache, text_encoder=False, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fluxjax.pipeline"]
    assert len(warnings) == 1 and "converting" in warnings[0] and "differs from the checksum" in warnings[0]
    assert "\n" not in warnings[0]
    for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(n for n in os.listdir(os.path.join(cache, "native")) if n.startswith(".")) == []


def test_orphaned_temporaries_go_only_when_provably_stale(folder, tmp_path):
    from fluxjax.files import acquire_lock

    cache = str(tmp_path / "cache")
    entry = pipeline.native_component(folder, "vae", cache=cache)
    orphan = os.path.join(os.path.dirname(entry), f".{os.path.basename(entry)}.tmp-999999-deadbeef")
    os.makedirs(os.path.join(orphan, "params"))
    lock = acquire_lock(entry + ".lock")  # a live process (this one) holds the entry: its temporary may be alive
    try:
        pipeline.native_component(folder, "vae", cache=cache)
        assert os.path.isdir(orphan)
    finally:
        lock.unlink()
    pipeline.native_component(folder, "vae", cache=cache)  # nobody converts it now: the orphan is stale
    assert not os.path.exists(orphan) and not os.path.exists(entry + ".lock")


@pytest.mark.parametrize("missing, text_encoder", [("vae", False), ("text_encoder", True), ("tokenizer", True)])
def test_an_incomplete_folder_is_refused_before_anything_is_converted(folder, tmp_path, missing, text_encoder):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(folder, partial, ignore=shutil.ignore_patterns(missing))
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=f"missing {missing}") as err:
        pipeline.load_model(partial, cache=str(cache), text_encoder=text_encoder, progress=False)
    assert "\n" not in str(err.value)
    assert not cache.exists()  # nothing converted


def test_a_bad_source_leaves_no_cache_entry_lock_or_temporary(folder, tmp_path):
    import shutil

    from fluxjax.checkpoint import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, os.path.getsize(weights) // 2)
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors") as err:
        pipeline.load_model(broken, cache=str(cache), text_encoder=False, progress=False)
    assert "\n" not in str(err.value)
    assert os.listdir(cache / "native") == []

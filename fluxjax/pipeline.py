"""Image-level generation: prompts and reference images in, PIL images out.

    model = fluxjax.pipeline.load_model("FLUX.2-klein-9B/")      # a diffusers model folder
    result = fluxjax.pipeline.generate(model, "draw a ball in this color", references=["red.png"],
                                       seed=1234, interventions=..., capture=...)
    result.images[0].save("out.png")

`load_model` reads a model folder as users download it (diffusers layout: `transformer/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`, `model_index.json`), checking that every part it needs
is there before converting anything. On first use it converts the transformer and the VAE into
native fluxjax checkpoints in a cache (`$FLUXJAX_CACHE`, default `~/.cache/fluxjax`), keyed by the
source files' names, sizes and modification times, and reuses them afterwards. A cache entry is
written under a lock file (`<entry>.lock`); whoever holds it removes the temporaries a killed
conversion left behind. An entry that fails its checksums on load is converted again, with one
warning line (logger `fluxjax.pipeline`). The text encoder runs in PyTorch through Hugging Face transformers
(`fluxjax.text`); its encodings are cached on disk per prompt.

`generate` follows diffusers' `Flux2KleinPipeline` / `Flux2Pipeline`: references preprocessed and
encoded one by one (posterior mean, patchify, bn-normalise, pack; T = 10, 20, ...), the output size
defaulting to the first reference's processed size (else 1024x1024), the FLUX.2 schedule and
sampler (`fluxjax.sampler`), then unpack, de-normalise, unpatchify, decode, and
`round(255 * clamp(x / 2 + 1/2, 0, 1))` to uint8 (diffusers' `postprocess`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from fluxjax import images as imagelib
from fluxjax import sampler as samplerlib
from fluxjax import vae as vaelib
from fluxjax import checkpoint, vae_checkpoint
from fluxjax.checkpoint import load_transformer
from fluxjax.conversion.convert import convert_transformer
from fluxjax.conversion.vae import convert_vae
from fluxjax.config import Flux2Config
from fluxjax.files import LockHeld, acquire_lock, remove_stale_temporaries
from fluxjax.captures import Capture, Captures
from fluxjax.interventions import Interventions
from fluxjax.options import RuntimeOptions
from fluxjax.layout import TokenLayout
from fluxjax.params import Flux2Weights
from fluxjax.vae_checkpoint import load_vae

DEFAULT_SIZE = 1024  # diffusers: default_sample_size 128 x vae_scale_factor 8
LOCK_POLL_SECONDS = 0.5  # how often a process waiting for another's conversion looks again

log = logging.getLogger(__name__)

# model_index.json `_class_name` -> (text encoder kind, sampler options)
PIPELINES = {
    "Flux2KleinPipeline": "qwen3",
    "Flux2KleinKVPipeline": "qwen3",
    "Flux2Pipeline": "mistral3",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Flux2Model:
    """Everything `generate` needs. Built by `load_model`, or by hand from the parts."""

    config: Flux2Config
    params: Flux2Weights
    vae_config: vaelib.VAEConfig
    vae_params: vaelib.VAEParams
    options: samplerlib.SamplerOptions
    text_encoder: object | None = None  # fluxjax.text.TextEncoder; None: pass `text=` to generate
    text_cache: str | None = None  # where prompt encodings are cached (None: not cached)
    name: str = "flux2"


@dataclasses.dataclass(frozen=True)
class Generation:
    images: list  # PIL images, one per sample
    latents: np.ndarray  # [B, N_img, in_channels] packed, normalised tokens (`fluxjax.vae.diffusers_latents`)
    layout: TokenLayout
    content_mask: np.ndarray  # bool [B, T]
    captures: Captures | None = None  # arrays with a leading [num_steps] axis


# --- loading ---------------------------------------------------------------------------------


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("FLUXJAX_CACHE", "~/.cache/fluxjax"))


def _fingerprint(folder: str) -> str:
    """Names, sizes and mtimes of a component folder's files: changes when the weights change."""
    h = hashlib.sha256(os.path.abspath(folder).encode())
    for name in sorted(os.listdir(folder)):
        st = os.stat(os.path.join(folder, name))
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: a FLUX.2 model folder in the diffusers layout has "
                                f"model_index.json, transformer/, vae/, text_encoder/ and tokenizer/") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


# what a model folder must hold (any one of each tuple), per part
_TRANSFORMER_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
REQUIRED = {
    "transformer": [("transformer/config.json",), tuple(f"transformer/{n}" for n in _TRANSFORMER_FILES)],
    "vae": [("vae/config.json",), ("vae/diffusion_pytorch_model.safetensors",)],
    "text": [("text_encoder/config.json",), ("tokenizer",)],
}


def check_model_folder(folder: str | os.PathLike, text_encoder: bool = True) -> None:
    """Raise FileNotFoundError naming every part `load_model` needs that `folder` lacks."""
    folder = os.fspath(folder)
    parts = ["transformer", "vae"] + (["text"] if text_encoder else [])
    missing = [alternatives[0] for part in parts for alternatives in REQUIRED[part]
               if not any(os.path.exists(os.path.join(folder, a)) for a in alternatives)]
    if missing:
        raise FileNotFoundError(f"{folder}: not a complete FLUX.2 model folder, missing {', '.join(missing)} (the "
                                f"diffusers layout has model_index.json, transformer/, vae/, text_encoder/ and "
                                f"tokenizer/)")


def native_component(folder: str, component: str, *, cache: str | None = None, progress: bool = True,
                     reconvert: bool = False) -> str:
    """Path of the native checkpoint of `folder/component` ("transformer" or "vae"), converting
    it on first use, again when the cached one was written in an older format version, and when
    `reconvert` (a damaged entry). Conversion writes to a temporary directory renamed into place,
    so an interrupted conversion leaves no half-written cache entry; it runs holding the entry's
    lock file, so temporaries found then were left by a killed conversion and are removed."""
    src = os.path.join(folder, component)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src} is missing: the model folder has no {component}/ subfolder")
    dst = os.path.join(cache if cache is not None else cache_root(), "native", f"{component}-{_fingerprint(src)}")
    config_file, version = ((checkpoint.CONFIG_FILE, checkpoint.FORMAT_VERSION) if component == "transformer"
                            else (vae_checkpoint.CONFIG_FILE, vae_checkpoint.FORMAT_VERSION))
    if not reconvert and _stored_version(os.path.join(dst, config_file)) == version:
        _clean_orphans(dst)
        return dst
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    lock = _wait_for_lock(dst + ".lock")
    try:
        remove_stale_temporaries(dst)
        if not reconvert and _stored_version(os.path.join(dst, config_file)) == version:
            return dst  # converted by the process we waited for
        if os.path.lexists(dst) and not checkpoint.is_checkpoint(dst, config_file):
            shutil.rmtree(dst)  # a cache entry too damaged to be recognised: ours to replace
        if component == "transformer":
            convert_transformer(src, dst, progress=progress, overwrite=True)
        else:
            convert_vae(src, dst, overwrite=True)
    finally:
        lock.unlink(missing_ok=True)
    return dst


def _clean_orphans(dst: str) -> None:
    """Remove the temporaries a killed conversion of `dst` left, if no live process holds its lock."""
    if not glob.glob(glob.escape(os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}")) + ".tmp-*"):
        return
    try:
        lock = acquire_lock(dst + ".lock")
    except LockHeld:
        return  # a conversion is running: its temporary is alive
    try:
        remove_stale_temporaries(dst)
    finally:
        lock.unlink(missing_ok=True)


def _wait_for_lock(path: str):
    """Take the lock file `path`, waiting while another live process converts the same entry."""
    while True:
        try:
            return acquire_lock(path)
        except LockHeld:
            time.sleep(LOCK_POLL_SECONDS)


def _load_cached(folder: str, component: str, load, *, cache: str | None, progress: bool):
    """load(path) of the cached native checkpoint of `folder/component`; an entry that fails its
    checks (checksums, missing files) is converted again, with one warning line."""
    path = native_component(folder, component, cache=cache, progress=progress)
    try:
        return load(path)
    except checkpoint.CheckpointError as e:
        log.warning("%s", f"damaged conversion cache entry, converting {os.path.join(folder, component)} again: {e}")
    return load(native_component(folder, component, cache=cache, progress=progress, reconvert=True))


def _stored_version(config_file: str) -> int | None:
    """The format version a cached native checkpoint was written in (None: absent or unreadable)."""
    try:
        meta = checkpoint.read_json(config_file)
    except checkpoint.CheckpointError:
        return None
    return meta.get("format_version") if isinstance(meta, dict) else None


def load_model(folder: str | os.PathLike, *, dtype=None, cache: str | None = None, text_encoder: bool = True,
               options: samplerlib.SamplerOptions | None = None, progress: bool = True,
               text_encoder_out_layers: tuple[int, ...] | None = None,
               max_text_length: int | None = None) -> Flux2Model:
    """Load a FLUX.2 model folder (diffusers layout), converting transformer and VAE on first use.

    dtype: the transformer's dtype (None keeps the checkpoint's); the VAE stays in float32, as
    the pipelines run it for references (`force_upcast`). options: sampler options; None picks
    the model's defaults ([klein] distilled: 4 steps; [klein] base: CFG 4.0, 50 steps; [dev]:
    embedded guidance 4.0, 50 steps). text_encoder: False skips loading the (large) encoder;
    then `generate` needs precomputed `text=`. text_encoder_out_layers: the encoder's hidden states
    stacked into the text features (diffusers' pipeline argument of that name; None: its default).
    max_text_length: the text tokens every prompt is padded to (the pipelines' max_sequence_length;
    None: their 512).
    """
    folder = os.fspath(folder)
    index = _read_json(os.path.join(folder, "model_index.json"))
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls not in PIPELINES:
        raise ValueError(f"{folder}/model_index.json names pipeline {cls!r}; fluxjax loads {sorted(PIPELINES)}")
    check_model_folder(folder, text_encoder)
    config, params = _load_cached(folder, "transformer", lambda p: load_transformer(p, dtype), cache=cache,
                                  progress=progress)
    vae_config, vae_params = _load_cached(folder, "vae", load_vae, cache=cache, progress=progress)
    if options is None:
        if cls == "Flux2Pipeline":
            options = samplerlib.DEV
        elif index.get("is_distilled", cls == "Flux2KleinKVPipeline"):
            options = samplerlib.KLEIN_DISTILLED
        else:
            options = samplerlib.KLEIN_BASE
    encoder = None
    if text_encoder:
        from fluxjax.text import load_text_encoder

        from fluxjax.text import MAX_LENGTH

        encoder = load_text_encoder(os.path.join(folder, "text_encoder"), os.path.join(folder, "tokenizer"),
                                    PIPELINES[cls], text_encoder_out_layers=text_encoder_out_layers,
                                    max_length=MAX_LENGTH if max_text_length is None else int(max_text_length))
    root = cache if cache is not None else cache_root()
    return Flux2Model(config=config, params=params, vae_config=vae_config, vae_params=vae_params, options=options,
                      text_encoder=encoder, text_cache=os.path.join(root, "text"),
                      name=os.path.basename(os.path.abspath(folder)))


# --- VAE, jitted once per shape ------------------------------------------------------------


_encode_to_grid = jax.jit(vaelib.encode_to_grid, static_argnums=1)


@functools.partial(jax.jit, static_argnums=(1, 3, 4))
def decode_pixels(vae_params, vae_config, tokens, height, width):
    """Normalised tokens -> uint8 [B, H, W, 3] as diffusers' postprocess: round(255 clamp(x/2 + 1/2))."""
    x = vaelib.decode_tokens(vae_params, vae_config, tokens, height, width).astype(jnp.float32)
    return jnp.round(jnp.clip(x / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


def reference_tokens(model: Flux2Model, references):
    """Reference images (PIL or paths) -> (tokens [1, N_ref, P] in the model dtype, grids, pixel sizes)."""
    sizes = []

    def encode(pixels):
        sizes.append(pixels.shape[1:3])
        return np.asarray(_encode_to_grid(model.vae_params, model.vae_config, jnp.asarray(pixels)))

    tokens, grids = imagelib.reference_tokens(references, encode)
    return jnp.asarray(tokens, model.params.img_in.dtype), grids, sizes


# --- generation ------------------------------------------------------------------------------


def encode_prompts(model: Flux2Model, prompts):
    if model.text_encoder is None:
        raise ValueError("this model was loaded without a text encoder: pass `text=` (a TextConditioning)")
    return model.text_encoder.encode(prompts, cache_dir=model.text_cache)


def generate(model: Flux2Model, prompts=None, references=None, *, text=None, seed=0, noise=None,
             height: int | None = None, width: int | None = None, options: samplerlib.SamplerOptions | None = None,
             negative_text=None, interventions: Interventions | None = None, capture: Capture | None = None,
             runtime: RuntimeOptions | None = None, attn_impl: str | None = None) -> Generation:
    """Generate (or edit) images.

    prompts: a string or a list (one sample each); or `text=` a precomputed `TextConditioning`
    (e.g. `encode_prompts`, or the encodings of another prompt, for the lens). references: None,
    or a list of images (PIL or paths) shared by every sample. seed: int or one per sample
    (JAX PRNG, `fluxjax.sampler.initial_noise`); or `noise` [B, N_img, P]. height, width: output
    size (default: the first reference's processed size, else 1024). interventions / capture:
    passed to every step (`fluxjax.sampler.sample`); build their token groups from
    `Generation.layout` (see `plan_layout`).
    """
    if text is None:
        if prompts is None:
            raise ValueError("pass `prompts` or `text=`")
        text = encode_prompts(model, [prompts] if isinstance(prompts, str) else list(prompts))
    options = options or model.options
    refs, grids, sizes = (None, (), [])
    if references:
        refs, grids, sizes = reference_tokens(model, references)
    if height is None or width is None:
        h0, w0 = sizes[0] if sizes else (DEFAULT_SIZE, DEFAULT_SIZE)
        height, width = height or int(h0), width or int(w0)
    grid = imagelib.image_grid(height, width)
    height, width = grid[0] * imagelib.MULTIPLE_OF, grid[1] * imagelib.MULTIPLE_OF
    dtype = model.params.img_in.dtype
    embeds = jnp.asarray(np.asarray(text.embeds, np.float32), dtype)
    layout = TokenLayout(n_txt=embeds.shape[1], img_grid=grid, ref_grids=grids)
    uncond = None
    if options.guidance == "cfg":
        negative_text = negative_text if negative_text is not None else encode_prompts(model, [""] * embeds.shape[0])
        uncond = jnp.asarray(np.asarray(negative_text.embeds, np.float32), dtype)
    latents, captures = samplerlib.sample(model.params, model.config, options, embeds, text.txt_ids,
                                          layout.img_ids(), noise=noise, seed=None if noise is not None else seed,
                                          refs=refs, uncond_txt=uncond, interventions=interventions,
                                          capture=capture, runtime=runtime, attn_impl=attn_impl)
    pixels = np.asarray(decode_pixels(model.vae_params, model.vae_config, latents, height, width))
    return Generation(images=[PIL.Image.fromarray(p) for p in pixels], latents=np.asarray(latents),
                      layout=layout, content_mask=np.asarray(text.content_mask), captures=captures)


def plan_layout(model: Flux2Model, references=None, height: int | None = None, width: int | None = None,
                n_txt: int = 512) -> TokenLayout:
    """The token layout `generate` will use, without running the model (for building interventions)."""
    grids, sizes = [], []
    for image in references or []:
        pixels = imagelib.preprocess_reference(image)
        sizes.append(pixels.shape[:2])
        grids.append((pixels.shape[0] // imagelib.MULTIPLE_OF, pixels.shape[1] // imagelib.MULTIPLE_OF))
    if height is None or width is None:
        h0, w0 = sizes[0] if sizes else (DEFAULT_SIZE, DEFAULT_SIZE)
        height, width = height or int(h0), width or int(w0)
    return TokenLayout(n_txt=n_txt, img_grid=imagelib.image_grid(height, width), ref_grids=tuple(grids))

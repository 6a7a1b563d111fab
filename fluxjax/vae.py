"""The FLUX.2 autoencoder (spec section 8): encoder, decoder, latent normalisation, patchify, packing.

A pure-functional port of diffusers' `AutoencoderKLFlux2` (BFL: `AutoEncoder` in `ae.safetensors`),
the LDM / FLUX.1 KL autoencoder with 32 latent channels and a batch-norm normalisation of the
2x2-patchified latent.

Layout: every image and latent is **channels-last (NHWC)**, the layout XLA convolves natively.

    B  batch                 H, W  pixel height and width        c  latent channels (32)
    h, w  latent grid (H/8, W/8)    Hl, Wl  token grid (h/2, w/2)   P  token channels (c * 2 * 2 = 128)

    images  [B, H, W, 3] in [-1, 1]  --encode-->  latents [B, h, w, c] (posterior mean)
    latents --patchify--> [B, Hl, Wl, P] --normalize--> --pack--> tokens [B, Hl * Wl, P]

This module is the one definition of these latent layouts (the transformer's tokens are the
packed ones); `diffusers_latents` gives the channels-first array diffusers' [klein] pipelines
return as their `output_type="latent"`.

Conv kernels are stored HWIO `[kh, kw, in, out]` (torch stores `[out, in, kh, kw]`); the mid-block
attention's q, k, v and output projections are matrices stored `(in, out)`, as everywhere in
fluxjax. Field names follow BFL's checkpoint keys (`encoder.down.1.block.0.nin_shortcut`,
`decoder.up.3.upsample`, `mid.attn_1.proj_out`, `bn.running_var`); the one departure is that the
downsample / upsample conv is the field itself (BFL `downsample.conv`). As in BFL, `decoder.up[i]`
is the level at resolution 1/2^i and the decoder runs `up` in reverse (diffusers' `up_blocks[j]` is
`up[n - 1 - j]`).

`vae_param_shapes(config)` is the one declaration of every shape: `init_vae_params`,
`jax.eval_shape` tests and the converter's validation read it. Functions take the config as an
argument; jit them with it static, e.g. `jax.jit(encode_to_tokens, static_argnums=1)`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float

from fluxjax.config import as_tuple, type_problems
from fluxjax.init import init_tree
from fluxjax.numerics import attention
from fluxjax.options import RuntimeOptions, runtime_options

GN_EPS = 1e-6  # every GroupNorm of the autoencoder (diffusers `resnet_eps=1e-6`, BFL `eps=1e-6`)


# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Shape of a FLUX.2 autoencoder; field names follow diffusers' `AutoencoderKLFlux2` config."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: same as block_out_channels
    layers_per_block: int = 2  # ResNet blocks per encoder level; the decoder has one more
    latent_channels: int = 32
    norm_num_groups: int = 32
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            object.__setattr__(self, name, as_tuple(getattr(self, name)))
        problems = type_problems(self)
        if problems:
            raise ValueError("invalid VAEConfig: " + "; ".join(problems))
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.decoder_block_out_channels is not None:
            object.__setattr__(self, "decoder_block_out_channels",
                               tuple(int(c) for c in self.decoder_block_out_channels))
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not self.block_out_channels:
            problems.append("block_out_channels must name at least one level")
        if len(self.decoder_channels) != len(self.block_out_channels):
            problems.append("decoder_block_out_channels must have one entry per level of block_out_channels")
        for c in self.block_out_channels + self.decoder_channels:
            if c <= 0 or c % max(self.norm_num_groups, 1):
                problems.append(f"channel width {c} is not a positive multiple of norm_num_groups "
                                f"{self.norm_num_groups}")
                break
        if self.layers_per_block < 1:
            problems.append("layers_per_block must be >= 1")
        if len(self.patch_size) != 2 or min(self.patch_size) < 1:
            problems.append(f"patch_size must be two positive ints, got {self.patch_size}")
        if self.batch_norm_eps <= 0:
            problems.append("batch_norm_eps must be positive")
        if problems:
            raise ValueError("invalid VAEConfig: " + "; ".join(problems))

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side: 2^(levels - 1), 8 for FLUX.2."""
        return 2 ** (self.num_levels - 1)

    @property
    def token_channels(self) -> int:
        """P: channels of a packed token, latent_channels * prod(patch_size) (128 for FLUX.2)."""
        return self.latent_channels * math.prod(self.patch_size)

    @property
    def pixels_per_token(self) -> tuple[int, int]:
        """Pixel height and width of one token (16 x 16 for FLUX.2): image sides must be multiples."""
        return self.downsample_factor * self.patch_size[0], self.downsample_factor * self.patch_size[1]


FLUX2_VAE = VAEConfig()  # diffusers `AutoencoderKLFlux2()` defaults = BFL `AutoEncoderParams()`


# ----------------------------------------------------------------------------------------------
# Parameters


@struct.dataclass
class Conv:
    kernel: jax.Array  # [kh, kw, in, out] (HWIO)
    bias: jax.Array  # [out]


@struct.dataclass
class Dense:
    kernel: jax.Array  # [in, out] (BFL: a 1x1 Conv2d, diffusers: a Linear)
    bias: jax.Array  # [out]


@struct.dataclass
class GroupNorm:
    weight: jax.Array  # [C]
    bias: jax.Array  # [C]


@struct.dataclass
class ResnetBlock:
    norm1: GroupNorm
    conv1: Conv  # 3x3, in -> out
    norm2: GroupNorm
    conv2: Conv  # 3x3, out -> out
    nin_shortcut: Conv | None  # 1x1, only where in != out (diffusers `conv_shortcut`)


@struct.dataclass
class AttnBlock:
    """Single-head spatial self-attention over the h * w cells (head dim = channels)."""

    norm: GroupNorm
    q: Dense
    k: Dense
    v: Dense
    proj_out: Dense


@struct.dataclass
class MidBlock:
    block_1: ResnetBlock
    attn_1: AttnBlock | None  # None unless config.mid_block_add_attention
    block_2: ResnetBlock


@struct.dataclass
class DownLevel:
    block: tuple[ResnetBlock, ...]  # layers_per_block
    downsample: Conv | None  # 3x3 stride 2 after (0, 1, 0, 1) padding; None on the last level


@struct.dataclass
class UpLevel:
    block: tuple[ResnetBlock, ...]  # layers_per_block + 1
    upsample: Conv | None  # nearest x2 then this 3x3 conv; None on level 0


@struct.dataclass
class Encoder:
    conv_in: Conv
    down: tuple[DownLevel, ...]
    mid: MidBlock
    norm_out: GroupNorm
    conv_out: Conv  # -> 2 * latent_channels: posterior mean, then log-variance
    quant_conv: Conv | None  # 1x1, 2c -> 2c


@struct.dataclass
class Decoder:
    post_quant_conv: Conv | None  # 1x1, c -> c
    conv_in: Conv
    mid: MidBlock
    up: tuple[UpLevel, ...]  # up[i] at resolution 1/2^i; run from up[-1] to up[0]
    norm_out: GroupNorm
    conv_out: Conv


@struct.dataclass
class BatchNormStats:
    """Running statistics of the latent normalisation (a BatchNorm2d without affine, eval mode)."""

    running_mean: jax.Array  # [P]
    running_var: jax.Array  # [P]


@struct.dataclass
class VAEParams:
    encoder: Encoder
    decoder: Decoder
    bn: BatchNormStats


def vae_param_shapes(config: VAEConfig, dtype=jnp.float32) -> VAEParams:
    """Every parameter's shape as a jax.ShapeDtypeStruct, in the VAEParams pytree structure."""

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    def conv(cin, cout, k=3):
        return Conv(kernel=s(k, k, cin, cout), bias=s(cout))

    def norm(c):
        return GroupNorm(weight=s(c), bias=s(c))

    def dense(c):
        return Dense(kernel=s(c, c), bias=s(c))

    def resnet(cin, cout):
        return ResnetBlock(norm1=norm(cin), conv1=conv(cin, cout), norm2=norm(cout), conv2=conv(cout, cout),
                           nin_shortcut=conv(cin, cout, 1) if cin != cout else None)

    def mid(c):
        attn = AttnBlock(norm(c), dense(c), dense(c), dense(c), dense(c)) if config.mid_block_add_attention else None
        return MidBlock(block_1=resnet(c, c), attn_1=attn, block_2=resnet(c, c))

    enc, dec, n, lat = config.block_out_channels, config.decoder_channels, config.num_levels, config.latent_channels
    down = []
    for i, cout in enumerate(enc):
        cin = enc[max(i - 1, 0)]
        blocks = tuple(resnet(cin if j == 0 else cout, cout) for j in range(config.layers_per_block))
        down.append(DownLevel(block=blocks, downsample=conv(cout, cout) if i != n - 1 else None))
    up = []
    for i, cout in enumerate(dec):
        cin = dec[min(i + 1, n - 1)]
        blocks = tuple(resnet(cin if j == 0 else cout, cout) for j in range(config.layers_per_block + 1))
        up.append(UpLevel(block=blocks, upsample=conv(cout, cout) if i != 0 else None))
    encoder = Encoder(conv_in=conv(config.in_channels, enc[0]), down=tuple(down), mid=mid(enc[-1]),
                      norm_out=norm(enc[-1]), conv_out=conv(enc[-1], 2 * lat),
                      quant_conv=conv(2 * lat, 2 * lat, 1) if config.use_quant_conv else None)
    decoder = Decoder(post_quant_conv=conv(lat, lat, 1) if config.use_post_quant_conv else None,
                      conv_in=conv(lat, dec[-1]), mid=mid(dec[-1]), up=tuple(up), norm_out=norm(dec[0]),
                      conv_out=conv(dec[0], config.out_channels))
    p = config.token_channels
    return VAEParams(encoder=encoder, decoder=decoder, bn=BatchNormStats(running_mean=s(p), running_var=s(p)))


def init_vae_params(config: VAEConfig, key: jax.Array, dtype=jnp.float32) -> VAEParams:
    """Random, well-conditioned parameters (`fluxjax.init`), every tensor non-trivial so parity tests
    see it: kernels N(0, 1/fan_in); GroupNorm weights 1 + N(0, 0.1^2); biases N(0, 0.1^2); bn running
    mean N(0, 0.5^2) and running variance 0.5 + |N(0, 1)|. Every leaf is cut from one normal draw,
    compiled as one program; under `jax.eval_shape` nothing is allocated.
    """
    return init_tree(vae_param_shapes(config, dtype), key)


# ----------------------------------------------------------------------------------------------
# Layers (float32 islands mirror torch: GroupNorm and the attention softmax run in float32)


def group_norm(p: GroupNorm, x, groups: int, eps: float = GN_EPS):
    """torch.nn.GroupNorm over [B, H, W, C]: statistics and affine in float32, one cast back.

    torch's CPU kernel for reduced-precision inputs accumulates and applies the affine in float32
    and rounds once to the input dtype; in float32 it is the plain formula.
    """
    b, h, w, c = x.shape
    x32 = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = jnp.mean(x32, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 4), keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
    return (y * p.weight.astype(jnp.float32) + p.bias.astype(jnp.float32)).astype(x.dtype)


def conv(p: Conv, x, stride: int = 1, padding=None):
    """Conv2d over NHWC with an HWIO kernel; default padding k // 2 on every side (torch `padding=1`)."""
    k = p.kernel.shape[0]
    if padding is None:
        padding = ((k // 2, k // 2), (k // 2, k // 2))
    y = jax.lax.conv_general_dilated(x, p.kernel, window_strides=(stride, stride), padding=padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p.bias


def resnet_block(p: ResnetBlock, x, groups: int):
    """diffusers `ResnetBlock2D` without time embedding (BFL `ResnetBlock`): pre-norm, two 3x3 convs."""
    h = conv(p.conv1, jax.nn.silu(group_norm(p.norm1, x, groups)))
    h = conv(p.conv2, jax.nn.silu(group_norm(p.norm2, h, groups)))
    if p.nin_shortcut is not None:
        x = conv(p.nin_shortcut, x)
    return x + h


def attn_block(p: AttnBlock, x, groups: int, runtime: RuntimeOptions | None = None):
    """Mid-block self-attention with one head of width C, residual added (diffusers `Attention` with
    `residual_connection=True`, `rescale_output_factor=1`); the softmax goes through
    `fluxjax.numerics.attention` (float32 logits)."""
    b, h, w, c = x.shape
    t = group_norm(p.norm, x, groups).reshape(b, h * w, 1, c)  # [B, L, 1 head, C]
    q, k, v = (jnp.einsum("blhc,cd->blhd", t, d.kernel) + d.bias for d in (p.q, p.k, p.v))
    o = attention(q, k, v, None, runtime)[:, :, 0]
    return x + (jnp.einsum("blc,cd->bld", o, p.proj_out.kernel) + p.proj_out.bias).reshape(b, h, w, c)


def mid_block(p: MidBlock, x, groups: int, runtime: RuntimeOptions | None = None):
    x = resnet_block(p.block_1, x, groups)
    if p.attn_1 is not None:
        x = attn_block(p.attn_1, x, groups, runtime)
    return resnet_block(p.block_2, x, groups)


def downsample(p: Conv, x):
    """3x3 stride-2 conv after zero padding of one row at the bottom and one column at the right
    (torch `F.pad(x, (0, 1, 0, 1))` then `padding=0`)."""
    return conv(p, x, stride=2, padding=((0, 1), (0, 1)))


def upsample(p: Conv, x):
    """Nearest-neighbour x2 (`F.interpolate(scale_factor=2, mode="nearest")`), then a 3x3 conv."""
    return conv(p, jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


# ----------------------------------------------------------------------------------------------
# Encoder and decoder


def encode(params: VAEParams, config: VAEConfig, images: Float[Array, "B H W Cin"], *,
           runtime: RuntimeOptions | None = None) -> Float[Array, "B h w c"]:
    """Images [B, H, W, in_channels] in [-1, 1] -> posterior mean latents [B, h, w, c].

    The mean is the first `latent_channels` of the quant_conv output (diffusers
    `retrieve_latents(..., sample_mode="argmax")`, BFL `torch.chunk(moments, 2)[0]`); only those
    output channels of quant_conv are computed. Images are cast to the parameters' dtype, as the
    reference pipelines cast them to the VAE's dtype. runtime: the attention kernel
    (`fluxjax.RuntimeOptions`), as in every function below.
    """
    runtime = runtime_options(runtime)
    p, g = params.encoder, config.norm_num_groups
    x = conv(p.conv_in, images.astype(p.conv_in.kernel.dtype))
    for level in p.down:
        for block in level.block:
            x = resnet_block(block, x, g)
        if level.downsample is not None:
            x = downsample(level.downsample, x)
    x = mid_block(p.mid, x, g, runtime)
    x = conv(p.conv_out, jax.nn.silu(group_norm(p.norm_out, x, g)))
    lat = config.latent_channels
    if p.quant_conv is None:
        return x[..., :lat]
    return conv(Conv(p.quant_conv.kernel[..., :lat], p.quant_conv.bias[:lat]), x)


def decode(params: VAEParams, config: VAEConfig, latents: Float[Array, "B h w c"], *,
           runtime: RuntimeOptions | None = None) -> Float[Array, "B H W Cout"]:
    """Latents [B, h, w, c] -> images [B, h * 8, w * 8, out_channels], nominally in [-1, 1] (not clamped)."""
    runtime = runtime_options(runtime)
    p, g = params.decoder, config.norm_num_groups
    x = latents.astype(p.conv_in.kernel.dtype)
    if p.post_quant_conv is not None:
        x = conv(p.post_quant_conv, x)
    x = mid_block(p.mid, conv(p.conv_in, x), g, runtime)
    for level in reversed(p.up):
        for block in level.block:
            x = resnet_block(block, x, g)
        if level.upsample is not None:
            x = upsample(level.upsample, x)
    return conv(p.conv_out, jax.nn.silu(group_norm(p.norm_out, x, g)))


# ----------------------------------------------------------------------------------------------
# Latent space of the transformer: patchify, batch-norm normalisation, packing


def patchify(latents: Float[Array, "B h w c"], patch_size: tuple[int, int] = (2, 2)) -> Float[Array, "B Hl Wl P"]:
    """[B, h, w, c] -> [B, h/2, w/2, c*4], channel index c * 4 + pi * 2 + pj (pi: row, pj: column
    offset in the patch), the order of diffusers `_patchify_latents` and BFL's
    `rearrange("c (i pi) (j pj) -> (c pi pj) i j")`."""
    b, h, w, c = latents.shape
    ph, pw = patch_size
    if h % ph or w % pw:
        raise ValueError(f"latent grid {h}x{w} is not divisible by the patch size {ph}x{pw}")
    x = latents.reshape(b, h // ph, ph, w // pw, pw, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // ph, w // pw, c * ph * pw)


def unpatchify(x: Float[Array, "B Hl Wl P"], patch_size: tuple[int, int] = (2, 2)) -> Float[Array, "B h w c"]:
    """Inverse of `patchify`."""
    b, hl, wl, p = x.shape
    ph, pw = patch_size
    c = p // (ph * pw)
    return x.reshape(b, hl, wl, c, ph, pw).transpose(0, 1, 4, 2, 5, 3).reshape(b, hl * ph, wl * pw, c)


def normalize(params: VAEParams, config: VAEConfig, x: Float[Array, "B Hl Wl P"]) -> Float[Array, "B Hl Wl P"]:
    """(x - running_mean) / sqrt(running_var + eps) per token channel: BatchNorm2d in eval mode.

    The statistics are cast to x's dtype first, as diffusers' pipelines do (`_encode_vae_image`);
    BFL promotes to float32 instead. Identical in float32.
    """
    mean, std = _bn_mean_std(params, config, x.dtype)
    return (x - mean) / std


def denormalize(params: VAEParams, config: VAEConfig, x: Float[Array, "B Hl Wl P"]) -> Float[Array, "B Hl Wl P"]:
    """Inverse of `normalize`: x * sqrt(running_var + eps) + running_mean."""
    mean, std = _bn_mean_std(params, config, x.dtype)
    return x * std + mean


def _bn_mean_std(params: VAEParams, config: VAEConfig, dtype):
    std = jnp.sqrt(params.bn.running_var.astype(jnp.float32) + config.batch_norm_eps)
    return params.bn.running_mean.astype(dtype), std.astype(dtype)


def pack(x: Float[Array, "B Hl Wl P"]) -> Float[Array, "B N P"]:
    """[B, Hl, Wl, P] -> tokens [B, Hl * Wl, P], row-major (Hl slowest), as diffusers `_pack_latents`."""
    b, hl, wl, p = x.shape
    return x.reshape(b, hl * wl, p)


def unpack(tokens: Float[Array, "B N P"], grid: tuple[int, int]) -> Float[Array, "B Hl Wl P"]:
    """Tokens [B, Hl * Wl, P] -> [B, Hl, Wl, P] for grid (Hl, Wl)."""
    b, n, p = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not fill a {grid[0]}x{grid[1]} token grid")
    return tokens.reshape(b, grid[0], grid[1], p)


def token_grid(config: VAEConfig, height: int, width: int) -> tuple[int, int]:
    """Token grid (Hl, Wl) of an H x W image; H and W must be multiples of `config.pixels_per_token`."""
    th, tw = config.pixels_per_token
    if height % th or width % tw or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} is not a positive multiple of {th}x{tw} pixels; "
                         f"crop or resize it to multiples of {th} first (the pipelines floor to them)")
    return height // th, width // tw


def encode_to_grid(params: VAEParams, config: VAEConfig, images: Float[Array, "B H W Cin"], *,
                   runtime: RuntimeOptions | None = None) -> Float[Array, "B Hl Wl P"]:
    """Images [B, H, W, 3] in [-1, 1] -> normalised, patchified latents [B, H/16, W/16, 128].

    What diffusers' Flux2 pipelines do to a reference image (`_encode_vae_image`, channels-last)
    and BFL's `AutoEncoder.encode`: posterior mean, patchify, normalise.
    """
    token_grid(config, images.shape[1], images.shape[2])
    z = patchify(encode(params, config, images, runtime=runtime_options(runtime)), config.patch_size)
    return normalize(params, config, z)


def encode_to_tokens(params: VAEParams, config: VAEConfig, images: Float[Array, "B H W Cin"], *,
                     runtime: RuntimeOptions | None = None) -> Float[Array, "B N P"]:
    """Images [B, H, W, 3] in [-1, 1] -> normalised packed tokens [B, (H/16) * (W/16), 128]
    (`encode_to_grid`, then `pack`, as diffusers' `_pack_latents`)."""
    return pack(encode_to_grid(params, config, images, runtime=runtime_options(runtime)))


def decode_tokens(params: VAEParams, config: VAEConfig, tokens: Float[Array, "B N P"], height: int, width: int,
                  *, runtime: RuntimeOptions | None = None) -> Float[Array, "B H W Cout"]:
    """Normalised packed tokens of an H x W image -> images [B, H, W, 3], not clamped.

    The decode branch of diffusers' Flux2 pipelines (and BFL's `AutoEncoder.decode`): unpack,
    denormalise, unpatchify, decode. Clamping to [-1, 1] and mapping to uint8 is the caller's.
    """
    return decode(params, config, latent_grid(params, config, tokens, token_grid(config, height, width)),
                  runtime=runtime_options(runtime))


def latent_grid(params: VAEParams, config: VAEConfig, tokens: Float[Array, "B N P"],
                grid: tuple[int, int]) -> Float[Array, "B h w c"]:
    """Normalised packed tokens on the token grid (Hl, Wl) -> VAE latents [B, 2 Hl, 2 Wl, c]: unpack,
    denormalise, unpatchify (what `decode` reads)."""
    return unpatchify(denormalize(params, config, unpack(tokens, grid)), config.patch_size)


def diffusers_latents(params: VAEParams, config: VAEConfig, tokens: Float[Array, "B N P"],
                      grid: tuple[int, int]) -> Float[Array, "B c h w"]:
    """The sampler's latents (normalised packed tokens on the token grid (Hl, Wl)) as the array
    `Flux2KleinPipeline` and `Flux2KleinKVPipeline` return with `output_type="latent"`: denormalised,
    unpatchified VAE latents, channels-first [B, c, 2 Hl, 2 Wl] as torch lays them out, in the
    tokens' dtype. (`Flux2Pipeline` returns the tokens themselves: no conversion.)"""
    return jnp.moveaxis(latent_grid(params, config, tokens, grid), -1, 1)

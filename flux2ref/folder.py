"""A deterministic random tiny FLUX.2 [klein] model folder in the diffusers layout.

    build_model_folder("tiny-klein/", seed=0)
    model = fluxjax.pipeline.load_model("tiny-klein/")

It holds what a real [klein] download holds: `model_index.json`, `transformer/`, `vae/`, a Qwen3
`text_encoder/` (28 layers, so hidden states 9, 18 and 27 exist), an offline byte-level BPE
`tokenizer/` with Qwen3's chat template, and `scheduler/`. Widths are tiny and weights random:
it exercises every code path, not image quality.
"""

from __future__ import annotations

import dataclasses
import os


from flux2ref.models import diffusers_kwargs, randomize_
from fluxjax.config import FLUX2_KLEIN_4B, Flux2Config
from fluxjax.files import atomic_directory

QWEN3_HIDDEN = 16
LATENT_CHANNELS = 4
TINY_KLEIN: Flux2Config = dataclasses.replace(
    FLUX2_KLEIN_4B, in_channels=4 * LATENT_CHANNELS, context_in_dim=3 * QWEN3_HIDDEN, hidden_size=64, num_heads=2,
    depth=2, depth_single_blocks=3, axes_dim=(8, 8, 8, 8))
# Tiny in width, [klein] 9B's 8 double + 24 single blocks: a folder on which commands written for the
# real model (--block 17, Capture(sites=("b17.text.output",))) check and run as they would there.
TINY_KLEIN_9B_BLOCKS: Flux2Config = dataclasses.replace(TINY_KLEIN, depth=8, depth_single_blocks=24)

CORPUS = [
    "draw a ball in this color", "draw a car in this color", "draw a chair in this color",
    "draw a couch in this color", "draw a hat in this color", "draw a mug in this color",
    "draw a pillow in this color", "draw a vase in this color", "a red chair and a blue couch",
    "make the hat purple", "add a mug on the table", "remove the vase from the picture",
    "orange yellow green pink brown", "turn this photo into a watercolor painting",
]
QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def byte_level_bpe(specials, corpus=CORPUS, vocab_size: int = 400):
    """A byte-level BPE `tokenizers.Tokenizer` trained in memory on `corpus`, with `specials`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus) * 4, trainer)
    return bpe


def qwen3_tokenizer(vocab_size: int = 400):
    """A byte-level BPE trained in memory on a fixed corpus, with Qwen3's specials and template."""
    from transformers import PreTrainedTokenizerFast

    bpe = byte_level_bpe(QWEN3_SPECIALS, CORPUS, vocab_size)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  padding_side="right")
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def qwen3_model(vocab_size: int, seed: int = 0, num_layers: int = 28, hidden: int = QWEN3_HIDDEN):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    return randomize_(Qwen3ForCausalLM(config), seed).eval()


def tiny_vae(seed: int = 0):
    """A random `AutoencoderKLFlux2` with FLUX.2's 8x downsampling and 4 latent channels."""
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                             latent_channels=LATENT_CHANNELS, norm_num_groups=4).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    return vae


def tiny_klein_pipeline(seed: int = 0, config: Flux2Config = TINY_KLEIN):
    """A `Flux2KleinPipeline` (distilled) of random tiny components, fp32."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    torch.manual_seed(seed)
    tokenizer = qwen3_tokenizer()
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=tiny_vae(seed + 1),
        text_encoder=qwen3_model(len(tokenizer), seed + 2), tokenizer=tokenizer,
        transformer=randomize_(Flux2Transformer2DModel(**diffusers_kwargs(config)).eval(), seed + 3),
        is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_model_folder(path: str | os.PathLike, seed: int = 0, *, overwrite: bool = False,
                       config: Flux2Config = TINY_KLEIN) -> str:
    """Write a random tiny [klein] model folder at `path` (atomically) and return its path; `config`
    the transformer's (e.g. TINY_KLEIN_9B_BLOCKS)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    with atomic_directory(path, replace=overwrite) as tmp:
        tiny_klein_pipeline(seed, config).save_pretrained(tmp, safe_serialization=True)
    return path

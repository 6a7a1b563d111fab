"""Tiny random text encoders with offline tokenizers, shaped like the FLUX.2 ones.

No model or tokenizer files can be downloaded, so every tokenizer here is a small byte-level BPE
trained in memory, wrapped in `PreTrainedTokenizerFast`, with a chat template that renders the
one-conversation cases the pipelines use the way the real templates do:

    Qwen3 ([klein]), one user message, add_generation_prompt=True, enable_thinking=False:
        <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n
    Mistral-Small-3.1 ([dev]), a system message then a user message (text parts):
        <s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{prompt}[/INST]

Padding: right for Qwen3, left for Mistral (spec section 7). Models have enough layers for the
hidden states the pipelines read (27 for Qwen3, 30 for Mistral), tiny widths, random weights.
"""

from __future__ import annotations

import functools

CORPUS = [
    "draw a ball in this color", "draw a car in this color", "a red chair and a blue couch",
    "make the hat purple", "add a mug on the table", "remove the vase from the picture",
    "turn this photo into a watercolor painting", "a cat holding a sign that says hello world",
    "You are an AI that reasons about image descriptions.", "structured responses focusing on object",
    "attribution and actions without speculation", "the quick brown fox jumps over the lazy dog",
    "café crème brûlée, naïve façade", "pillow, orange, yellow, green, pink, brown",
]

from flux2ref.folder import QWEN3_SPECIALS, QWEN3_TEMPLATE, byte_level_bpe  # noqa: E402  (one copy of the Qwen3 template)

MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set text = message.content if message.content is string else "
    "(message.content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) %}"
    "{%- if message.role == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message.role == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


@functools.lru_cache(maxsize=None)
def metaspace_tokenizer():
    """A sentencepiece-style tokenizer (words carry a leading "▁"; decoding a token alone drops its
    space), with the Qwen3 template: the decoded pieces do not concatenate to the rendered text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                            special_tokens=["<unk>"] + QWEN3_SPECIALS))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", unk_token="<unk>",
                                  padding_side="right")
    tok.chat_template = QWEN3_TEMPLATE
    return tok


@functools.lru_cache(maxsize=None)
def qwen3_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(QWEN3_SPECIALS, CORPUS), pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", padding_side="right")
    tok.chat_template = QWEN3_TEMPLATE
    return tok


@functools.lru_cache(maxsize=None)
def mistral_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(MISTRAL_SPECIALS, CORPUS), bos_token="<s>",
                                  eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", padding_side="left")
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


def mistral_processor():
    """The smallest object `Flux2Pipeline` accepts as its `tokenizer` (an `AutoProcessor` for the real
    model, a `PixtralProcessor`, which needs torchvision): the pipeline only calls its
    `apply_chat_template(..., tokenize=True, return_dict=True, padding="max_length", ...)`, which a
    fast tokenizer with the chat template provides."""
    return mistral_tokenizer()


def _randomize(model, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if p.ndim == 1
                    else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.eval()


def qwen3_model(seed: int = 0, num_layers: int = 28, hidden: int = 16):
    """A random `Qwen3ForCausalLM` with `num_layers` decoder layers (hidden_states 9, 18, 27 exist)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(qwen3_tokenizer()), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    return _randomize(Qwen3ForCausalLM(config), seed)


def mistral3_model(seed: int = 0, num_layers: int = 31, hidden: int = 16):
    """A random `Mistral3ForConditionalGeneration` (hidden_states 10, 20, 30 exist)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(vocab_size=len(mistral_tokenizer()), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024)
    vision = PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                                 head_dim=8, patch_size=4, image_size=32)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=mistral_tokenizer().convert_tokens_to_ids("[IMG]"),
                            spatial_merge_size=1)
    config._attn_implementation = "eager"
    return _randomize(Mistral3ForConditionalGeneration(config), seed)

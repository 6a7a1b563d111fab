"""The hf: judge end to end over a run folder, on tiny LLaVA models built offline from configs.

No weights can be downloaded, so the tokenizer is a small byte-level BPE trained in memory (as in
tests/text_fixtures.py), with a chat template that puts each image's placeholder where the
message has it; the image processor is CLIP's PIL one at 16 x 16 (16 patches of 4 x 4 per image).
Two models share that processor: one with random weights (its answers are noise: every one is
unparseable, counted as such and never cached) and one rigged to always say the same small JSON
answer (every residual branch zeroed and all token embeddings equal, so the last hidden state is
one constant vector, and only the answer token's output row points along it): its verdicts parse,
are cached, and a second pass asks nothing.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from experiments import judge, judges
from test_judge import build_run, judged_rows, verdict_files  # noqa: E402  (tests/ is on sys.path)

ANSWER = '{"answer": "yes", "reason": "a rigged model always says yes"}'
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for part in message.content %}"
    "{%- if part.type == 'image' %}{{- '<image>' }}{%- elif part.type == 'text' %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
IMAGE_SIDE, PATCH = 16, 4
TOKENS_PER_IMAGE = (IMAGE_SIDE // PATCH) ** 2


@functools.lru_cache(maxsize=None)
def processor():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([judge.QUESTIONS.system, "Image 1: the reference image", ANSWER] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.add_tokens([ANSWER])  # one ordinary token: the rigged model's whole answer
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIDE},
                                   crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    # "default" drops the vision tower's CLS token, so one placeholder per patch
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, chat_template=TEMPLATE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


def tiny_llava(rigged: bool):
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    tok = processor().tokenizer
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    text = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                       eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMAGE_SIDE, patch_size=PATCH)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=ids["<image>"],
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    if rigged:
        answer = tok.convert_tokens_to_ids(ANSWER)
        with torch.no_grad():
            lm = model.model.language_model
            for layer in lm.layers:  # residual branches off: the last hidden state is the token's embedding
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            lm.embed_tokens.weight.fill_(1.0)  # every token the same embedding...
            model.lm_head.weight.zero_()
            model.lm_head.weight[answer] = 1.0  # ...along which only the answer's row points
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name in ("random", "rigged"):
        folder = tmp_path_factory.mktemp(name)
        tiny_llava(name == "rigged").save_pretrained(folder)
        processor().save_pretrained(folder)
        out[name] = folder
    return out


def test_hf_judge_shows_every_image_in_order(models, tmp_path):
    j = judges.make_judge(f"hf:{models['random']}", max_tokens=4)
    run_path = build_run(tmp_path)
    item = next(it for it in judge.items(run_path) if it.kind == "transferred")
    p = judge.prompt(run_path, item, judge.QUESTIONS)
    inputs = j.inputs(p)
    assert inputs["pixel_values"].shape[0] == 4
    ids = inputs["input_ids"][0].tolist()
    image_token = j.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_token) == 4 * TOKENS_PER_IMAGE
    text = j.processor.tokenizer.decode(ids)
    positions = [text.index(im.label) for im in p.images] + [text.index(p.question)]
    assert positions == sorted(positions) and text.index(judge.QUESTIONS.system) < positions[0]


def test_hf_judge_end_to_end_over_a_run_folder(models, tmp_path):
    run_path = build_run(tmp_path)
    n = judged_rows(run_path)

    noise = judge.score(run_path, judges.make_judge(f"hf:{models['random']}", max_tokens=6))
    assert noise.calls == n
    total = {k: sum(r[k] for r in noise.rates) for k in ("unparseable", "errors", "judged")}
    assert total == {"unparseable": n, "errors": 0, "judged": 0}
    rows = [r for rs in verdict_files(noise.folder).values() for r in rs]
    assert len(rows) == n and all(r["pass"] == "" and r["reason"].startswith("PARSE_ERROR") for r in rows)
    assert all(int(r["input_tokens"]) > 3 * TOKENS_PER_IMAGE and r["output_tokens"] == "6" for r in rows)
    assert judge.score(run_path, judges.make_judge(f"hf:{models['random']}", max_tokens=6)).calls == n  # not cached

    rigged = judges.make_judge(f"hf:{models['rigged']}", max_tokens=2)
    said = judge.score(run_path, rigged)
    assert said.calls == n and sum(r["judged"] for r in said.rates) == sum(r["passed"] for r in said.rates) == n
    rows = [r for rs in verdict_files(said.folder).values() for r in rs]
    assert {r["reason"] for r in rows} == {json.loads(ANSWER)["reason"]}
    assert {r["model"] for r in rows} == {f"hf:{models['rigged'].resolve()}"}
    again = judge.score(run_path, rigged)
    assert again.calls == 0 and again.cached == n
    assert judge.agreement(run_path, rigged.name, judge.METRIC)["overall"]["n"] == judged_rows(run_path, True)
    assert np.isclose(sum(r["judge_rate"] for r in said.rates if r["judged"]), sum(1 for r in said.rates if r["judged"]))

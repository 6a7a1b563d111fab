"""Text conditioning: parity with the diffusers pipelines' own `encode_prompt` on tiny random Qwen3 and
Mistral3 encoders, the content mask, and the on-disk cache."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import text_fixtures as fx

from fluxjax import text

PROMPTS = ["draw a ball in this color", "café crème: make the hat purple"]
# Prompts whose text also occurs in the template ("user", "assistant", "INST"), with odd spacing,
# non-ASCII characters split by byte-level BPE, or empty.
MASK_PROMPTS = PROMPTS + ["user", "assistant", " add a mug  ", "INST", "naïve façade ✓", "a a a", ""]


@pytest.fixture(scope="module")
def qwen3():
    return fx.qwen3_model(seed=0), fx.qwen3_tokenizer()


@pytest.fixture(scope="module")
def mistral3():
    return fx.mistral3_model(seed=1), fx.mistral_processor()


def _klein_pipeline(model, tokenizer):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=model,
                              tokenizer=tokenizer, transformer=None)


def _dev_pipeline(model, processor):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=model,
                         tokenizer=processor, transformer=None)


@pytest.mark.parity
def test_system_message_is_the_pipelines():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    assert text.SYSTEM_MESSAGE == SYSTEM_MESSAGE


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["qwen3", "mistral3"])
def test_embeddings_equal_pipeline_encode_prompt(kind, qwen3, mistral3):
    import torch
    if kind == "qwen3":
        model, tok = qwen3
        encoder, pipe = text.qwen3_encoder(model, tok), _klein_pipeline(model, tok)
    else:
        model, tok = mistral3
        encoder, pipe = text.mistral3_encoder(model, tok), _dev_pipeline(model, tok)
    for prompt in PROMPTS:  # one prompt: the same computation, bit for bit
        with torch.no_grad():
            want, want_ids = pipe.encode_prompt(prompt=prompt, device=torch.device("cpu"))
        got = encoder.encode(prompt)
        assert got.embeds.shape == (1, 512, 3 * model.config.get_text_config().hidden_size)
        np.testing.assert_array_equal(got.embeds, want.numpy())
        np.testing.assert_array_equal(got.txt_ids, want_ids[0].numpy())
    # a batch: the pipeline runs it in one forward, we run prompt by prompt
    with torch.no_grad():
        want, _ = pipe.encode_prompt(prompt=PROMPTS, device=torch.device("cpu"))
    np.testing.assert_allclose(encoder.encode(PROMPTS).embeds, want.numpy(), rtol=1e-6, atol=1e-6)


def _expected_mask(tokenizer, rendered: str, prefix: str, prompt: str, padding_side: str):
    """Independent of the decoded-string matching: the tokenizer's own character offsets."""
    start, stop = len(prefix), len(prefix) + len(prompt)
    assert rendered[start:stop] == prompt
    enc = tokenizer(rendered, return_offsets_mapping=True, add_special_tokens=False)
    mask = np.array([s < stop and e > start for s, e in enc["offset_mapping"]], bool)
    pad = np.zeros(512 - mask.size, bool)
    return np.concatenate([mask, pad] if padding_side == "right" else [pad, mask])


@pytest.mark.parametrize("kind", ["qwen3", "mistral3"])
def test_content_mask_marks_exactly_the_instruction(kind, qwen3, mistral3):
    model, tok = qwen3 if kind == "qwen3" else mistral3
    encoder = text.qwen3_encoder(model, tok) if kind == "qwen3" else text.mistral3_encoder(model, tok)
    for prompt in MASK_PROMPTS:
        ids, attn = encoder.tokenize(prompt)
        mask = encoder.content_mask(prompt, ids, attn)
        if kind == "qwen3":
            prefix = "<|im_start|>user\n"
            rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
        else:
            prefix = "<s>[SYSTEM_PROMPT]" + text.SYSTEM_MESSAGE + "[/SYSTEM_PROMPT][INST]"
            rendered = prefix + prompt + "[/INST]"
        np.testing.assert_array_equal(mask, _expected_mask(tok, rendered, prefix, prompt, tok.padding_side),
                                      err_msg=f"prompt {prompt!r}")
        decoded = tok.decode(ids[0][mask].tolist())
        assert "".join(decoded.split()) == "".join(prompt.split())
        if prompt.strip():
            assert mask.any() and np.all(np.diff(np.flatnonzero(mask)) == 1)  # one contiguous span
            assert np.asarray(attn[0])[mask].all()  # never a pad token
        else:
            assert not mask.any()


def test_content_mask_with_a_decoder_that_drops_spaces(qwen3):
    model, _ = qwen3
    tok = fx.metaspace_tokenizer()
    encoder = text.qwen3_encoder(model, tok)
    for prompt in ["draw a ball in this color", "a red chair and a blue couch"]:
        ids, attn = encoder.tokenize(prompt)
        pieces = [tok.decode([t]) for t in ids[0][attn[0].bool()].tolist()]
        assert prompt not in "".join(pieces)  # the exact match cannot work here
        mask = encoder.content_mask(prompt, ids, attn)
        span = np.flatnonzero(mask)
        squash = lambda s: "".join(s.split())
        assert squash(tok.decode(ids[0][span].tolist())) == squash(prompt)
        assert squash(tok.decode(ids[0][span[1:]].tolist())) != squash(prompt)  # minimal at both ends
        assert squash(tok.decode(ids[0][span[:-1]].tolist())) != squash(prompt)


def test_cache_returns_identical_arrays_without_rerunning(qwen3, tmp_path):
    model, tok = qwen3
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        encoder = text.qwen3_encoder(model, tok)
        first = encoder.encode(["draw a car", "remove the vase", "draw a car"], cache_dir=tmp_path)
        assert len(calls) == 2  # the repeated prompt is read back from disk
        again = text.qwen3_encoder(model, tok).encode(["remove the vase", "draw a car"], cache_dir=tmp_path)
        assert len(calls) == 2
        for field in ("embeds", "content_mask", "input_ids", "attention_mask"):
            np.testing.assert_array_equal(getattr(again, field), getattr(first, field)[[1, 0]])
        np.testing.assert_array_equal(first.embeds[0], encoder.encode("draw a car").embeds[0])
        assert len(calls) == 3  # without a cache directory the encoder runs
        # other layers or another encoder: other keys
        text.qwen3_encoder(model, tok, layers=(1, 2, 3)).encode("draw a car", cache_dir=tmp_path)
        assert len(calls) == 4
        assert not list(tmp_path.glob("*.tmp"))
    finally:
        hook.remove()
    other = fx.qwen3_model(seed=5)
    assert text.qwen3_encoder(other, tok).identity != encoder.identity


def test_bfloat16_features_survive_the_cache(tmp_path):
    import torch
    import ml_dtypes

    model = fx.qwen3_model(seed=2, num_layers=10).to(torch.bfloat16)
    encoder = text.qwen3_encoder(model, fx.qwen3_tokenizer(), layers=(3, 6, 9))
    first = encoder.encode("draw a mug", cache_dir=tmp_path)
    assert first.embeds.dtype == ml_dtypes.bfloat16
    again = encoder.encode("draw a mug", cache_dir=tmp_path)
    assert again.embeds.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(again.embeds.view(np.uint16), first.embeds.view(np.uint16))


def test_bad_layers_raise(qwen3):
    model, tok = qwen3
    with pytest.raises(ValueError, match="hidden_states 0..28"):
        text.qwen3_encoder(model, tok, layers=(9, 18, 40))


@pytest.mark.processes
def test_library_modules_do_not_import_torch():
    code = ("import sys; import fluxjax, fluxjax.text, fluxjax.sampler, fluxjax.images, fluxjax.schedule; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

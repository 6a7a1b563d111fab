"""Text conditioning: prompts -> the [B, 512, 3h] features FLUX.2 reads, through Hugging Face models.

    encoder = fluxjax.text.qwen3_encoder(model, tokenizer)            # [klein]: Qwen3, layers 9, 18, 27
    cond = encoder.encode(["draw a ball in this color"], cache_dir="~/.cache/fluxjax-text")
    cond.embeds        # [B, 512, 3h] in the encoder's dtype
    cond.content_mask  # bool [B, 512]: True at the instruction's own tokens
    cond.txt_ids       # int32 [512, 4]: (0, 0, 0, l)

The prompt formatting follows the diffusers pipelines (spec section 7):

    [klein] `Flux2KleinPipeline._get_qwen3_prompt_embeds`: one user message, rendered with
            apply_chat_template(tokenize=False, add_generation_prompt=True, enable_thinking=False),
            then tokenised with padding="max_length", truncation=True, max_length=512.
    [dev]   `Flux2Pipeline._get_mistral_3_small_prompt_embeds`: the system message then the user
            message ("[IMG]" removed), as content parts, through the processor's
            apply_chat_template(add_generation_prompt=False, tokenize=True, padding="max_length",
            truncation=True, max_length=512).

The encoder sees the attention mask; the transformer later sees all 512 positions unmasked. The
selected hidden states are stacked so that channel = slot * h + d, slot in layer order.

torch (and transformers) are imported inside this module's functions only. Each prompt runs
through the encoder on its own, so its features never depend on batch mates (the pipelines
batch; the two agree to float rounding), and the on-disk cache can store prompts one by one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence

import numpy as np

MAX_LENGTH = 512
QWEN3_LAYERS = (9, 18, 27)
MISTRAL3_LAYERS = (10, 20, 30)
# diffusers `pipelines/flux2/system_messages.py` SYSTEM_MESSAGE (BFL's), newline included.
SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                  "object relationships, object\nattribution and actions without speculation.")
KINDS = ("qwen3", "mistral3")


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """Encoded prompts, ready for `fluxjax.sample` and for the interventions' token groups."""

    embeds: np.ndarray  # [B, T, 3h], the encoder's dtype (bfloat16 as ml_dtypes.bfloat16)
    content_mask: np.ndarray  # bool [B, T]: the instruction's own tokens (text[content])
    txt_ids: np.ndarray  # int32 [T, 4]: text token l has (0, 0, 0, l), as TokenLayout.txt_ids
    input_ids: np.ndarray  # int64 [B, T]: the token ids the encoder saw
    attention_mask: np.ndarray  # int64 [B, T]: the encoder's attention mask (1 = real token)


def text_ids(length: int) -> np.ndarray:
    ids = np.zeros((length, 4), np.int32)
    ids[:, 3] = np.arange(length)
    return ids


class TextEncoder:
    """A Hugging Face text encoder and its tokenizer (Qwen3) or processor (Mistral3), FLUX.2 style.

    identity: a string that names this encoder in the cache key. None derives it from the model
    config, dtype, tokenizer settings and a sample of every weight tensor, so two different
    checkpoints (or two random models) never share cache entries.
    """

    def __init__(self, model, tokenizer, kind: str, layers: Sequence[int], max_length: int = MAX_LENGTH,
                 system_message: str = SYSTEM_MESSAGE, identity: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown text encoder kind {kind!r}; use one of {KINDS}")
        num_layers = _num_hidden_layers(model)
        bad = [k for k in layers if not 0 <= k <= num_layers]
        if bad:
            raise ValueError(f"hidden-state indices {bad} do not exist: this model has hidden_states 0..{num_layers}")
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self.layers, self.max_length, self.system_message = tuple(int(k) for k in layers), int(max_length), system_message
        self.identity = identity if identity is not None else _fingerprint(self)
        self._empty_text = None

    # tokenisation ---------------------------------------------------------------------------

    def tokenize(self, prompt: str):
        """(input_ids, attention_mask), torch [1, max_length], exactly as the pipeline builds them."""
        if self.kind == "qwen3":
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
            inputs = self.tokenizer(text, return_tensors="pt", padding="max_length", truncation=True,
                                    max_length=self.max_length)
        else:
            messages = [{"role": "system", "content": [{"type": "text", "text": self.system_message}]},
                        {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]}]
            inputs = self.tokenizer.apply_chat_template([messages], add_generation_prompt=False, tokenize=True,
                                                        return_dict=True, return_tensors="pt", padding="max_length",
                                                        truncation=True, max_length=self.max_length)
        return inputs["input_ids"], inputs["attention_mask"]

    def _decoder(self):
        return getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a processor wraps its tokenizer

    def content_mask(self, prompt: str, input_ids, attention_mask) -> np.ndarray:
        """bool [T]: the instruction's own tokens in one tokenised prompt.

        Found on decoded strings, as BPE merges differ in context: the real tokens are decoded one
        by one (tokens that only together form a character are kept together), whitespace is
        kept (or ignored if the decoder changes it), and the instruction is located where it sits
        in the template, i.e. where the decoded prompt equals the decoded empty prompt with the
        instruction inserted. The span runs from the first to the last token whose text overlaps
        the instruction; a token that merges an edge character of the instruction with template
        text counts as content. An empty instruction has no content tokens.
        """
        if self.kind == "mistral3":
            prompt = prompt.replace("[IMG]", "")
        ids = np.asarray(input_ids).reshape(-1)
        real = np.flatnonzero(np.asarray(attention_mask).reshape(-1))
        pieces = _decoded_pieces(self._decoder(), ids[real])
        if self._empty_text is None:
            empty_ids, empty_mask = self.tokenize("")
            e_ids, e_mask = np.asarray(empty_ids).reshape(-1), np.asarray(empty_mask).reshape(-1)
            self._empty_text = "".join(p for p, _ in _decoded_pieces(self._decoder(), e_ids[np.flatnonzero(e_mask)]))
        full = "".join(p for p, _ in pieces)
        # Exact strings first; ignoring whitespace if the decoder drops or adds some (e.g. the
        # leading space of a sentencepiece token decoded alone).
        for norm in (lambda s: s, _squash):
            start = _locate(norm(full), norm(self._empty_text), norm(prompt))
            if start is not None:
                break
        else:
            raise ValueError(f"cannot find the instruction {prompt!r} in its tokenised prompt: is it longer than "
                             f"{self.max_length} tokens with the template, or changed by the tokenizer's normaliser?")
        stop = start + len(norm(prompt))
        hits, pos = [], 0
        for text, tokens in pieces:
            n = len(norm(text))
            if n and pos < stop and pos + n > start:
                hits += tokens
            pos += n
        mask = np.zeros(ids.shape[0], bool)
        if hits:  # one contiguous span, whitespace-only tokens inside it included
            mask[real[min(hits):max(hits) + 1]] = True
        return mask

    # encoding --------------------------------------------------------------------------------

    def _hidden_features(self, input_ids, attention_mask) -> np.ndarray:
        import torch

        with torch.inference_mode():
            device = next(self.model.parameters()).device
            out = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             output_hidden_states=True, use_cache=False)
            h = torch.stack([out.hidden_states[k] for k in self.layers], dim=1).to(self.model.dtype)  # [B, 3, T, h]
            b, n, t, d = h.shape
            feats = h.permute(0, 2, 1, 3).reshape(b, t, n * d).cpu()
        return _to_numpy(feats)

    def encode_one(self, prompt: str) -> dict[str, np.ndarray]:
        input_ids, attention_mask = self.tokenize(prompt)
        return dict(embeds=self._hidden_features(input_ids, attention_mask)[0],
                    content_mask=self.content_mask(prompt, input_ids, attention_mask),
                    input_ids=np.asarray(input_ids[0], np.int64), attention_mask=np.asarray(attention_mask[0], np.int64))

    def encode(self, prompts: str | Sequence[str], cache_dir: str | os.PathLike | None = None) -> TextConditioning:
        """Encode prompts (each once: with `cache_dir`, prompts already on disk are read, not run)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        rows = [self._cached(p, cache_dir) if cache_dir is not None else self.encode_one(p) for p in prompts]
        stack = lambda k: np.stack([r[k] for r in rows])
        return TextConditioning(embeds=stack("embeds"), content_mask=stack("content_mask"),
                                txt_ids=text_ids(rows[0]["embeds"].shape[0]), input_ids=stack("input_ids"),
                                attention_mask=stack("attention_mask"))

    # cache -------------------------------------------------------------------------------------

    def cache_key(self, prompt: str) -> str:
        key = dict(encoder=self.identity, prompt=prompt, max_length=self.max_length, layers=list(self.layers))
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def _cached(self, prompt: str, cache_dir) -> dict[str, np.ndarray]:
        cache_dir = os.path.expanduser(os.fspath(cache_dir))
        path = os.path.join(cache_dir, self.cache_key(prompt) + ".npz")
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as f:
                if str(f["prompt"]) == prompt and str(f["encoder"]) == self.identity:
                    return _unpack_row(f)
        row = self.encode_one(prompt)
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, prompt=np.asarray(prompt), encoder=np.asarray(self.identity), **_pack_row(row))
            os.replace(tmp, path)  # atomic: readers see the old file, no file, or the whole new one
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return row


def qwen3_encoder(model, tokenizer, layers: Sequence[int] = QWEN3_LAYERS, max_length: int = MAX_LENGTH,
                  identity: str | None = None) -> TextEncoder:
    """[klein]: a `Qwen3ForCausalLM` (Qwen3-4B for klein 4B, Qwen3-8B for 9B) and its tokenizer."""
    return TextEncoder(model, tokenizer, "qwen3", layers, max_length, identity=identity)


def mistral3_encoder(model, processor, layers: Sequence[int] = MISTRAL3_LAYERS, max_length: int = MAX_LENGTH,
                     system_message: str = SYSTEM_MESSAGE, identity: str | None = None) -> TextEncoder:
    """[dev]: a `Mistral3ForConditionalGeneration` and its processor (or any object with the
    processor's `apply_chat_template`)."""
    return TextEncoder(model, processor, "mistral3", layers, max_length, system_message, identity)


# helpers --------------------------------------------------------------------------------------


def _num_hidden_layers(model) -> int:
    config = model.config
    config = getattr(config, "text_config", None) or config
    return int(config.num_hidden_layers)


def _squash(text: str) -> str:
    return "".join(text.split())


def _decoded_pieces(tokenizer, ids) -> list[tuple[str, list[int]]]:
    """Decode tokens one by one; tokens that only together form a character (a multi-byte UTF-8
    sequence split by byte-level BPE) are decoded together. Returns (text, token indices) pieces."""
    decode = lambda seq: tokenizer.decode([int(t) for t in seq], skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False)
    pieces, i = [], 0
    while i < len(ids):
        j = i + 1
        while "\ufffd" in decode(ids[i:j]) and j < len(ids) and j - i < 4:  # a character has <= 4 bytes
            j += 1
        if "\ufffd" in decode(ids[i:j]):
            j = i + 1  # a genuine replacement character, or bytes that never complete: one token alone
        pieces.append((decode(ids[i:j]), list(range(i, j))))
        i = j
    return pieces


def _locate(full: str, empty: str, instruction: str) -> int | None:
    """Index where `instruction` sits in `full`, given full = empty[:k] + instruction + empty[k:]."""
    n = len(instruction)
    if len(full) != len(empty) + n:
        return None
    found, start = None, full.find(instruction)
    while start != -1:
        if full[:start] == empty[:start] and full[start + n:] == empty[start:]:
            found = start  # the last consistent split (they all denote the same text)
        start = full.find(instruction, start + 1)
    return found


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _pack_row(row):
    out = dict(row)
    e = row["embeds"]
    out["embeds"] = e.view(np.uint16) if e.dtype.name == "bfloat16" else e
    out["embeds_dtype"] = np.asarray(e.dtype.name)
    return out


def _unpack_row(f) -> dict[str, np.ndarray]:
    embeds = f["embeds"]
    if str(f["embeds_dtype"]) == "bfloat16":
        import ml_dtypes

        embeds = embeds.view(ml_dtypes.bfloat16)
    return dict(embeds=embeds, content_mask=f["content_mask"], input_ids=f["input_ids"],
                attention_mask=f["attention_mask"])


def _fingerprint(encoder: TextEncoder) -> str:
    """sha256 of what makes two encoders compute different features."""
    import torch

    h = hashlib.sha256()
    model, tok = encoder.model, encoder._decoder()
    meta = dict(kind=encoder.kind, cls=type(model).__name__, config=model.config.to_json_string(use_diff=False),
                dtype=str(model.dtype), template=getattr(encoder.tokenizer, "chat_template", None),
                vocab=len(tok), padding_side=getattr(tok, "padding_side", None), system=encoder.system_message)
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()


def load_text_encoder(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, kind: str,
                      torch_dtype=None, text_encoder_out_layers: Sequence[int] | None = None,
                      max_length: int = MAX_LENGTH) -> TextEncoder:
    """Load a model folder's `text_encoder/` and `tokenizer/` with Hugging Face transformers.

    text_encoder_out_layers: the hidden states stacked into the features, as the diffusers
    pipelines' argument of that name (None: the pipeline's default, QWEN3_LAYERS or MISTRAL3_LAYERS).
    max_length: the text tokens every prompt is padded (or cut) to, the pipelines' max_sequence_length
    (512 by default, theirs).

    kind: "qwen3" ([klein]: `Qwen3ForCausalLM` + tokenizer) or "mistral3" ([dev]:
    `Mistral3ForConditionalGeneration` + `AutoProcessor`). torch_dtype None keeps the stored dtype.
    """
    import torch  # noqa: F401  (the one place fluxjax needs torch)
    import transformers

    for path in (model_dir, tokenizer_dir):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} is missing: the model folder needs text_encoder/ and tokenizer/")
    dtype = torch_dtype if torch_dtype is not None else "auto"
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        return qwen3_encoder(model.eval(), tokenizer, layers=text_encoder_out_layers or QWEN3_LAYERS,
                             max_length=max_length)
    if kind == "mistral3":
        model = transformers.Mistral3ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
        try:
            processor = transformers.AutoProcessor.from_pretrained(tokenizer_dir)
        except (OSError, ValueError, ImportError):
            processor = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        return mistral3_encoder(model.eval(), processor, layers=text_encoder_out_layers or MISTRAL3_LAYERS,
                                max_length=max_length)
    raise ValueError(f"unknown text encoder kind {kind!r}; use one of {KINDS}")

"""Judges: who answers one yes/no question about a bundle of labelled images.

A judge is named by a spec string:

    anthropic:MODEL[@URL]  the Anthropic Messages API through the `anthropic` SDK. Key:
                           ANTHROPIC_API_KEY. URL: the SDK's default (ANTHROPIC_BASE_URL, else
                           api.anthropic.com) unless given.
    openai:MODEL@URL       any OpenAI-compatible chat-completions server (vLLM or SGLang serving
                           an open VLM, or OpenAI itself) at base URL URL (e.g.
                           http://localhost:8000/v1), through the `openai` SDK. Key:
                           OPENAI_API_KEY, optional (local servers usually need none).
    hf:PATH                a local Hugging Face vision-language model run in-process with
                           transformers (AutoModelForImageTextToText + AutoProcessor), greedy.
    colour                 rule-based: the automatic colour metric of `fluxjax.metrics` answering
                           the question from the bundle's images alone. Deterministic; scores
                           colour rows only.

Every judge answers `ask(prompt) -> Reply` with the raw text it produced and its token counts;
parsing the answer is the caller's business (`experiments.judge.parse_answer`), so the colour
judge goes through the same path as a VLM. Transport failures that persist after the retries
raise `JudgeError`; a rejected key raises `JudgeAuthError` (every later call would fail the
same way). Keys are read from the environment only and never appear in an error message: the
messages are built from status codes and exception class names, and scrubbed of the key anyway.

Retries (API judges): HTTP 408, 409, 429, 5xx (529: overloaded) and connection failures are
retried with exponential backoff (`Retry`; a server's retry-after header is honoured up to
`max_delay`), then recorded as errors. The SDKs' own retries are switched off so the count is
ours. Other 4xx and malformed response bodies are errors at once.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

KINDS = ("present", "lost", "kept", "transferred")
IMAGES_PER_KIND = {"present": 3, "lost": 3, "kept": 3, "transferred": 4}
MAX_TOKENS = 300  # answer budget: a one-line JSON object with a one-sentence reason


class JudgeError(RuntimeError):
    """A judge call failed after its retries; recorded as an error, never a pass or a fail."""


class JudgeAuthError(JudgeError):
    """The judge refused the credentials (or none were given): stop, every call would fail."""


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """One image of a bundle: its label as shown to the judge, and its file (read when asked, so a
    run folder's thousands of bundles are never all in memory)."""

    label: str
    path: Path
    sha256: str  # of the file's bytes: the cache key's part
    media_type: str  # e.g. "image/png"

    @classmethod
    def of(cls, label: str, path: str | os.PathLike) -> "ImageFile":
        path = Path(path)
        return cls(label, path, hashlib.sha256(path.read_bytes()).hexdigest(), media_type(path))

    def data(self) -> bytes:
        data = self.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise JudgeError(f"{self.path} changed while it was being judged; rerun")
        return data

    def pil(self):
        from PIL import Image

        with Image.open(io.BytesIO(self.data())) as im:
            return im.convert("RGB")

    def base64(self) -> str:
        return base64.b64encode(self.data()).decode("ascii")


MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif"}


def media_type(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in MEDIA_TYPES:
        raise ValueError(f"{path}: judges take {', '.join(MEDIA_TYPES)} images; convert it first")
    return MEDIA_TYPES[suffix]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """What a judge is shown: a system instruction, labelled images in order, one question."""

    system: str
    images: tuple[ImageFile, ...]
    question: str
    kind: str  # one of KINDS: what a "yes" means (see experiments.judge)
    property: str  # "colour", "style", "identity" or "reference"
    negated: bool = False  # the question asks the kind the other way round: a "yes" means the property is absent
    source: str = "project"  # where the wording comes from (experiments.judge_questions.Question.source)


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0


class Judge(Protocol):
    name: str  # the judge's identity: the verdict files' model column and part of the cache key
    properties: frozenset[str] | None  # the properties it can score (None: any)

    def ask(self, prompt: Prompt) -> Reply: ...


# ---------------------------------------------------------------------------------------------
# retries


@dataclasses.dataclass(frozen=True)
class Retry:
    attempts: int = 6  # calls in all, the first included
    base_delay: float = 2.0  # seconds before the first retry; doubled each time
    max_delay: float = 60.0


def with_retries(call: Callable[[], Reply], retry: Retry, sleep: Callable[[float], None] = time.sleep) -> Reply:
    """`call()` until it returns, retrying `_Transient` failures; JudgeError once they persist."""
    for attempt in range(retry.attempts):
        try:
            return call()
        except _Transient as e:
            if attempt == retry.attempts - 1:
                raise JudgeError(f"{e.reason}; gave up after {retry.attempts} attempts") from None
            delay = min(retry.max_delay, retry.base_delay * 2**attempt)
            if e.retry_after is not None:
                delay = min(retry.max_delay, max(delay, e.retry_after))
            sleep(delay)
    raise ValueError(f"Retry.attempts must be at least 1, got {retry.attempts}")


def _status_failure(code: int, retry_after: str | None, service: str, key_variable: str) -> Exception:
    if code in (401, 403):
        return JudgeAuthError(f"{service} refused the credentials (HTTP {code}): check {key_variable}")
    if code in (408, 409, 429) or code >= 500:
        try:
            seconds = float(retry_after) if retry_after is not None else None
        except ValueError:
            seconds = None
        what = "rate limited" if code == 429 else "overloaded" if code == 529 else "server error"
        return _Transient(f"{service}: HTTP {code} ({what})", seconds)
    return JudgeError(f"{service}: HTTP {code} (request rejected)")


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "[key]")
    return text


class _ApiJudge:
    """The retry and error plumbing shared by the two SDK judges."""

    service = ""
    key_variable = ""
    properties = None

    def __init__(self, sdk, retry: Retry, secrets: Sequence[str]):
        self._sdk, self._retry, self._secrets = sdk, retry, tuple(secrets)

    def _once(self, prompt: Prompt) -> Reply:  # one request; raises the SDK's errors
        raise NotImplementedError

    def _call(self, prompt: Prompt) -> Reply:
        sdk = self._sdk
        try:
            return self._once(prompt)
        except sdk.APIStatusError as e:
            raise _status_failure(e.status_code, e.response.headers.get("retry-after"), self.service,
                                  self.key_variable) from None
        except sdk.APIConnectionError as e:  # timeouts included
            raise _Transient(f"{self.service}: {type(e).__name__} (no response)") from None
        except sdk.APIError as e:  # e.g. a 200 whose body is not the documented JSON
            raise JudgeError(f"{self.service}: malformed response ({type(e).__name__})") from None
        except (AttributeError, TypeError, KeyError, IndexError, ValueError) as e:
            raise JudgeError(f"{self.service}: malformed response ({type(e).__name__})") from None

    def ask(self, prompt: Prompt) -> Reply:
        try:
            return with_retries(lambda: self._call(prompt), self._retry)
        except JudgeError as e:  # belt and braces: no key in any message that leaves this class
            raise type(e)(_scrub(str(e), self._secrets)) from None


def _interleaved(prompt: Prompt, image_part) -> list[dict]:
    """A message's content parts: each image's label then the image (`image_part`, the service's
    form of it), then the question."""
    content: list[dict] = []
    for image in prompt.images:
        content += [{"type": "text", "text": image.label}, image_part(image)]
    return content + [{"type": "text", "text": prompt.question}]


class AnthropicJudge(_ApiJudge):
    service, key_variable = "Anthropic API", "ANTHROPIC_API_KEY"

    def __init__(self, model: str, base_url: str | None = None, *, max_tokens: int = MAX_TOKENS,
                 retry: Retry = Retry(), timeout: float = 120.0):
        import anthropic

        key = os.environ.get(self.key_variable)
        if not key:
            raise JudgeAuthError(f"set {self.key_variable} in the environment to use the anthropic: judge")
        super().__init__(anthropic, retry, [key])
        self.name, self.model, self.max_tokens = f"anthropic:{model}", model, max_tokens
        self._client = anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=0, timeout=timeout)

    def _once(self, prompt: Prompt) -> Reply:
        content = _interleaved(prompt, lambda image: {
            "type": "image", "source": {"type": "base64", "media_type": image.media_type, "data": image.base64()}})
        r = self._client.messages.create(model=self.model, max_tokens=self.max_tokens, system=prompt.system,
                                         messages=[{"role": "user", "content": content}])
        text = "".join(block.text for block in r.content if block.type == "text")
        return Reply(text, int(r.usage.input_tokens), int(r.usage.output_tokens))


class OpenAIJudge(_ApiJudge):
    service, key_variable = "OpenAI-compatible server", "OPENAI_API_KEY"

    def __init__(self, model: str, base_url: str, *, max_tokens: int = MAX_TOKENS, retry: Retry = Retry(),
                 timeout: float = 120.0):
        import openai

        key = os.environ.get(self.key_variable) or "none"  # servers without auth ignore the header
        super().__init__(openai, retry, [key] if key != "none" else [])
        self.name, self.model, self.max_tokens = f"openai:{model}@{base_url}", model, max_tokens
        self._client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout)

    def _once(self, prompt: Prompt) -> Reply:
        content = _interleaved(prompt, lambda image: {
            "type": "image_url", "image_url": {"url": f"data:{image.media_type};base64,{image.base64()}"}})
        r = self._client.chat.completions.create(
            model=self.model, max_tokens=self.max_tokens,
            messages=[{"role": "system", "content": prompt.system}, {"role": "user", "content": content}])
        text = r.choices[0].message.content
        if not isinstance(text, str):
            raise TypeError("no message content")
        usage = r.usage
        return Reply(text, int(usage.prompt_tokens) if usage else 0, int(usage.completion_tokens) if usage else 0)


# ---------------------------------------------------------------------------------------------
# local Hugging Face model


class HFJudge:
    """A local vision-language model (a folder in the Hugging Face layout), greedy decoding."""

    properties = None

    def __init__(self, path: str | os.PathLike, *, max_new_tokens: int = 128, device: str | None = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(path).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no config.json: give hf: the folder of a Hugging Face "
                                    "vision-language model (e.g. one saved with save_pretrained)")
        self.name, self.max_new_tokens = f"hf:{path}", max_new_tokens
        self._torch = torch
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path).eval()
        if device is not None:
            self.model.to(device)

    def inputs(self, prompt: Prompt):
        """The processor's tensors for `prompt`: system message, then label, image, ..., question."""
        user = []
        for image in prompt.images:
            user += [{"type": "text", "text": image.label}, {"type": "image"}]
        user.append({"type": "text", "text": prompt.question})
        messages = [{"role": "system", "content": [{"type": "text", "text": prompt.system}]},
                    {"role": "user", "content": user}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.processor(text=[text], images=[im.pil() for im in prompt.images], return_tensors="pt")

    def ask(self, prompt: Prompt) -> Reply:
        inputs = self.inputs(prompt).to(self.model.device)
        with self._torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        n_in = inputs["input_ids"].shape[1]
        new = out[0, n_in:]
        text = self.processor.batch_decode(new[None], skip_special_tokens=True)[0]
        return Reply(text, int(n_in), int(new.shape[0]))


# ---------------------------------------------------------------------------------------------
# rule-based colour judge


class ColourJudge:
    """The automatic colour metric answering the question (see `experiments.judge` for the kinds).

    Reference colour: `reference_colour(Image 1)` (for "transferred", Images 1 and 2: source and
    target). An image shows the colour when `colour_error(image, colour) <= COLOUR_MATCH_DE00`.
    present: Image 3 shows it and Image 2 does not. lost: Image 2 shows it and Image 3 does not.
    kept: Images 2 and 3 both show it. transferred: Image 4 is closer (CIEDE2000) to the source's
    colour than to the target's.
    """

    name = "colour"
    properties = frozenset({"colour"})

    def ask(self, prompt: Prompt) -> Reply:
        from fluxjax import metrics

        images = [im.pil() for im in prompt.images]
        if len(images) != IMAGES_PER_KIND[prompt.kind]:
            raise JudgeError(f"a {prompt.kind!r} question is about {IMAGES_PER_KIND[prompt.kind]} images, "
                             f"got {len(images)}")
        if prompt.kind == "transferred":
            source, target = metrics.reference_colour(images[0]), metrics.reference_colour(images[1])
            closer, d_source, d_target = metrics.closer_to_source(images[3], source, target)
            return _answer(closer, f"Image 4 is {d_source:.1f} from the source colour and {d_target:.1f} "
                                   "from the target colour (CIEDE2000)")
        ref = metrics.reference_colour(images[0])
        d2, d3 = metrics.colour_error(images[1], ref), metrics.colour_error(images[2], ref)
        has2, has3 = d2 <= metrics.COLOUR_MATCH_DE00, d3 <= metrics.COLOUR_MATCH_DE00
        verdict = {"present": has3 and not has2, "lost": has2 and not has3, "kept": has2 and has3}[prompt.kind]
        return _answer(verdict, f"CIEDE2000 to the reference colour: Image 2 {d2:.1f}, Image 3 {d3:.1f} "
                                f"(shown at <= {metrics.COLOUR_MATCH_DE00:g})")


def _answer(verdict: bool, reason: str) -> Reply:
    return Reply(json.dumps({"answer": "yes" if verdict else "no", "reason": reason}))


# ---------------------------------------------------------------------------------------------
# specs


SPELLINGS = {"color": "colour"}  # other spellings of a spec, accepted as the spec they spell


def name_of(spec: str) -> str:
    """The name a spec's judge goes by (its verdict folder and cache key), without building it."""
    spec = SPELLINGS.get(spec, spec)
    kind, _, rest = spec.partition(":")
    if kind == "anthropic":
        return f"anthropic:{rest.partition('@')[0]}"
    if kind == "hf":
        return f"hf:{Path(rest).expanduser().resolve()}"
    return spec


def make_judge(spec: str, *, retry: Retry = Retry(), max_tokens: int = MAX_TOKENS) -> Judge:
    """The judge a spec names (see the module docstring); `color` spells `colour`."""
    spec = SPELLINGS.get(spec, spec)
    kind, sep, rest = spec.partition(":")
    if spec == "colour":
        return ColourJudge()
    if kind == "anthropic" and sep and rest:
        model, _, url = rest.partition("@")
        return AnthropicJudge(model, url or None, max_tokens=max_tokens, retry=retry)
    if kind == "openai" and sep and rest:
        model, at, url = rest.partition("@")
        if not (model and at and url):
            raise ValueError(f"judge {spec!r}: write openai:MODEL@URL, URL the server's base URL "
                             "(e.g. openai:Qwen/Qwen2.5-VL-7B-Instruct@http://localhost:8000/v1)")
        return OpenAIJudge(model, url, max_tokens=max_tokens, retry=retry)
    if kind == "hf" and sep and rest:
        return HFJudge(rest, max_new_tokens=max_tokens)
    raise ValueError(f"unknown judge {spec!r}: use anthropic:MODEL, openai:MODEL@URL, hf:PATH or colour")

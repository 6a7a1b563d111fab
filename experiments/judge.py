"""A yes/no judge over labelled images, for scoring experiments the way the study did.

The study scored every cell with a binary VLM judge: a bundle of 2-4 labelled images and one
yes/no question. Plug any client in as a `Judge`, a callable

    judge(question: str, images: list[tuple[str, PIL.Image.Image]]) -> bool

and ask it with `ask(judge, QUESTIONS[name], images)`. Nothing here calls a network or needs a
judge: the automatic metrics in `experiments.metrics` work without one.

The questions below are this project's plain wording of the questions the study asked for each
experiment (what is shown, and what a "yes" means); they are not the study's exact prompt text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class Judge(Protocol):
    def __call__(self, question: str, images: list[tuple[str, Image.Image]]) -> bool: ...


@dataclasses.dataclass(frozen=True)
class JudgeQuestion:
    """A yes/no question about images given in the order of `labels`."""

    name: str
    labels: tuple[str, ...]
    question: str


def _q(name: str, labels: Sequence[str], question: str) -> JudgeQuestion:
    return JudgeQuestion(name, tuple(f"Image {i + 1}: {label}" for i, label in enumerate(labels)), question)


_LENS = ("the reference image given to the edit",
         "text-to-image baseline: the instruction alone, no reference",
         "text-to-image from an empty prompt, with the edit's text-token activations patched in")
_KNOCKOUT = ("the reference image",
             "the baseline edit with this reference",
             "the same edit with some attention from the reference blocked")
_PATCHING = ("the source edit's reference",
             "the target edit's reference",
             "the target edit, unchanged",
             "the target edit with the source edit's text-token activations patched in")

QUESTIONS: Mapping[str, JudgeQuestion] = {q.name: q for q in (
    # T2I Lens (and its padding-only / content-only variants): does the reference property appear?
    _q("lens_colour_present", _LENS,
       "Compared with Image 2, does Image 3 show the main colour of Image 1? Answer yes only if that "
       "colour is clearly present in Image 3 and not in Image 2."),
    _q("lens_style_present", _LENS,
       "Compared with Image 2, is Image 3 drawn in a style like that of Image 1 (illustrated, cartoon or "
       "otherwise not photographic), anywhere in the picture?"),
    _q("lens_identity_different", _LENS,
       "Is the person in Image 3 a different individual from the person in Image 1 (different face, hair "
       "or build)? Answer yes if a viewer would call them different people."),
    # Attention knockout: is the property lost (ref->text) or kept (ref->image)?
    _q("knockout_colour_lost", _KNOCKOUT,
       "Compared with Image 2, has Image 3 lost the main colour of Image 1? Answer yes if that colour is "
       "largely gone from Image 3."),
    _q("knockout_colour_kept", _KNOCKOUT,
       "Does Image 3, like Image 2, still show the main colour of Image 1?"),
    _q("knockout_style_lost", _KNOCKOUT,
       "Compared with Image 2, has Image 3 lost the style of Image 1 and become more photographic?"),
    _q("knockout_style_kept", _KNOCKOUT,
       "Does Image 3, like Image 2, still look drawn in the style of Image 1, anywhere in the picture?"),
    _q("knockout_identity_lost", _KNOCKOUT,
       "Compared with Image 2, has Image 3 lost the identity of the person in Image 1, i.e. is the person "
       "in Image 3 recognisably a different individual?"),
    _q("knockout_identity_kept", _KNOCKOUT,
       "Is the person in Image 3 still the same individual as the person in Image 1?"),
    # I2I -> I2I patching: did the source's property transfer into the target edit?
    _q("patching_colour_transfer", _PATCHING,
       "Compared with Image 3, has Image 4 taken on the main colour of Image 1 instead of that of Image 2?"),
    _q("patching_style_transfer", _PATCHING,
       "Compared with Image 3, has Image 4 moved towards the style of Image 1 (illustrated, cartoon or "
       "otherwise not photographic)?"),
    _q("patching_identity_transfer", _PATCHING,
       "Compared with Image 3, does the person in Image 4 now look like the person in Image 1 rather than "
       "the person in Image 2?"),
)}


def ask(judge: Judge, question: JudgeQuestion, images: Sequence[Image.Image]) -> bool:
    """Ask `judge` one question about `images` (in the order of `question.labels`)."""
    if len(images) != len(question.labels):
        raise ValueError(f"question {question.name!r} is about {len(question.labels)} images "
                         f"({'; '.join(question.labels)}), got {len(images)}")
    for label, image in zip(question.labels, images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"{label}: expected a PIL image, got {type(image).__name__}")
    verdict = judge(question.question, list(zip(question.labels, images)))
    if not isinstance(verdict, bool):
        raise TypeError(f"the judge must answer True or False, got {verdict!r}; parse the client's reply "
                        "into a bool inside the judge")
    return verdict


def ask_all(judge: Judge, question: JudgeQuestion, bundles: Iterable[Sequence[Image.Image]]) -> list[bool]:
    """One verdict per bundle of images."""
    return [ask(judge, question, images) for images in bundles]

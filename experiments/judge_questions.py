"""The judge's questions: one system instruction, one question per experiment x property x kind.

This project's own wording (the study's prompts are not shipped; a user can load them, or any
other wording, with `load_questions`). Every question is about the images of its kind's bundle, in
the bundle's order (see `experiments.judge`), and the system instruction asks for one line of JSON,
{"answer": "yes" | "no", "reason": "..."}, which `parse_answer` reads (with the study's
{"pass": 0 | 1, ...} too).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

from experiments.judges import IMAGES_PER_KIND

EXPERIMENTS = ("lens", "knockout", "drop", "patching")
PROPERTIES = ("colour", "style", "identity", "reference")
KINDS_OF = {"lens": ("present",), "knockout": ("lost", "kept"), "drop": ("lost", "kept"),
            "patching": ("transferred",)}


class ContractError(ValueError):
    """A run folder's rows do not carry what a judge needs (see experiments.judge), or ask a
    question that has no wording."""


# ---------------------------------------------------------------------------------------------
# questions


SYSTEM = (
    "You judge the results of an image-editing experiment. You are shown numbered, labelled "
    "images and asked one yes/no question about them. Judge only what the images show; the labels "
    "say how each image was made, not what it looks like. Reply with one JSON object on one line "
    "and nothing else: {\"answer\": \"yes\" or \"no\", \"reason\": \"one short sentence\"}. When the "
    "images do not let you decide, answer \"no\" and say why in the reason."
)

_LABELS = {
    ("lens", "present"): ("the reference image that was given to the edit",
                          "text-to-image from the instruction alone, with no reference",
                          "text-to-image from an empty prompt, with the edit's text-stream activations "
                          "patched in"),
    ("knockout", "edit"): ("the reference image", "the edit made with this reference, unchanged",
                           "the same edit with some attention paths from the reference blocked"),
    ("drop", "edit"): ("the reference image", "the edit made with this reference, unchanged",
                       "the same edit with the reference cut off from the model after an early block"),
    ("patching", "transferred"): ("the reference of the source edit", "the reference of the target edit",
                                  "the target edit, unchanged",
                                  "the target edit with the source edit's text-stream activations patched in"),
}

_QUESTION = {
    ("colour", "present"): "Is the main colour of Image 1 clearly visible in Image 3, while Image 2 does not show "
                           "that colour?",
    ("colour", "lost"): "Image 2 shows the main colour of Image 1. Has Image 3 lost that colour, so that it is "
                        "largely gone from Image 3?",
    ("colour", "kept"): "Does Image 3, like Image 2, still clearly show the main colour of Image 1?",
    ("colour", "transferred"): "Image 3 was made with Image 2 as its reference. Does Image 4 show the main colour of "
                               "Image 1 rather than that of Image 2?",
    ("style", "present"): "Is Image 3 drawn in a visual style like that of Image 1 (illustrated, cartoon, painted or "
                          "otherwise not photographic), anywhere in the picture, while Image 2 is not?",
    ("style", "lost"): "Image 2 is drawn in the visual style of Image 1. Has Image 3 lost that style and become "
                       "photographic or realistic?",
    ("style", "kept"): "Is Image 3, like Image 2, still drawn in the visual style of Image 1 (illustrated, cartoon, "
                       "painted or otherwise not photographic), anywhere in the picture?",
    ("style", "transferred"): "Image 3 was made with Image 2 as its reference. Is Image 4 drawn more in the "
                              "non-photographic style of Image 1 than Image 3 is?",
    ("identity", "present"): "Is the person in Image 3 the same individual as the person in Image 1 (same face, hair "
                             "and build), while the person in Image 2 is not?",
    ("identity", "lost"): "The person in Image 2 is the individual of Image 1. Has Image 3 lost that identity, so "
                          "that its person is recognisably a different individual?",
    ("identity", "kept"): "Is the person in Image 3, like the one in Image 2, still the same individual as the "
                          "person in Image 1?",
    ("identity", "transferred"): "Image 3 was made with Image 2 as its reference. Does the person in Image 4 look "
                                 "more like the person in Image 1 than like the person in Image 2?",
    ("reference", "present"): "Does Image 3 contain anything visibly taken from Image 1 (a colour, texture, layout, "
                              "style, distinctive shape or detail of its subject) that Image 2 does not have?",
    ("reference", "lost"): "Image 2 carries visible information from Image 1. Has Image 3 lost it, so that it no "
                           "longer shows anything specific to Image 1?",
    ("reference", "kept"): "Does Image 3, like Image 2, still show visible information taken from Image 1 (colours, "
                           "textures, layout, style, distinctive shapes or subject details)?",
    ("reference", "transferred"): "Image 3 was made with Image 2 as its reference. Does Image 4 show visible "
                                  "information from Image 1 that Image 3 does not have?",
}


@dataclasses.dataclass(frozen=True)
class Question:
    labels: tuple[str, ...]  # one per image, in bundle order, as shown ("Image 1: ...")
    question: str


@dataclasses.dataclass(frozen=True)
class Questions:
    system: str
    table: Mapping[str, Question]  # "experiment/property/kind" -> Question

    def get(self, experiment: str, prop: str, kind: str) -> Question:
        key = f"{experiment}/{prop}/{kind}"
        if key not in self.table:
            raise ContractError(f"no question for {key}; add one with --questions FILE")
        return self.table[key]


def _default_questions() -> Questions:
    table = {}
    for experiment, kinds in KINDS_OF.items():
        for kind in kinds:
            labels = _LABELS.get((experiment, kind)) or _LABELS[(experiment, "edit")]
            for prop in PROPERTIES:
                table[f"{experiment}/{prop}/{kind}"] = Question(
                    tuple(f"Image {i + 1}: {label}" for i, label in enumerate(labels)), _QUESTION[(prop, kind)])
    return Questions(SYSTEM, table)


QUESTIONS = _default_questions()


def load_questions(path: str | os.PathLike, base: Questions = QUESTIONS) -> Questions:
    """Questions from a JSON file, over `base`:

        {"system": "...",                                   (optional)
         "questions": {"knockout/style/lost": {"labels": ["Image 1 - ...", ...], "question": "..."}, ...}}

    Keys are experiment/property/kind; labels are shown as written, one per image of the kind.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not set(data) <= {"system", "questions"}:
        raise ValueError(f"{path}: expected an object with 'system' and/or 'questions'")
    table = dict(base.table)
    for key, q in data.get("questions", {}).items():
        parts = key.split("/")
        if len(parts) != 3 or parts[2] not in IMAGES_PER_KIND:
            raise ValueError(f"{path}: question key {key!r} must be experiment/property/kind, kind one of "
                             f"{', '.join(IMAGES_PER_KIND)}")
        labels, text = q.get("labels"), q.get("question")
        if not isinstance(text, str) or not isinstance(labels, list) or len(labels) != IMAGES_PER_KIND[parts[2]]:
            raise ValueError(f"{path}: {key} needs 'question' (text) and 'labels' ({IMAGES_PER_KIND[parts[2]]} "
                             "texts, one per image)")
        table[key] = Question(tuple(map(str, labels)), text)
    system = data.get("system", base.system)
    if not isinstance(system, str) or not system.strip():
        raise ValueError(f"{path}: 'system' must be a non-empty text")
    return Questions(system, table)


# ---------------------------------------------------------------------------------------------
# answers


def parse_answer(text: str) -> tuple[bool, str] | None:
    """(yes?, reason) from a reply whose first JSON value is the answer object (text around it, such
    as a Markdown fence, is ignored); None when no verdict can be read from it."""
    start = (text or "").find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    reason = str(obj.get("reason", ""))[:300]
    answer = obj.get("answer", obj.get("pass"))
    if isinstance(answer, str):
        answer = {"yes": True, "no": False, "1": True, "0": False, "true": True, "false": False}.get(
            answer.strip().lower())
    elif isinstance(answer, bool) or answer in (0, 1):
        answer = bool(answer)
    else:
        answer = None
    return None if answer is None else (answer, reason)

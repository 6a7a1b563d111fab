"""The judge's questions: one system instruction, one question per experiment x property x kind,
and, where a setting needs its own, per setting.

This project's own wording (the study's prompts are not shipped). A user loads other wording with
`load_questions` (a JSON file) or the study's own prompts from a checkout of its repository with
`load_study_questions` (`--questions-from STUDY_CHECKOUT`). Every question is about the images of
its kind's bundle, in the bundle's order (see `experiments.judge`), and the system instruction
asks for one line of JSON, {"answer": "yes" | "no", "reason": "..."}, which `parse_answer` reads
(with the study's {"pass": 0 | 1, ...} too).

Keys. A question is found for a row by its experiment, property, kind and setting: first the key
"experiment/property/kind/SETTING" naming the row's setting exactly, then such keys whose SETTING
is a glob pattern matching it (in the table's order), then "experiment/property/kind". A row's
setting is as its verdict file names it: the experiment's setting, prefixed by the cells' prefix
where it is not the experiment's own (run_all's study lens: "study-lens all b17").
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import importlib.util
import json
import os
import sys
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

_LABELS = {  # "{setting}" is replaced by the row's setting (see Question.for_setting)
    ("lens", "present"): ("the reference image that was given to the edit",
                          "text-to-image from the instruction alone, with no reference",
                          "text-to-image from an empty prompt, with the edit's text-stream activations "
                          "patched in (setting {setting}: the positions patched and the source block)"),
    ("knockout", "edit"): ("the reference image", "the edit made with this reference, unchanged",
                           "the same edit with the attention paths of setting {setting} blocked (A->B: B may "
                           "not read from A; after @, the blocks where it is blocked)"),
    ("drop", "edit"): ("the reference image", "the edit made with this reference, unchanged",
                       "the same edit with the reference cut off from the model from an early block on "
                       "(setting {setting})"),
    ("patching", "transferred"): ("the reference of the source edit", "the reference of the target edit",
                                  "the target edit, unchanged",
                                  "the target edit with the source edit's text-stream activations patched in "
                                  "(setting {setting}: the positions patched and the block)"),
}

_QUESTION = {
    ("colour", "present"): "Compared with Image 2, has Image 3 taken on the main colour of Image 1? Answer yes if "
                           "that colour is now clearly visible in Image 3 and was not in Image 2.",
    ("colour", "lost"): "Compared with Image 2, has Image 3 lost the main colour of Image 1? Answer yes if much of "
                        "that colour has been removed from Image 3.",
    ("colour", "kept"): "Compared with Image 2, does Image 3 still show the main colour of Image 1? Answer yes if "
                        "the colour has survived.",
    ("colour", "transferred"): "Image 3 was made with Image 2 as its reference. Compared with Image 3, has Image 4 "
                               "taken on the colour of Image 1? Answer yes if Image 4's colour is nearer to Image "
                               "1's than to Image 2's.",
    ("style", "present"): "Compared with Image 2, does Image 3 take on a non-photographic look like that of Image 1 "
                          "(illustrated, cartoon, painted, drawn)? Consider the subject and the rest of the picture "
                          "alike. Answer yes if Image 3 looks less like a photograph and more like Image 1's style "
                          "than Image 2 does.",
    ("style", "lost"): "Compared with Image 2, has Image 3 lost the non-photographic style of Image 1 and become "
                       "more like a photograph? Answer yes if Image 3 looks more realistic than Image 2.",
    ("style", "kept"): "Compared with Image 2, does Image 3 still look illustrated, cartoon-like or otherwise "
                       "non-photographic in the manner of Image 1? Consider the subject and the rest of the picture "
                       "alike. Answer yes if the style has survived.",
    ("style", "transferred"): "Image 3 was made with Image 2 as its reference. Compared with Image 3, does Image 4 "
                              "look more illustrated or otherwise non-photographic, in the manner of Image 1? "
                              "Consider the subject and the rest of the picture alike.",
    ("identity", "present"): "Is the person in Image 3 the same individual as the person in Image 1 (same face, hair "
                             "and build), while the person in Image 2 is not?",
    ("identity", "lost"): "The person in Image 2 is the individual of Image 1. Compared with Image 2, has Image 3 lost "
                          "that identity, so that its person looks like a different individual from Image 1's?",
    ("identity", "kept"): "Does the person in Image 3, like the one in Image 2, still look like the same individual "
                          "as the person in Image 1 (same face, hair and build)?",
    ("identity", "transferred"): "Image 3 was made with Image 2 as its reference. Does the person in Image 4 look "
                                 "more like the person in Image 1 than like the person in Image 2?",
    ("reference", "present"): "Compared with Image 2, does Image 3 contain anything visibly taken from Image 1 (a "
                              "colour, texture, layout, style, distinctive shape or detail of its subject)? Answer yes "
                              "if you can point to something in Image 3 that comes from Image 1 and is not in Image 2.",
    ("reference", "lost"): "Image 2 carries visible information from Image 1. Compared with Image 2, has Image 3 lost "
                           "it, so that it no longer shows anything specific to Image 1?",
    ("reference", "kept"): "Does Image 3, like Image 2, still show visible information taken from Image 1 (colours, "
                           "textures, layout, style, distinctive shapes or subject details)?",
    ("reference", "transferred"): "Image 3 was made with Image 2 as its reference. Does Image 4 show visible "
                                  "information from Image 1 that Image 3 does not have?",
}

SETTING = "{setting}"  # replaced in a question's labels and text by the row's setting


@dataclasses.dataclass(frozen=True)
class Question:
    labels: tuple[str, ...]  # one per image, in bundle order, as shown ("Image 1: ...")
    question: str
    source: str = "project"  # where the wording comes from: "project", a file, "study:<its bundle builder>"
    negated: bool = False  # a "yes" means the row's property is absent (the study's identity lens asks
    #                        "a different person?"): the row's verdict is the answer's opposite

    def for_setting(self, setting: str) -> "Question":
        """The question for a row of `setting`: every "{setting}" in its labels and text replaced."""
        return dataclasses.replace(self, labels=tuple(label.replace(SETTING, setting) for label in self.labels),
                                   question=self.question.replace(SETTING, setting))


@dataclasses.dataclass(frozen=True)
class Questions:
    system: str
    table: Mapping[str, Question]  # "experiment/property/kind[/setting or glob]" -> Question (module docstring)

    def get(self, experiment: str, prop: str, kind: str, setting: str | None = None) -> Question:
        """The question of a row (the module docstring's key order), filled in for its setting."""
        base = f"{experiment}/{prop}/{kind}"
        if setting is not None:
            exact = self.table.get(f"{base}/{setting}")
            if exact is not None:
                return exact.for_setting(setting)
            for key, q in self.table.items():
                head, _, pattern = key.partition(f"{base}/")
                if not head and pattern and fnmatch.fnmatchcase(setting, pattern):
                    return q.for_setting(setting)
        if base not in self.table:
            raise ContractError(f"no question for {base}; add one with --questions FILE")
        return self.table[base].for_setting("" if setting is None else setting)

    def source(self, experiment: str, prop: str, kind: str, setting: str | None = None) -> str:
        return self.get(experiment, prop, kind, setting).source


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


def _kind_of(key: str, where: str) -> str:
    parts = key.split("/", 3)
    if len(parts) < 3 or parts[0] not in KINDS_OF or parts[2] not in KINDS_OF[parts[0]] or \
            (len(parts) == 4 and not parts[3]):
        raise ValueError(f"{where}: question key {key!r} must be experiment/property/kind[/setting], experiment one of "
                         f"{', '.join(KINDS_OF)} and kind one of its kinds ({KINDS_OF})")
    return parts[2]


def load_questions(path: str | os.PathLike, base: Questions = QUESTIONS) -> Questions:
    """Questions from a JSON file, over `base`:

        {"system": "...",                                   (optional)
         "questions": {"knockout/style/lost": {"labels": ["Image 1 - ...", ...], "question": "..."},
                       "knockout/style/lost/ref->text[padding] @ all": {...},
                       "lens/identity/present/all b*": {..., "negated": true}, ...}}

    Keys are experiment/property/kind, optionally followed by /SETTING, a row's setting or a glob
    pattern (see the module docstring); labels are shown as written, one per image of the kind;
    "negated": true says a "yes" means the property is absent. A file's own keys come first, in
    its order, so they win over `base`'s.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not set(data) <= {"system", "questions"}:
        raise ValueError(f"{path}: expected an object with 'system' and/or 'questions'")
    table = {}
    for key, q in data.get("questions", {}).items():
        kind = _kind_of(key, str(path))
        labels, text, negated = q.get("labels"), q.get("question"), q.get("negated", False)
        if not isinstance(text, str) or not isinstance(labels, list) or len(labels) != IMAGES_PER_KIND[kind]:
            raise ValueError(f"{path}: {key} needs 'question' (text) and 'labels' ({IMAGES_PER_KIND[kind]} "
                             "texts, one per image)")
        if not isinstance(negated, bool):
            raise ValueError(f"{path}: {key}: 'negated' is true or false")
        table[key] = Question(tuple(map(str, labels)), text, source=str(path), negated=negated)
    system = data.get("system", base.system)
    if not isinstance(system, str) or not system.strip():
        raise ValueError(f"{path}: 'system' must be a non-empty text")
    return Questions(system, {**table, **{k: v for k, v in base.table.items() if k not in table}})


# ---------------------------------------------------------------------------------------------
# the study's own prompts, read from a checkout of its repository


BUNDLES_FILE = "scripts/judge/bundles.py"  # one builder per judge: (entity, folder) -> labels, paths, question
SYSTEM_FILES = ("scripts/judge/api.py", "utils/vlm.py")  # SYSTEM_PROMPT: the first of these that assigns it

# The study's judges (its scripts/judge/configs.py), each by the name of its bundle builder in
# BUNDLES_FILE, and the rows of ours that are the same cell: experiment/property/kind/setting glob.
# The knockout cells are the cuts in every block; the lens and patching ones any block, as a run
# puts the study's block where its model has it. negated: the study asked the question the other
# way round and reported the noes (its identity lens: "a different person?").
STUDY_JUDGES = (
    ("i2i_unc_color_text_lens", "lens/colour/present/*all b*", False),
    ("i2i_unc_style_text_lens", "lens/style/present/*all b*", False),
    ("i2i_unc_style_text_lens_padding", "lens/style/present/*padding b*", False),
    ("i2i_unc_style_text_lens_content", "lens/style/present/*content b*", False),
    ("i2i_unc_dreambench_human_identity", "lens/identity/present/*all b*", True),
    ("i2i_unc_generic_reference", "lens/reference/present/*all b*", False),  # its add and remove judges
    ("ko_color_ref_to_text", "knockout/colour/lost/ref->text @ all", False),
    ("ko_color_ref_to_text_padding", "knockout/colour/lost/ref->text[padding] @ all", False),
    ("ko_color_ref_to_text_content", "knockout/colour/lost/ref->text[content] @ all", False),
    ("ko_color_ref_to_image", "knockout/colour/kept/ref->image @ all", False),
    ("ko_style_ref_to_text", "knockout/style/lost/ref->text @ all", False),
    ("ko_style_ref_to_text_padding", "knockout/style/lost/ref->text[padding] @ all", False),
    ("ko_style_ref_to_text_content", "knockout/style/lost/ref->text[content] @ all", False),
    ("ko_style_ref_to_image", "knockout/style/kept/ref->image @ all", False),
    ("ko_dreambench_human_ref_to_text", "knockout/identity/lost/ref->text @ all", False),
    ("ko_dreambench_human_ref_to_text_padding", "knockout/identity/lost/ref->text[padding] @ all", False),
    ("ko_dreambench_human_ref_to_text_content", "knockout/identity/lost/ref->text[content] @ all", False),
    ("ko_dreambench_human_ref_to_image", "knockout/identity/kept/ref->image @ all", False),
    ("i2i2i_color", "patching/colour/transferred/*all b*", False),
    ("i2i2i_color_text_padding", "patching/colour/transferred/*padding b*", False),
    ("i2i2i_color_text_content", "patching/colour/transferred/*content b*", False),
    ("i2i2i_style", "patching/style/transferred/*all b*", False),
    ("i2i2i_style_text_padding", "patching/style/transferred/*padding b*", False),
    ("i2i2i_style_text_content", "patching/style/transferred/*content b*", False),
    ("i2i2i_dreambench_humans", "patching/identity/transferred/*all b*", False),
    ("i2i2i_dreambench_humans_text_padding", "patching/identity/transferred/*padding b*", False),
    ("i2i2i_dreambench_humans_text_content", "patching/identity/transferred/*content b*", False),
)


def _study_system(checkout: Path) -> str:
    """The study's system text: the string SYSTEM_PROMPT of the first of SYSTEM_FILES assigning it,
    read as a literal (the file is parsed, not run)."""
    for rel in SYSTEM_FILES:
        path = checkout / rel
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SYSTEM_PROMPT"
                                                    for t in node.targets):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    raise ValueError(f"{path}: SYSTEM_PROMPT is not a literal text") from None
                if isinstance(value, str) and value.strip():
                    return value
    raise FileNotFoundError(f"{checkout}: none of {', '.join(SYSTEM_FILES)} assigns SYSTEM_PROMPT; give the root of "
                            "a checkout of the study's repository (ChrisG777/i2i-interp)")


def _study_builders(checkout: Path):
    """The study's bundle builders module, run from its file (it uses the standard library only)."""
    path = checkout / BUNDLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkout}: no {BUNDLES_FILE}; give the root of a checkout of the study's repository "
                                "(ChrisG777/i2i-interp)")
    name = "_study_judge_bundles"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while they are made
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"{path} could not be loaded ({type(e).__name__}: {e}); is it the study's file?") from None
    finally:
        del sys.modules[name]
    return module


def load_study_questions(checkout: str | os.PathLike, base: Questions = QUESTIONS) -> Questions:
    """The study's own prompts, read at run time from a checkout of its repository (its system text
    and, for each of its judges in STUDY_JUDGES, the labels and question its bundle builder makes),
    keyed by the setting of the same cell here, over `base` (the rows of cells the study did not
    judge keep `base`'s questions). Raises with what is missing when the checkout lacks them."""
    checkout = Path(checkout).expanduser()
    system = _study_system(checkout)
    module = _study_builders(checkout)
    table = {}
    for builder_name, key, negated in STUDY_JUDGES:
        builder = getattr(module, builder_name, None)
        if not callable(builder):
            raise ValueError(f"{checkout / BUNDLES_FILE} defines no bundle builder {builder_name}")
        bundle = builder("ENTITY", Path("RESULTS"))
        labels, question = list(getattr(bundle, "image_labels", ())), getattr(bundle, "question", None)
        n = IMAGES_PER_KIND[_kind_of(key, builder_name)]
        if len(labels) != n or not isinstance(question, str) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"{builder_name} of {checkout / BUNDLES_FILE}: expected {n} image labels and a question, "
                             f"got {len(labels)} labels")
        table[key] = Question(tuple(labels), question, source=f"study:{builder_name}", negated=negated)
    return Questions(system, {**table, **base.table})


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

"""Bundle builders of the stand-in checkout: one per judge, named as the study's, each returning
the captions, the image files and the question of one entity. The wording is this project's own;
every text carries a tag (STAND-IN ...) so a test can tell which builder asked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal


@dataclass(frozen=True)
class Bundle:
    image_labels: list[str]
    image_paths: list[Path]
    question: str


Variant = Literal["full", "padding", "content"]
_WHERE = {"full": "every text position", "padding": "the padding positions only",
          "content": "the instruction positions only"}
_CUT = {"full": "ref->text", "padding": "ref->text[padding]", "content": "ref->text[content]"}
_LENS_FILE = {"full": "", "padding": "_text_padding", "content": "_text_content"}


def _lens(tag: str, what: str, variant: Variant, question: str) -> Callable[[str, Path], Bundle]:
    def builder(entity_id: str, base_dir: Path) -> Bundle:
        d = base_dir / entity_id
        return Bundle(
            image_labels=[f"Image 1 - STAND-IN {tag} reference ({what}):",
                          "Image 2 - STAND-IN plain text-to-image picture:",
                          f"Image 3 - STAND-IN lens picture, {_WHERE[variant]} carried over:"],
            image_paths=[d / "reference.png", d / "t2i_clean.png", d / f"lens{_LENS_FILE[variant]}.png"],
            question=f"STAND-IN {tag} lens ({variant}): {question}",
        )
    return builder


i2i_unc_color_text_lens = _lens("colour", "one flat colour", "full", "Did Image 3 pick up the colour of Image 1?")
i2i_unc_style_text_lens = _lens("style", "a drawn picture", "full", "Is Image 3 less photographic than Image 2?")
i2i_unc_style_text_lens_padding = _lens("style", "a drawn picture", "padding",
                                        "Is Image 3 less photographic than Image 2?")
i2i_unc_style_text_lens_content = _lens("style", "a drawn picture", "content",
                                        "Is Image 3 less photographic than Image 2?")
i2i_unc_dreambench_human_identity = _lens("identity", "a person", "full",
                                          "Is the person of Image 3 someone else than the person of Image 1?")
i2i_unc_generic_reference = _lens("reference", "any picture", "full",
                                  "Does Image 3 hold anything of Image 1 that Image 2 lacks?")


def _knockout(tag: str, variant: Variant, question: str) -> Callable[[str, Path], Bundle]:
    def builder(entity_id: str, base_dir: Path) -> Bundle:
        d = base_dir / entity_id
        return Bundle(
            image_labels=[f"Image 1 - STAND-IN {tag} reference:", "Image 2 - STAND-IN unchanged edit:",
                          f"Image 3 - STAND-IN edit with {_CUT[variant]} cut:"],
            image_paths=[d / "reference.png", d / "edit.png", d / f"{_CUT[variant]}.png"],
            question=f"STAND-IN {tag} knockout {_CUT[variant]}: {question}",
        )
    return builder


def _kept(tag: str, question: str) -> Callable[[str, Path], Bundle]:
    def builder(entity_id: str, base_dir: Path) -> Bundle:
        d = base_dir / entity_id
        return Bundle(
            image_labels=[f"Image 1 - STAND-IN {tag} reference:", "Image 2 - STAND-IN unchanged edit:",
                          "Image 3 - STAND-IN edit with ref->image cut:"],
            image_paths=[d / "reference.png", d / "edit.png", d / "ref_to_image.png"],
            question=f"STAND-IN {tag} knockout ref->image: {question}",
        )
    return builder


ko_color_ref_to_text = _knockout("colour", "full", "Is the colour of Image 1 gone from Image 3?")
ko_color_ref_to_text_padding = _knockout("colour", "padding", "Is the colour of Image 1 gone from Image 3?")
ko_color_ref_to_text_content = _knockout("colour", "content", "Is the colour of Image 1 gone from Image 3?")
ko_color_ref_to_image = _kept("colour", "Does Image 3 keep the colour of Image 1?")
ko_style_ref_to_text = _knockout("style", "full", "Is Image 3 more photographic than Image 2?")
ko_style_ref_to_text_padding = _knockout("style", "padding", "Is Image 3 more photographic than Image 2?")
ko_style_ref_to_text_content = _knockout("style", "content", "Is Image 3 more photographic than Image 2?")
ko_style_ref_to_image = _kept("style", "Is Image 3 still drawn like Image 1?")
ko_dreambench_human_ref_to_text = _knockout("identity", "full", "Is the person of Image 3 someone else?")
ko_dreambench_human_ref_to_text_padding = _knockout("identity", "padding", "Is the person of Image 3 someone else?")
ko_dreambench_human_ref_to_text_content = _knockout("identity", "content", "Is the person of Image 3 someone else?")
ko_dreambench_human_ref_to_image = _kept("identity", "Is the person of Image 3 still the one of Image 1?")


def _patch(tag: str, variant: Variant, question: str) -> Callable[[str, Path], Bundle]:
    def builder(entity_id: str, base_dir: Path) -> Bundle:
        d = base_dir / entity_id
        return Bundle(
            image_labels=[f"Image 1 - STAND-IN {tag} source reference:", f"Image 2 - STAND-IN {tag} target reference:",
                          "Image 3 - STAND-IN target edit:",
                          f"Image 4 - STAND-IN target edit, {_WHERE[variant]} from the source:"],
            image_paths=[d / "ref_source.png", d / "ref_target.png", d / "target.png", d / "patched.png"],
            question=f"STAND-IN {tag} patching ({variant}): {question}",
        )
    return builder


i2i2i_color = _patch("colour", "full", "Is Image 4 nearer Image 1's colour than Image 2's?")
i2i2i_color_text_padding = _patch("colour", "padding", "Is Image 4 nearer Image 1's colour than Image 2's?")
i2i2i_color_text_content = _patch("colour", "content", "Is Image 4 nearer Image 1's colour than Image 2's?")
i2i2i_style = _patch("style", "full", "Is Image 4 more drawn than Image 3?")
i2i2i_style_text_padding = _patch("style", "padding", "Is Image 4 more drawn than Image 3?")
i2i2i_style_text_content = _patch("style", "content", "Is Image 4 more drawn than Image 3?")
i2i2i_dreambench_humans = _patch("identity", "full", "Is the person of Image 4 more like Image 1's?")
i2i2i_dreambench_humans_text_padding = _patch("identity", "padding", "Is the person of Image 4 more like Image 1's?")
i2i2i_dreambench_humans_text_content = _patch("identity", "content", "Is the person of Image 4 more like Image 1's?")

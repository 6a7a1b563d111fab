"""The older spellings of sites and captures (integer text sites, `BLOCK0_INPUT`, `Capture(text=...)`,
`Capture(image=...)`) keep working (tests/fluxjax/test_sites.py: they give what the named sites
give); one that is wrong fails in one line naming the new spelling; and the repository's own code
and docs use the new one."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

import fluxjax
from fluxjax.interventions import check_sites

REPO = Path(__file__).resolve().parents[2]
CONFIG = dataclasses.replace(fluxjax.FLUX2_KLEIN_4B, hidden_size=32, num_heads=2, depth=1, depth_single_blocks=2,
                             axes_dim=(4, 4, 4, 4))
VALUE = np.zeros((1, 4, 32), np.float32)
NEW_SPELLING = re.compile(r"(b\d+|b<k>|embed)\.(text|image)\.output")  # e.g. 'b3.text.output', 'embed.text.output'


@pytest.mark.parametrize("wrong", [
    lambda: fluxjax.Capture(text=3),
    lambda: fluxjax.Capture(text=(2.5,)),
    lambda: fluxjax.Capture(image=(True,)),
    lambda: fluxjax.Capture(text=(CONFIG.num_blocks,)).validate(CONFIG),
    lambda: fluxjax.Capture(image=(-2,)).validate(CONFIG),
    lambda: fluxjax.substitution(-2, VALUE),
    lambda: fluxjax.substitution(2.5, VALUE),
    lambda: check_sites(fluxjax.Interventions(substitutions=(fluxjax.substitution(CONFIG.num_blocks, VALUE),)),
                        CONFIG),
    lambda: fluxjax.site(-2),
], ids=["text not a tuple", "text float", "image bool", "text past the last block", "image below -1",
        "substitution below -1", "substitution float", "substitution past the last block", "site below -1"])
def test_a_wrong_older_spelling_fails_in_one_line_naming_the_new_one(wrong):
    with pytest.raises((TypeError, ValueError)) as e:
        wrong()
    assert "\n" not in str(e.value)
    assert NEW_SPELLING.search(str(e.value)), str(e.value)


OLDER = re.compile(r"BLOCK0_INPUT|Capture\((text|image)=|image_substitutions|(caps|captures)\.(text|image)\b")


def test_the_repository_uses_the_new_spellings():
    """Experiments, organisms, benchmarks, the reference builders and the docs name their sites; the
    older spellings appear in docs/interventions.md's table of them only."""
    files = [p for d in ("experiments", "organisms", "benchmarks", "flux2ref") for p in (REPO / d).rglob("*.py")]
    files += [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "docs").glob("*.py")]
    found = []
    for path in files:
        text = path.read_text()
        if path.name == "interventions.md":  # its "Older spellings" section is the one place they are shown
            start = text.index("## Older spellings")
            text = text[:start] + text[text.index("\n## ", start + 1):]
        found += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in OLDER.finditer(text)]
    assert not found, found

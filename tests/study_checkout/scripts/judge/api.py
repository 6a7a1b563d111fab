"""The judge call of the stand-in checkout: only its system text is read (parsed, never run; the
import below would fail here, as the real file's would without its dependencies)."""

from utils.vlm import call_vision  # noqa: F401

SYSTEM_PROMPT = (
    "STAND-IN SYSTEM: you check pictures from an image-editing study. Several captioned pictures "
    "come first, then one question. Reply with JSON only, on one line: "
    '{"pass": 0 or 1, "reason": "a few words"}.'
)

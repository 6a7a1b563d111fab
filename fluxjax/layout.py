"""Token layout of one forward: the single source of every token slice and token group.

The joint sequence inside attention is [text | noisy image | ref_0 | ref_1 | ...]; the image
stream of the double blocks is [noisy image | refs]. Groups, used by knockouts and by the
substitution masks:

    text[content]  the instruction's own tokens (per-sample boolean content mask)
    text[padding]  every other text position (template tokens and pad tokens)
    image          the noisy-image tokens
    ref[r]         reference image r; `ref` means all of them
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

TEXT_CONTENT, TEXT_PADDING, IMAGE = 0, 1, 2  # group ids; reference r is 3 + r
REF_T_STEP = 10  # reference r has T = 10 (r + 1) in both references' position ids


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Counts and grid sizes of a forward's token groups (static: hashable, no arrays)."""

    n_txt: int
    img_grid: tuple[int, int]  # (rows, cols) of the noisy image's latent token grid
    ref_grids: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "n_txt", _count(self.n_txt, "n_txt"))
        object.__setattr__(self, "img_grid", _grid(self.img_grid, "img_grid"))
        if isinstance(self.ref_grids, (str, bytes)) or not isinstance(self.ref_grids, Iterable):
            raise TypeError(f"ref_grids must be a tuple of (rows, cols) grids, got {self.ref_grids!r}")
        object.__setattr__(self, "ref_grids", tuple(_grid(g, f"ref_grids[{r}]") for r, g in enumerate(self.ref_grids)))
        if self.n_txt <= 0 or min(self.img_grid) <= 0 or any(min(g) <= 0 for g in self.ref_grids):
            raise ValueError(f"every token group needs a positive size, got {self}")

    # counts -----------------------------------------------------------------
    @property
    def n_img(self) -> int:
        return self.img_grid[0] * self.img_grid[1]

    @property
    def ref_counts(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.ref_grids)

    @property
    def n_ref(self) -> int:
        return sum(self.ref_counts)

    @property
    def num_refs(self) -> int:
        return len(self.ref_grids)

    @property
    def n_image_stream(self) -> int:
        return self.n_img + self.n_ref

    @property
    def total(self) -> int:
        return self.n_txt + self.n_image_stream

    @property
    def num_groups(self) -> int:
        return 3 + self.num_refs

    @property
    def group_names(self) -> tuple[str, ...]:
        return ("text[content]", "text[padding]", "image") + tuple(f"ref[{r}]" for r in range(self.num_refs))

    # slices of the joint sequence ---------------------------------------------
    @property
    def text(self) -> slice:
        return slice(0, self.n_txt)

    @property
    def image(self) -> slice:
        return slice(self.n_txt, self.n_txt + self.n_img)

    @property
    def refs(self) -> slice:
        return slice(self.n_txt + self.n_img, self.total)

    def ref(self, r: int) -> slice:
        if not 0 <= r < self.num_refs:
            raise IndexError(f"reference {r} does not exist; this layout has {self.num_refs}")
        start = self.n_txt + self.n_img + sum(self.ref_counts[:r])
        return slice(start, start + self.ref_counts[r])

    # groups -------------------------------------------------------------------
    def group_ids(self, content_mask) -> np.ndarray:
        """int32 [B, L]: the group of every joint-sequence token, per sample.

        content_mask: bool [B, n_txt] (or [n_txt]), True at the instruction's tokens.
        """
        content = np.asarray(content_mask)
        if content.dtype != np.bool_:
            raise TypeError(f"content mask must be boolean (True at the instruction's tokens), got dtype "
                            f"{content.dtype}")
        if content.ndim == 1:
            content = content[None]
        if content.ndim != 2 or content.shape[1] != self.n_txt:
            raise ValueError(f"content mask must be [B, {self.n_txt}], got shape {content.shape}")
        rest = [np.full(self.n_img, IMAGE)] + [np.full(n, 3 + r) for r, n in enumerate(self.ref_counts)]
        tail = np.concatenate(rest).astype(np.int32)
        text = np.where(content, TEXT_CONTENT, TEXT_PADDING).astype(np.int32)
        return np.concatenate([text, np.broadcast_to(tail, (content.shape[0], tail.size))], axis=1)

    def groups_of(self, name: str) -> tuple[int, ...]:
        """Group ids named by `text`, `text[content]`, `text[padding]`, `image`, `ref` or `ref[r]`."""
        table = {"text": (TEXT_CONTENT, TEXT_PADDING), "text[content]": (TEXT_CONTENT,),
                 "text[padding]": (TEXT_PADDING,), "image": (IMAGE,),
                 "ref": tuple(3 + r for r in range(self.num_refs))}
        if name in table:
            return table[name]
        if name.startswith("ref[") and name.endswith("]") and name[4:-1].isdigit():
            r = int(name[4:-1])
            if r >= self.num_refs:
                raise ValueError(f"token group {name!r} does not exist; this layout has {self.num_refs} references")
            return (3 + r,)
        raise ValueError(f"unknown token group {name!r}; use one of {sorted(table)} or ref[r]")

    def token_mask(self, name: str, content_mask) -> np.ndarray:
        """bool [B, L]: which joint-sequence tokens belong to group `name`."""
        return np.isin(self.group_ids(content_mask), self.groups_of(name))

    def text_mask(self, name: str, content_mask) -> np.ndarray:
        """bool [B, T]: which text tokens belong to `name` ('text', 'text[content]' or 'text[padding]');
        the mask of a padding-only or content-only substitution."""
        if not set(self.groups_of(name)) <= {TEXT_CONTENT, TEXT_PADDING}:
            raise ValueError(f"{name!r} is not a text group; use 'text', 'text[content]' or 'text[padding]'")
        return self.token_mask(name, content_mask)[:, self.text]

    # position ids -------------------------------------------------------------
    def txt_ids(self) -> np.ndarray:
        """int32 [n_txt, 4]: text token k has (0, 0, 0, k)."""
        ids = np.zeros((self.n_txt, 4), np.int32)
        ids[:, 3] = np.arange(self.n_txt)
        return ids

    def img_ids(self) -> np.ndarray:
        """int32 [n_img + n_ref, 4]: (0, h, w, 0) for the noisy image, (10 (r+1), h, w, 0) for ref r."""
        grids = [(0, self.img_grid)] + [(REF_T_STEP * (r + 1), g) for r, g in enumerate(self.ref_grids)]
        parts = []
        for t, (h, w) in grids:
            hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # row-major: index = h W + w
            parts.append(np.stack([np.full(h * w, t), hh.ravel(), ww.ravel(), np.zeros(h * w)], axis=1))
        return np.concatenate(parts).astype(np.int32)


def _count(value, what: str) -> int:
    """An int (or numpy integer) as a Python int; bools, floats and the rest raise a TypeError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"TokenLayout {what} must be an integer, got {value!r}")
    return int(value)


def _grid(grid, what: str) -> tuple[int, int]:
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Iterable) or len(tuple(grid)) != 2:
        raise TypeError(f"TokenLayout {what} must be a (rows, cols) pair of integers, got {grid!r}")
    return tuple(_count(a, what) for a in grid)


def key_segments(n_txt: int, length: int, num_groups: int, stream_counts: tuple[int, ...] | None = None):
    """The static key segments of `fluxjax.numerics.KeyGroups` for a joint sequence
    [text | image | refs] of `length` tokens: (start, stop, groups in it) each.

    The text span is one segment of two groups (content and padding interleave per sample). With
    stream_counts = (n_img, *ref_counts) (e.g. from `TokenLayout`), the image and each reference
    are segments of one group each, cut where a drop truncated the sequence; without them the
    image stream is one segment of groups IMAGE.. (exact too, with a per-key group mask there).
    """
    text = ((0, n_txt, (TEXT_CONTENT, TEXT_PADDING)),)
    if stream_counts is None:
        return text + ((n_txt, length, tuple(range(IMAGE, num_groups))),)
    out, start = list(text), n_txt
    for g, count in enumerate(stream_counts, IMAGE):
        stop = min(start + count, length)
        if stop > start:
            out.append((start, stop, (g,)))
        start += count
    return tuple(out)

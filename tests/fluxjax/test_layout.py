"""TokenLayout: counts, slices, groups, masks and position ids of a forward's tokens."""

from __future__ import annotations

import numpy as np
import pytest

from fluxjax.layout import IMAGE, TEXT_CONTENT, TEXT_PADDING, TokenLayout

LAYOUT = TokenLayout(n_txt=5, img_grid=(2, 3), ref_grids=((1, 2), (2, 2)))
CONTENT = np.array([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], bool)


def test_counts_and_slices():
    assert (LAYOUT.n_img, LAYOUT.ref_counts, LAYOUT.n_ref, LAYOUT.num_refs) == (6, (2, 4), 6, 2)
    assert (LAYOUT.n_image_stream, LAYOUT.total, LAYOUT.num_groups) == (12, 17, 5)
    seq = np.arange(LAYOUT.total)
    assert list(seq[LAYOUT.text]) == [0, 1, 2, 3, 4]
    assert list(seq[LAYOUT.image]) == [5, 6, 7, 8, 9, 10]
    assert list(seq[LAYOUT.refs]) == list(range(11, 17))
    assert list(seq[LAYOUT.ref(0)]) == [11, 12] and list(seq[LAYOUT.ref(1)]) == [13, 14, 15, 16]
    with pytest.raises(IndexError):
        LAYOUT.ref(2)


def test_group_ids_and_names():
    g = LAYOUT.group_ids(CONTENT)
    assert g.shape == (2, LAYOUT.total) and g.dtype == np.int32
    np.testing.assert_array_equal(g[:, LAYOUT.text], np.where(CONTENT, TEXT_CONTENT, TEXT_PADDING))
    assert (g[:, LAYOUT.image] == IMAGE).all()
    assert (g[:, LAYOUT.ref(0)] == 3).all() and (g[:, LAYOUT.ref(1)] == 4).all()
    assert LAYOUT.group_ids(CONTENT[0]).shape == (1, LAYOUT.total)  # one mask shared by the batch
    assert LAYOUT.group_names == ("text[content]", "text[padding]", "image", "ref[0]", "ref[1]")
    with pytest.raises(ValueError, match="content mask"):
        LAYOUT.group_ids(np.ones((2, 4), bool))


def test_groups_of_and_masks():
    assert LAYOUT.groups_of("text") == (TEXT_CONTENT, TEXT_PADDING)
    assert LAYOUT.groups_of("ref") == (3, 4) and LAYOUT.groups_of("ref[1]") == (4,)
    for bad in ("ref[2]", "refs", "text[pad]"):
        with pytest.raises(ValueError):
            LAYOUT.groups_of(bad)
    ref = LAYOUT.token_mask("ref", CONTENT)
    assert ref.shape == (2, LAYOUT.total) and ref.sum(axis=1).tolist() == [6, 6] and ref[:, LAYOUT.refs].all()
    np.testing.assert_array_equal(LAYOUT.text_mask("text[content]", CONTENT), CONTENT)
    np.testing.assert_array_equal(LAYOUT.text_mask("text[padding]", CONTENT), ~CONTENT)
    assert LAYOUT.text_mask("text", CONTENT).all()
    with pytest.raises(ValueError, match="not a text group"):
        LAYOUT.text_mask("image", CONTENT)


def test_position_ids():
    t = LAYOUT.txt_ids()
    np.testing.assert_array_equal(t, np.stack([np.zeros(5), np.zeros(5), np.zeros(5), np.arange(5)], 1))
    i = LAYOUT.img_ids()
    assert i.shape == (LAYOUT.n_image_stream, 4) and i.dtype == np.int32
    np.testing.assert_array_equal(i[:6], [[0, h, w, 0] for h in range(2) for w in range(3)])  # row-major
    np.testing.assert_array_equal(i[6:8], [[10, 0, 0, 0], [10, 0, 1, 0]])
    np.testing.assert_array_equal(i[8:], [[20, h, w, 0] for h in range(2) for w in range(2)])


def test_invalid_layouts():
    with pytest.raises(ValueError):
        TokenLayout(n_txt=0, img_grid=(2, 2))
    with pytest.raises(ValueError):
        TokenLayout(n_txt=4, img_grid=(2, 2), ref_grids=((0, 3),))
    assert hash(TokenLayout(4, [2, 2], [[1, 1]])) == hash(TokenLayout(4, (2, 2), ((1, 1),)))  # static, hashable

"""`fluxjax.files.atomic_directory`: a folder appears whole or not at all, and an old one goes only
once the new one is in place."""

from __future__ import annotations

import os

import pytest

from fluxjax.files import TMP_MARK, atomic_directory


def _names(folder):
    return sorted(os.listdir(folder))


def test_new_folder_appears_only_when_complete(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not target.exists() and TMP_MARK in tmp.name and tmp.parent == tmp_path
    assert _names(target) == ["a.txt"] and _names(tmp_path) == ["out"]


def test_failure_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_directory(target, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("midway")
    assert _names(tmp_path) == ["out"] and _names(target) == ["old.txt"]


def test_replace_swaps_the_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(tmp_path) == ["out"] and _names(target) == ["new.txt"]


def test_without_replace_an_existing_folder_wins(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OSError):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
            target.mkdir()  # another process got there first
            (target / "theirs.txt").write_text("theirs")
    assert _names(tmp_path) == ["out"] and _names(target) == ["theirs.txt"]

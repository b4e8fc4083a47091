"""Atomic writes (regpipe.atomic)."""

import os

import pytest

from regpipe.atomic import (
    atomic_copy,
    atomic_write,
    atomic_write_text,
    check_distinct_paths,
    json_ready,
)
from regpipe.errors import InputError


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"

    def fail(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "x.txt", lambda tmp: tmp.write_text("ok"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        atomic_write_text(tmp_path / "no" / "x.txt", "text")
    assert not (tmp_path / "no").exists()


def test_parents_creates_the_folder(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b" / "x.json", "{}", parents=True)
    assert path.read_text() == "{}"


def test_temporary_file_keeps_the_suffix(tmp_path):
    seen = []
    atomic_write(tmp_path / "image.nii.gz", lambda tmp: seen.append(tmp.name))
    assert seen[0].startswith(".image.nii.gz.") and seen[0].endswith(".nii.gz")


def test_copy_leaves_an_identical_file_alone(tmp_path):
    source = tmp_path / "source.txt"
    source.write_text("same")
    target = atomic_copy(source, tmp_path / "target.txt")
    os.utime(target, (1, 1))
    atomic_copy(source, target)
    assert target.stat().st_mtime == 1
    source.write_text("different")
    atomic_copy(source, target)
    assert target.read_text() == "different"


def test_text_already_in_place_is_left_alone(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "{}\n")
    os.utime(target, (1, 1))
    atomic_write_text(target, "{}\n")
    assert target.stat().st_mtime == 1
    atomic_write_text(target, "{ }\n")
    assert target.read_text() == "{ }\n" and target.stat().st_mtime > 1


def test_distinct_paths_see_through_links_and_other_spellings(tmp_path):
    source = tmp_path / "in.nii.gz"
    source.write_bytes(b"data")
    os.link(source, tmp_path / "hard.nii.gz")
    os.symlink(source, tmp_path / "soft.nii.gz")
    for spelling in ("hard.nii.gz", "soft.nii.gz", "./in.nii.gz", "sub/../in.nii.gz"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(InputError, match=r"out .* is the image input"):
            check_distinct_paths({"out": tmp_path / spelling}, {"image": source})
    with pytest.raises(InputError, match="a and b are the same file"):
        check_distinct_paths({"a": tmp_path / "new.h5", "b": tmp_path / "sub/../new.h5"})
    check_distinct_paths({"a": tmp_path / "x.h5", "b": tmp_path / "y.h5", "c": None},
                         {"image": source, "mask": None})


def test_json_ready_replaces_what_strict_json_lacks(tmp_path):
    value = {"a": float("nan"), "b": [1.0, float("inf"), -float("inf")], 3: (tmp_path, "x")}
    assert json_ready(value) == {"a": None, "b": [1.0, None, None], "3": [str(tmp_path), "x"]}

"""``appcore.files.replacing``: the one way the server replaces a file (old or whole new, never half)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appcore.files import copy_replacing, replacing, write_json


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize(("mode", "data"), [("wb", b"new"), ("w", "new")])
def test_the_block_s_file_replaces_the_destination(tmp_path: Path, mode: str, data: bytes | str) -> None:
    dest = tmp_path / "a" / "b" / "f.txt"  # folders created
    with replacing(dest, mode) as f:
        f.write(data)
        assert not dest.exists(), "the destination appears only when the block ends"
    assert dest.read_bytes() == b"new" and _leftovers(dest.parent) == []


def test_a_block_that_raises_leaves_the_old_file_and_no_staged_one(tmp_path: Path) -> None:
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk gone"), replacing(dest) as f:
        f.write(b"half")
        raise RuntimeError("disk gone")
    assert dest.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_later_mtime_is_later_than_the_replaced_file_s_even_within_a_clock_tick(tmp_path: Path) -> None:
    dest = tmp_path / "w.pt"
    dest.write_bytes(b"old")
    future = dest.stat().st_mtime_ns + 10**9  # a clock that has not moved past the old file's time
    os.utime(dest, ns=(future, future))
    src = tmp_path / "src.pt"
    src.write_bytes(b"new")
    copy_replacing(src, dest, later_mtime=True)
    assert dest.read_bytes() == b"new" and dest.stat().st_mtime_ns > future


def test_copy_of_a_missing_source_keeps_the_destination(tmp_path: Path) -> None:
    dest = tmp_path / "label.nii.gz"
    dest.write_bytes(b"saved")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        copy_replacing(tmp_path / "nowhere.nii.gz", dest)
    assert dest.read_bytes() == b"saved" and _leftovers(tmp_path) == []


def test_write_json_round_trips(tmp_path: Path) -> None:
    write_json(tmp_path / "r.json", {"a": [1, 2]})
    assert (tmp_path / "r.json").read_text().replace("\n", "").replace(" ", "") == '{"a":[1,2]}'

from __future__ import annotations

from pathlib import Path

import pytest

from research.radiology.splits import Case, msd_cases, split_cases
from tests.conftest import HIPPO, requires_shared


def test_split_is_disjoint_and_fixed() -> None:
    cases = [Case(f"c{i:03d}", Path(f"i{i}"), Path(f"l{i}")) for i in range(100)]
    split = split_cases(cases)
    ids = {k: {c.id for c in v} for k, v in split.items()}
    assert (len(ids["train"]), len(ids["val"]), len(ids["test"])) == (72, 8, 20)
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert [c.id for c in split_cases(cases)["test"]] == [c.id for c in split["test"]]


@requires_shared
def test_shared_hippocampus_split() -> None:
    split = split_cases(msd_cases(HIPPO))
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (144, 16, 40)
    assert all(c.image.exists() and c.label.exists() for c in split["test"])


def test_folder_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for name in ("b.nii.gz", "a.nii.gz", "nolabel.nii.gz"):
        (tmp_path / "imagesTr" / name).write_bytes(b"")
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / "labelsTr" / name).write_bytes(b"")
    assert [c.id for c in msd_cases(tmp_path)] == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="MSD layout"):
        msd_cases(tmp_path / "imagesTr")

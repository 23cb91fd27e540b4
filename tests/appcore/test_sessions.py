"""``appcore.sessions``: session uploads are bounded and archives unpack only inside the session."""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from appcore.errors import RequestError
from appcore.sessions import CheckedSessions, unpack_archive


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as t:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                t.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                t.addfile(info, io.BytesIO(m[1]))
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("make", "status", "match"),
    [
        (lambda d: _tar(d / "a.tar", [("../escaped.txt", b"x")]), 422, "outside the session"),
        (lambda d: _tar(d / "a.tar", [("/tmp/escaped.txt", b"x")]), 422, "outside the session"),
        (lambda d: _tar(d / "a.tar", [("ok/../../escaped.txt", b"x")]), 422, "outside the session"),
        (lambda d: _tar(d / "a.tar", [_link("l", "/etc/passwd")]), 422, "a link"),
        (lambda d: _tar(d / "a.tar", [_link("h", "/etc/passwd", tarfile.LNKTYPE)]), 422, "a link"),
        (lambda d: _tar(d / "a.tar.gz", [("big.bin", bytes(3000))], "w:gz"), 413, "once unpacked"),
        (lambda d: _zip(d / "a.zip", {"../escaped.txt": b"x"}), 422, "outside the session"),
        (lambda d: _zip(d / "a.zip", {"big.bin": bytes(3000)}), 413, "once unpacked"),  # deflates to a few bytes
        (lambda d: (d / "a.zip").write_bytes(b"neither zip nor tar") and d / "a.zip", 422, "neither"),
        (lambda d: (d / "a.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated") and d / "a.gz", 422, "neither"),
    ],
)
def test_refused_archives_write_nothing(tmp_path: Path, make, status: int, match: str) -> None:
    archive = make(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RequestError, match=match) as e:
        unpack_archive(archive, dest, max_bytes=2000)
    assert e.value.status_code == status
    assert not any(dest.iterdir())
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/escaped.txt").exists()


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_archives_unpack_their_files_and_folders(tmp_path: Path, kind: str) -> None:
    files = {"case.nii.gz": b"volume", "series/1.dcm": b"one", "series/2.dcm": b"two"}
    archive = (
        _zip(tmp_path / "a.zip", files)
        if kind == "zip"
        else _tar(tmp_path / f"a.{kind}", list(files.items()), "w:gz" if kind == "tar.gz" else "w")
    )
    dest = tmp_path / "dest"
    unpack_archive(archive, dest, max_bytes=2000)
    assert {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files


def _received(tmp: Path, name: str, data: bytes) -> Path:
    """A file as MONAI Label's session endpoint leaves it: alone in a fresh temporary folder."""
    folder = tmp / "received"
    folder.mkdir()
    (folder / name).write_bytes(data)
    return folder / name


@pytest.fixture
def sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CheckedSessions:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the upload's folder counts as temporary
    return CheckedSessions(str(tmp_path / "store"), 3600, max_upload_mb=1)


def test_an_oversized_upload_is_refused_and_removed(sessions: CheckedSessions, tmp_path: Path) -> None:
    upload = _received(tmp_path, "scan.nii.gz", bytes(2**20 + 1))
    with pytest.raises(RequestError, match="limit is 1 MB") as e:
        sessions.add_session(str(upload))
    assert e.value.status_code == 413
    assert not upload.parent.exists(), "the refused upload and its temporary folder are gone"
    assert len(sessions) == 0 and not any((tmp_path / "store").glob("*"))


def test_a_refused_archive_leaves_no_session(sessions: CheckedSessions, tmp_path: Path) -> None:
    upload = _tar(tmp_path / "evil.tar", [("../../escaped.txt", b"x")])
    with pytest.raises(RequestError) as e:
        sessions.add_session(str(upload), uncompress=True)
    assert e.value.status_code == 422 and len(sessions) == 0
    assert not upload.exists() and not any(tmp_path.glob("session-*"))


def test_an_archive_becomes_a_session_folder(sessions: CheckedSessions, tmp_path: Path) -> None:
    volume = gzip.compress(nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), np.eye(4)).to_bytes())
    upload = _received(tmp_path, "one.zip", b"")
    _zip(upload, {"case.nii.gz": volume})
    session_id, info = sessions.add_session(str(upload), uncompress=True)
    assert (Path(info.image) / "case.nii.gz").read_bytes() == volume
    assert sessions.get_session(session_id).image == info.image


@pytest.mark.parametrize("session_id", ["..", "../x", "a/b", "~root"])
def test_session_ids_are_not_paths(sessions: CheckedSessions, session_id: str) -> None:
    for call in (sessions.get_session, sessions.remove_session):
        with pytest.raises(RequestError, match="Session id") as e:
            call(session_id)
        assert e.value.status_code == 400

"""Sessions (``PUT /session/``) whose uploads are bounded and whose archives stay inside the session.

MONAI Label (0.8.5) stores a session's upload whatever its size and unpacks ``uncompress=true``
archives with ``shutil.unpack_archive``: a tar member named ``../../x`` is written outside the
session (Python 3.11 extracts tar members unfiltered), and a file that is no archive is a 500.
``CheckedSessions`` refuses those with a 4xx before anything is stored.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import uuid
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import nibabel as nib
from monailabel.utils.sessions import Sessions

from appcore.errors import RequestError, too_large, unprocessable
from appcore.validation import check_image_id, check_volume, load_nifti


def _tree_size(path: str | Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_size


def _inside(name: str) -> bool:
    """Whether an archive member's name stays below the folder it is unpacked into."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return bool(parts) and not name.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


def unpack_archive(archive: str | Path, dest: str | Path, max_bytes: int) -> None:
    """Unpack a zip or tar (plain, gz, bz2, xz) ``archive`` into ``dest``, refusing with a 4xx first.

    Refused: a file that is neither (422), a member whose name leaves ``dest`` (absolute or with
    ``..``) or that is a link or a device (422), members over ``max_bytes`` in all, uncompressed (413).
    """
    archive = str(archive)
    mb = max_bytes / 2**20
    if zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as z:
                members = z.infolist()
                for m in members:
                    if not _inside(m.filename):
                        raise unprocessable(f"The archive's member {m.filename!r} would be written outside the session")
                if sum(m.file_size for m in members) > max_bytes:
                    raise too_large(
                        f"The archive holds over {mb:.0f} MB once unpacked, the limit (--conf max_upload_mb)"
                    )
                z.extractall(dest)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, OSError) as e:
            raise unprocessable(f"The zip archive cannot be unpacked ({type(e).__name__}: {e})") from None
        return
    try:
        t = tarfile.open(archive, "r:*")  # noqa: SIM115 (closed below; opening is what may fail here)
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        raise unprocessable(
            "uncompress=true needs a zip or tar archive and the upload is neither; send an image with uncompress=false"
        ) from None
    try:
        with t:
            members = t.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()) or not _inside(m.name):
                    raise unprocessable(
                        f"The archive's member {m.name!r} is a link, a device or a path outside the session; "
                        "only files and folders are unpacked"
                    )
            if sum(m.size for m in members) > max_bytes:
                raise too_large(f"The archive holds over {mb:.0f} MB once unpacked, the limit (--conf max_upload_mb)")
            t.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise unprocessable(f"The tar archive cannot be unpacked ({type(e).__name__}: {e})") from None


def _discard(path: str | Path) -> None:
    """Remove a refused upload and the temporary folder MONAI Label received it in, once empty."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    parent, tmp = path.parent, Path(tempfile.gettempdir()).resolve()
    if parent.resolve().parent == tmp and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


class CheckedSessions(Sessions):
    """MONAI Label's sessions with the upload held to ``max_upload_mb``, archives included once unpacked,
    and each NIfTI image judged by its header with ``image_check`` (an app refuses an image no served
    model can segment) before any of its voxels is decoded.

    A refused upload is deleted and nothing is added to the session store.
    """

    def __init__(
        self,
        store_path: str = "",
        expiry: int = 3600,
        *,
        max_upload_mb: int = 1024,
        image_check: Callable[[nib.Nifti1Image, str], None] = check_volume,
    ) -> None:
        super().__init__(store_path, expiry)
        self.max_bytes = max_upload_mb * 2**20
        self.max_upload_mb = max_upload_mb
        self.image_check = image_check

    def _check_images(self, data_file: str | Path) -> None:
        """Judge every NIfTI file of the upload (or of the unpacked archive) by its header, with
        ``image_check``, before the session is kept: its voxels are then read through once, streamed."""
        path = Path(data_file)
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for f in files:
            if f.name.lower().endswith((".nii", ".nii.gz")):
                what = "session image"
                load_nifti(f, what, self.max_upload_mb, check=lambda img, what=what: self.image_check(img, what))

    def add_session(
        self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id: Any = None
    ) -> tuple[str, Any]:
        try:
            size = _tree_size(data_file)
            if size > self.max_bytes:
                raise too_large(
                    f"The session upload is {size / 2**20:.1f} MB; the limit is {self.max_upload_mb} MB "
                    "(--conf max_upload_mb)"
                )
            if uncompress and not os.path.isdir(data_file):
                folder = tempfile.mkdtemp(prefix="session-")
                try:
                    unpack_archive(data_file, folder, self.max_bytes)
                except BaseException:
                    shutil.rmtree(folder, ignore_errors=True)
                    raise
                Path(data_file).unlink(missing_ok=True)
                data_file, uncompress = folder, False
            self._check_images(data_file)
        except RequestError:
            _discard(data_file)
            raise
        # MONAI Label's ids are uuid1: the time and the server's MAC address, so guessable.
        return super().add_session(data_file, expiry, uncompress, session_id or str(uuid.uuid4()))

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True) -> Any:
        check_image_id(session_id, "Session id")  # a session is a folder named by its id
        return super().get_session(session_id, update_ts, fetch_cache)

    def remove_session(self, session_id: str) -> None:
        check_image_id(session_id, "Session id")
        super().remove_session(session_id)

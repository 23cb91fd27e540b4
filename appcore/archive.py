"""A ZIP archive written as it is sent, for ``GET /datastore/dataset``.

MONAI Label (0.8.5) builds the whole archive in a temporary file inside its ``async`` endpoint and
never deletes it: the server answers nothing else while it copies every labelled image, and each
download leaves a copy of the dataset in the temporary folder. Here the archive is produced in
chunks by a generator, which Starlette runs in its thread pool as the client reads, so nothing is
written to disk and the other requests are served meanwhile.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 20

logger = logging.getLogger(__name__)


class _Sink(io.RawIOBase):
    """A write-only, unseekable stream whose written bytes are taken out by ``drain``."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._chunks.append(bytes(data))
        return len(data)

    def drain(self) -> Iterator[bytes]:
        chunks, self._chunks = self._chunks, []
        if chunks:
            yield b"".join(chunks)


def zip_chunks(
    cases: Callable[[], Iterable[Sequence[tuple[str, str | os.PathLike[str]]]]],
    extra: Callable[[], dict[str, bytes]] = dict,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """The bytes of a ZIP archive (stored, not deflated: NIfTI and TIFF are compressed already).

    ``cases`` gives, per case, the (name in the archive, file) pairs that belong together, and
    ``extra`` (name, content) pairs added after them; both are called when the first chunk is asked
    for, so that slow listings (a PACS query) run where the chunks are produced and not where the
    generator is made. A case's files are all opened before any of them is written: one deleted or
    replaced after that is sent as it was, and a case one of whose files is already gone (a label
    removed while the archive streams) is left out whole, so the archive stays complete and no
    image arrives without its label. A file is read ``chunk_bytes`` at a time: memory stays bounded
    whatever the size of the dataset.
    """
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for files in cases():
            with contextlib.ExitStack() as stack:
                try:
                    opened = [(name, stack.enter_context(open(path, "rb"))) for name, path in files]
                except FileNotFoundError as e:
                    logger.warning("dataset archive: %s left out, %s is gone", [n for n, _ in files], e.filename)
                    continue
                for name, source in opened:
                    with archive.open(_entry(name, source), "w") as target:
                        while block := source.read(chunk_bytes):
                            target.write(block)
                            yield from sink.drain()
                    yield from sink.drain()
        for name, content in extra().items():
            archive.writestr(name, content)
    yield from sink.drain()


def _entry(name: str, source: BinaryIO) -> zipfile.ZipInfo:
    """The archive entry of an open file: its size (which decides ZIP64 up front), time and mode."""
    stat = os.fstat(source.fileno())
    info = zipfile.ZipInfo(name, max(time.localtime(stat.st_mtime)[:6], (1980, 1, 1, 0, 0, 0)))
    info.external_attr = (stat.st_mode & 0xFFFF) << 16
    info.file_size = stat.st_size
    return info


def dataset_members(datalist: Iterable[dict[str, str]]) -> Iterator[list[tuple[str, Path]]]:
    """MONAI Label's archive layout: ``image/<file>`` and ``label/<file>``, one case per datalist entry."""
    for entry in datalist:
        yield [(f"{key}/{Path(path).name}", Path(path)) for key, path in entry.items()]

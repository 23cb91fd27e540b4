"""A ZIP archive written as it is sent, for ``GET /datastore/dataset``.

MONAI Label (0.8.5) builds the whole archive in a temporary file inside its ``async`` endpoint and
never deletes it: the server answers nothing else while it copies every labelled image, and each
download leaves a copy of the dataset in the temporary folder. Here the archive is produced in
chunks by a generator, which Starlette runs in its thread pool as the client reads, so nothing is
written to disk and the other requests are served meanwhile.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

CHUNK_BYTES = 1 << 20


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
    members: Callable[[], Iterable[tuple[str, str | os.PathLike[str]]]],
    extra: Callable[[], dict[str, bytes]] = dict,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """The bytes of a ZIP archive (stored, not deflated: NIfTI and TIFF are compressed already).

    ``members`` gives (name in the archive, file) pairs and ``extra`` (name, content) pairs added
    after them; both are called when the first chunk is asked for, so that slow listings (a PACS
    query) run where the chunks are produced and not where the generator is made. A file is read
    ``chunk_bytes`` at a time: memory stays bounded whatever the size of the dataset.
    """
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, path in members():
            info = zipfile.ZipInfo.from_file(path, arcname=name)  # its size decides ZIP64 up front
            with open(path, "rb") as source, archive.open(info, "w") as target:
                while block := source.read(chunk_bytes):
                    target.write(block)
                    yield from sink.drain()
            yield from sink.drain()
        for name, content in extra().items():
            archive.writestr(name, content)
    yield from sink.drain()


def dataset_members(datalist: Iterable[dict[str, str]]) -> Iterator[tuple[str, Path]]:
    """MONAI Label's archive layout: ``image/<file>`` and ``label/<file>`` for each datalist entry."""
    for entry in datalist:
        for key, path in entry.items():
            yield f"{key}/{Path(path).name}", Path(path)

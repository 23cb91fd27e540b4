"""Small NIfTI files that declare huge voxel grids (gzip bombs), written in a blink for tests and benchmarks."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

_CHUNK = bytes(16 * 2**20)
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03"  # deflate, no name, mtime 0, best compression, Unix


def write_nifti_bomb(
    path: Path,
    shape: tuple[int, ...],
    dtype: type | str = np.uint8,
    affine: np.ndarray | None = None,
    *,
    edit: Callable[[nib.Nifti1Header], None] | None = None,
) -> Path:
    """A complete, valid ``.nii.gz`` of zeros on ``shape`` in ``dtype``, without ever holding the volume.

    The zeros are compressed once in 16 MB pieces, each ended by a full flush (so that it stands
    alone in the deflate stream) and repeated: a 1024^3 uint8 volume is a 1 MB file, written in
    about a second (most of it the CRC). ``edit`` may change the header (a NaN in the affine, say).
    """
    header = nib.Nifti1Image(np.zeros((1, 1, 1), dtype), np.eye(4) if affine is None else affine).header
    header.set_data_shape(shape)
    header.set_data_offset(352)
    if edit is not None:
        edit(header)
    head = header.binaryblock + b"\x00" * 4  # no extensions; the voxels start at byte 352
    total = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    crc = zlib.crc32(head)
    with open(path, "wb") as out:
        out.write(_GZIP_HEADER)
        out.write(deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH))
        whole, rest = divmod(total, len(_CHUNK))
        if whole:
            piece = deflate.compress(_CHUNK) + deflate.flush(zlib.Z_FULL_FLUSH)
            for _ in range(whole):
                out.write(piece)
                crc = zlib.crc32(_CHUNK, crc)
        out.write(deflate.compress(_CHUNK[:rest]) + deflate.flush())
        crc = zlib.crc32(_CHUNK[:rest], crc)
        out.write(struct.pack("<II", crc, (len(head) + total) & 0xFFFFFFFF))
    return path

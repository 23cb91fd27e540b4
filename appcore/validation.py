"""Checks at the boundary: image ids from requests and label volumes from uploads."""

from __future__ import annotations

import gzip
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np

from appcore.errors import RequestError, bad_request, too_large, unprocessable

_ID_FORBIDDEN = re.compile(r"[/\\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Ids and tags become file names (with an extension, 255 bytes at most on common file systems).
MAX_ID_BYTES = 200
# Besides letters and digits (of any script), the characters an id or a tag may hold.
_ID_PUNCTUATION = frozenset("._-+=@,()[] ")
# Scripts whose letters pass for Latin ones ("fіnal" with a Cyrillic i): one id mixes none with Latin.
_LOOKALIKE_SCRIPTS = ("CYRILLIC", "GREEK", "ARMENIAN", "CHEROKEE")


def id_key(name: str) -> str:
    """What two ids or tags are compared by: ``final``, ``Final`` and ``ＦＩＮＡＬ`` share one key."""
    return unicodedata.normalize("NFKC", name).casefold()


def _scripts(name: str) -> set[str]:
    return {unicodedata.name(c, "?").split()[0] for c in name if c.isalpha()}


def check_image_id(image_id: object, what: str = "Image id", existing: Iterable[str] = ()) -> str:
    """Return ``image_id`` if it is a plain datastore id; refuse anything else with a 400.

    One rule for image ids, label tags and session ids alike (``what`` names the parameter in the
    message). Refused: paths and traversal (``/``, ``\\``, ``..``, ``~``, a leading ``.``),
    leading or trailing whitespace, control and invisible characters, characters other than letters,
    digits and ``._-+=@,()[]`` and inner spaces, text that Unicode NFKC normalisation changes
    (full-width letters, ligatures), Latin mixed with Cyrillic, Greek, Armenian or Cherokee letters
    (look-alikes), and over ``MAX_ID_BYTES`` bytes. With ``existing`` (the ids or tags already
    stored), an id that equals one of them once case and Unicode forms are ignored (``id_key``) but
    differs from it is refused too, naming the one that exists: ``Final`` beside ``final`` would be
    stored and trained as another tag.
    """
    if not isinstance(image_id, str) or not image_id.strip():
        raise bad_request(f"{what} is required: a plain name as GET /datastore/?output=all lists it")
    if _ID_FORBIDDEN.search(image_id) or ".." in image_id or image_id.startswith("~"):
        raise bad_request(
            f"{what} {image_id!r} contains a path ('/', '\\\\', '..' or '~'); "
            "ids and tags are plain names as GET /datastore/?output=all lists them, not file paths"
        )
    if _CONTROL.search(image_id):
        raise bad_request(
            f"{what} {image_id!r} contains a control character (a line break, a tab, NUL): "
            "ids and tags are plain names that become file names"
        )
    if image_id != image_id.strip():
        raise bad_request(f"{what} {image_id!r} starts or ends with whitespace; send it without")
    if image_id.startswith("."):
        raise bad_request(f"{what} {image_id!r} starts with '.': that names a hidden file, not an image or a tag")
    if len(image_id.encode()) > MAX_ID_BYTES:
        raise bad_request(
            f"{what} is {len(image_id.encode())} bytes long; at most {MAX_ID_BYTES} fit a file name with its extension"
        )
    odd = sorted({c for c in image_id if not (c.isalnum() or c in _ID_PUNCTUATION)})
    if odd:
        raise bad_request(
            f"{what} {image_id!r} contains {', '.join(repr(c) for c in odd)}; ids and tags hold letters, digits, "
            "inner spaces and ._-+=@,()[] only"
        )
    if unicodedata.normalize("NFKC", image_id) != image_id:
        raise bad_request(
            f"{what} {image_id!r} holds compatibility characters (full-width letters, ligatures); "
            f"write it as {unicodedata.normalize('NFKC', image_id)!r}"
        )
    scripts = _scripts(image_id)
    if "LATIN" in scripts and scripts.intersection(_LOOKALIKE_SCRIPTS):
        raise bad_request(
            f"{what} {image_id!r} mixes Latin letters with {', '.join(sorted(scripts - {'LATIN'}))} ones, "
            "which look alike; write it in one script"
        )
    key = id_key(image_id)
    twin = next((e for e in existing if e != image_id and id_key(e) == key), None)
    if twin is not None:
        raise bad_request(
            f"{what} {image_id!r} differs from the existing {twin!r} only in case or Unicode form; "
            f"use {twin!r} (ids and tags that look the same must be the same)"
        )
    return image_id


def check_device(value: object, what: str) -> None:
    """Refuse (422) a ``device`` parameter torch cannot use: MONAI Label passes it on unchecked.

    Accepted as MONAI Label reads it: none, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` for a present device
    (``cuda`` and ``cuda:N`` mean the CPU where there is no GPU), a GPU name as ``/info`` lists it,
    or a list of these (the first is used).
    """
    import torch
    from monailabel.utils.others.generic import device_map

    if not value:  # MONAI Label then picks the default device
        return
    first = value[0] if isinstance(value, list) and value else value
    index = first[5:] if isinstance(first, str) and first.startswith("cuda:") else ""
    present = index.isdigit() and (not torch.cuda.is_available() or int(index) < torch.cuda.device_count())
    ok = isinstance(first, str) and (first in ("cpu", "cuda") or first in device_map() or present)
    if not ok:
        raise unprocessable(
            f"{what} parameter 'device' must be 'cpu', 'cuda' or 'cuda:N' of a present GPU, got {value!r}"
        )


def check_upload_size(path: str | Path, max_mb: int, what: str) -> None:
    size = os.path.getsize(path)
    if size == 0:
        raise unprocessable(f"The uploaded {what} is empty (0 bytes)")
    if size > max_mb * 1024 * 1024:
        raise too_large(
            f"The uploaded {what} is {size / 2**20:.1f} MB; the limit is {max_mb} MB (--conf max_upload_mb)"
        )


def _unreadable(what: str, e: Exception, path: str | Path) -> RequestError:
    """A 422 with nibabel's reason, naming the file by its name only (not the server's folders)."""
    reason = str(e).replace(str(path), Path(path).name)
    return unprocessable(f"The {what} is not a readable NIfTI file ({type(e).__name__}: {reason})")


def _is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open_stream(path: str | Path) -> BinaryIO:
    """The file's bytes as NIfTI stores them: decompressed on the fly when gzipped, whatever its name."""
    return gzip.GzipFile(path, "rb") if _is_gzip(path) else open(path, "rb")  # noqa: SIM115 (returned)


def _read_header(path: str | Path) -> nib.Nifti1Image:
    """A NIfTI image of ``path`` with only its header read (voxels stay on disk, behind a proxy).

    Uploads may arrive in a temporary file without the client's extension, which ``nib.load``
    needs; such a file is opened by its content instead (gzip or not, NIfTI-1 or NIfTI-2).
    """
    if str(path).endswith((".nii", ".nii.gz")):
        return nib.load(str(path))
    with _open_stream(path) as f:
        first = f.read(4)
    sizeof_hdr = {int.from_bytes(first, "little"), int.from_bytes(first, "big")}
    klass = nib.Nifti2Image if 540 in sizeof_hdr else nib.Nifti1Image
    holder = nib.FileHolder(filename=str(path), fileobj=_open_stream(path))
    return klass.from_file_map({"header": holder, "image": holder})


def nifti_header(path: str | Path, what: str) -> nib.Nifti1Image:
    """Open a NIfTI file reading its header only; a 422 that names ``what`` if it cannot."""
    try:
        img = _read_header(path)
    except Exception as e:  # nibabel raises many unrelated types for corrupt files
        raise _unreadable(what, e, path) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise unprocessable(f"The {what} must be NIfTI (.nii or .nii.gz), got {type(img).__name__}")
    return img


def header_only(shape: tuple[int, ...], affine: np.ndarray, dtype: type = np.int16) -> nib.Nifti1Image:
    """A NIfTI image of ``shape`` and ``affine`` holding no voxels (a zero-stride view), for judging
    a volume by its geometry before it is decoded (a DICOM series, say)."""
    return nib.Nifti1Image(np.broadcast_to(np.zeros((), dtype), shape), np.asarray(affine, dtype=np.float64))


def voxel_data_bytes(img: nib.Nifti1Image) -> int:
    """Bytes of voxel data the header declares (in the file's own dtype), as decompressed."""
    return int(np.prod(img.shape, dtype=np.float64)) * img.get_data_dtype().itemsize


# Bytes read (decompressed) at a time when a NIfTI file's voxel data is checked without decoding it.
STREAM_CHUNK = 16 * 2**20


def check_voxel_stream(path: str | Path, img: nib.Nifti1Image, what: str) -> None:
    """Refuse (422) a file that ends before the voxel data its header declares (a truncated gzip,
    say), reading it in ``STREAM_CHUNK`` pieces: no decoded copy of the volume is ever held."""
    needed = int(img.header.get_data_offset()) + voxel_data_bytes(img)
    got = 0
    try:
        with _open_stream(path) as f:
            while got < needed:
                chunk = f.read(min(STREAM_CHUNK, needed - got))
                if not chunk:
                    break
                got += len(chunk)
    except Exception as e:  # a corrupt gzip stream: EOFError, zlib.error, BadGzipFile
        raise _unreadable(what, e, path) from None
    if got < needed:
        raise unprocessable(
            f"The {what} ends after {got:,} bytes of its {needed:,} (header and voxel data): the file is truncated"
        )


def open_nifti(path: str | Path, what: str, max_mb: int | None = None) -> nib.Nifti1Image:
    """Open a NIfTI file judging it by its header alone: a 422 for a file that is not NIfTI, holds
    no scalar voxels or has an unusable voxel-to-world affine (``check_affine``); with ``max_mb``, a
    413 for voxel data over that size once decompressed (a small gzip file can declare gigabytes
    of zeros). Nothing of the voxel data is read: ``check_voxel_stream`` does that, streamed."""
    img = nifti_header(path, what)
    if max_mb is not None and voxel_data_bytes(img) > max_mb * 2**20:
        raise too_large(
            f"The {what} holds over {max_mb} MB of voxel data once decompressed "
            f"({voxel_data_bytes(img) / 2**20:,.0f} MB: {' x '.join(map(str, img.shape))} {img.get_data_dtype()}), "
            "the limit (--conf max_upload_mb): crop or resample it"
        )
    check_scalar_voxels(img, what)
    check_affine(img, what)
    return img


def load_nifti(
    path: str | Path,
    what: str,
    max_mb: int | None = None,
    check: Callable[[nib.Nifti1Image], None] | None = None,
) -> nib.Nifti1Image:
    """``open_nifti``, then ``check`` (more header checks of the caller's), then the voxel data read
    through once, streamed, so that a truncated file is a 422 now and not a failure later. Every
    refusal comes before any voxel is decoded; the image returned reads its voxels on demand."""
    img = open_nifti(path, what, max_mb)
    if check is not None:
        check(img)
    check_voxel_stream(path, img, what)
    return img


# Voxel sizes (mm) a header may give. Outside, the file is broken or in another unit: no scan has
# voxels under a micrometre or over ten metres.
VOXEL_SIZE_RANGE_MM = (1e-4, 1e5)
# How far (mm) a file's qform and sform may disagree: both are stored in float32.
QFORM_SFORM_ATOL_MM = 1e-2


def check_affine(img: nib.spatialimages.SpatialImage, what: str) -> None:
    """Refuse (422) a voxel-to-world affine that no resampling can use: NaN or infinite entries, a
    zero, absurd or collinear voxel axis (not invertible), or a NIfTI qform and sform that place
    the voxels in different places (viewers differ on which they show)."""
    affine = np.asarray(img.affine, dtype=np.float64)
    fix = "rewrite the file's header with the scanner geometry (3D Slicer or nibabel can)"
    if not np.all(np.isfinite(affine)):
        raise unprocessable(f"The {what} has a voxel-to-world affine with NaN or infinite entries: {fix}")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    low, high = VOXEL_SIZE_RANGE_MM
    if np.any(sizes < low) or np.any(sizes > high):
        raise unprocessable(
            f"The {what} has voxels of {' x '.join(f'{v:g}' for v in sizes)} mm, outside "
            f"[{low:g}, {high:g}] mm (zero, or in another unit than mm): {fix}"
        )
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(sizes)):
        raise unprocessable(
            f"The {what} has a singular voxel-to-world affine (its voxel axes are collinear), so it cannot be "
            f"resampled: {fix}"
        )
    header = getattr(img, "header", None)
    if isinstance(header, nib.Nifti1Header) and header["qform_code"] > 0 and header["sform_code"] > 0:
        qform, sform = header.get_qform(), header.get_sform()
        if not (np.all(np.isfinite(qform)) and np.allclose(qform, sform, atol=QFORM_SFORM_ATOL_MM)):
            raise unprocessable(
                f"The {what} has a qform and an sform that disagree (voxel (0, 0, 0) at "
                f"{np.round(qform[:3, 3], 2).tolist()} against {np.round(sform[:3, 3], 2).tolist()} mm, or other "
                "axes): viewers differ on which they use; write the file with one of them (qform_code or "
                "sform_code 0) or both equal"
            )


# How far (mm) a label's or a replacement image's voxel-to-world affine may be from the image's.
AFFINE_ATOL_MM = 1e-3


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a volume: spatial shape and voxel-to-world affine."""

    shape: tuple[int, ...]
    affine: np.ndarray

    @classmethod
    def of(cls, img: nib.spatialimages.SpatialImage) -> Geometry:
        return cls(tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64))

    def differs_from(self, other: Geometry) -> str | None:
        """How this grid differs from ``other`` (shape first, then the affine to ``AFFINE_ATOL_MM``), or ``None``."""
        if self.shape != other.shape:
            return f"shape {self.shape} against {other.shape}"
        if not np.allclose(self.affine, other.affine, atol=AFFINE_ATOL_MM):
            return "the same shape, but other voxel-to-world affines"
        return None


def off_grid(label_path: str | Path, image_path: str | Path) -> str | None:
    """Why a stored label no longer lies on its image's grid, or ``None`` (also where either file is
    not NIfTI). Saving checks this; an image file written over in the studies folder afterwards can
    break it, and such a pair would end every training run."""
    if not all(str(p).endswith((".nii", ".nii.gz")) for p in (label_path, image_path)):
        return None
    label, image = Geometry.of(nifti_header(label_path, "label")), Geometry.of(nifti_header(image_path, "image"))
    how = label.differs_from(image)
    return (
        f"it no longer lies on its image's grid ({how}): the image changed after the label was saved" if how else None
    )


def label_from_buffer(image_path: str | Path, buffer_path: str | Path) -> str:
    """A raw label buffer as OHIF sends it (one uint8 per voxel of the image's grid, x fastest)
    written as NIfTI with the image's affine to a temporary file; a 422 if the size does not fit."""
    image = nifti_header(image_path, "image")
    shape = tuple(int(n) for n in image.shape[:3])
    expected, size = int(np.prod(shape)), os.path.getsize(buffer_path)
    if size != expected:
        raise unprocessable(
            f"The label buffer holds {size} bytes; the image's {' x '.join(map(str, shape))} grid needs {expected}, "
            "one uint8 per voxel (x fastest)"
        )
    data = np.fromfile(buffer_path, dtype=np.uint8).reshape(shape, order="F")
    fd, out = tempfile.mkstemp(suffix=".nii.gz")
    os.close(fd)
    nib.save(nib.Nifti1Image(data, image.affine, image.header), out)
    return out


def check_volume_shape(shape: tuple[int, ...], what: str) -> None:
    """Refuse (422) anything but a 3D volume, or a 4D one with a single component as some tools write."""
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or min(shape[:3], default=0) < 1:
        raise unprocessable(f"The {what} must be a 3D volume, got shape {tuple(shape)}")


def check_volume(img: nib.spatialimages.SpatialImage, what: str) -> None:
    """``check_volume_shape``, ``check_scalar_voxels`` and ``check_affine``: all from the header."""
    check_volume_shape(img.shape, what)
    check_scalar_voxels(img, what)
    check_affine(img, what)


def check_scalar_voxels(img: nib.spatialimages.SpatialImage, what: str) -> None:
    """Refuse (422) voxels that are not one real number each: complex values (MR phase or k-space
    data; MONAI would keep the real part without a word) and RGB."""
    dtype = img.get_data_dtype()
    if dtype.kind == "c":
        raise unprocessable(f"The {what} holds complex-valued voxels ({dtype}): send a magnitude image")
    if dtype.kind not in "biuf":
        raise unprocessable(f"The {what} holds {dtype} voxels (RGB or another non-scalar type): send one channel")


# Voxels a volume may have once resampled to a model's spacing (2**27: 512 x 512 x 512). Real scans
# stay far below (a whole-body CT at 2 x 2 x 3 mm: about 10 M; a brain MR at 1 mm: 17 M); a header
# with a wrong spacing (metres for millimetres) would otherwise ask for terabytes and fail as a 500.
MAX_RESAMPLED_VOXELS = 2**27


def resampled_shape(shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, ...]) -> tuple[int, ...]:
    """The grid of a volume of ``shape`` voxels once resampled to ``spacing`` (mm along the world's
    R, A, S axes, as a model resamples after reorienting)."""
    sizes = nib.affines.voxel_sizes(affine)
    world_axis = nib.orientations.io_orientation(affine)[:, 0]  # NaN for an axis with no direction
    target = []
    for n, size, axis in zip(shape[:3], sizes, world_axis, strict=False):
        step = spacing[int(axis)] if np.isfinite(axis) else min(spacing)
        target.append(max(1, round(n * float(size) / step)))
    return tuple(target)


def _grids(shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, ...], what: str) -> str:
    sizes = nib.affines.voxel_sizes(affine)
    return (
        f"The {what} is {' x '.join(map(str, shape[:3]))} voxels of "
        f"{' x '.join(f'{float(v):g}' for v in sizes)} mm; at the model's spacing "
        f"({' x '.join(f'{v:g}' for v in spacing)} mm) that is"
    )


def check_resampled_size(
    shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, ...], what: str, limit: int = MAX_RESAMPLED_VOXELS
) -> None:
    """Refuse (422) a volume whose grid at ``spacing`` (``resampled_shape``) would exceed ``limit``
    voxels or be a single voxel, naming both grids."""
    target = resampled_shape(shape, affine, spacing)
    voxels = int(np.prod(target, dtype=np.float64))
    if voxels > limit:
        raise unprocessable(
            f"{_grids(shape, affine, spacing, what)} {' x '.join(map(str, target))} voxels, over the {limit:,} this "
            "server resamples for a model: crop the image, or check the voxel size in its header"
        )
    if voxels == 1:
        raise unprocessable(
            f"{_grids(shape, affine, spacing, what)} a single voxel: nothing to segment; check the voxel size in "
            "its header"
        )


# What one infer holds at its peak, measured on this project's CPU per step (``python -m
# benchmarks.attacks``, and step by step on a 512 x 512 x 300 int16 CT, 2026-12-07). Its steps
# hold the image's own grid and the model's grid at different times, so the estimate is the
# largest of three phases:
# - the image's own grid, read and resampled (``INFER_MARGIN`` above the peaks measured): the
#   decoding (nibabel's buffer and the array: twice the decoded dtype), the volume kept in its
#   compact dtype and its reorientation (``radiology.transforms.CompactDtyped``: int16, uint8 and
#   float32 stay as they are, anything else becomes float32), the cast to float32 before the
#   resampling beside it, non-finite voxels replaced (a copy and a mask), and the resampling, which
#   reads the float32 volume and builds a float32 sampling grid on the model's grid: 32 bytes a
#   voxel there (``INFER_BYTES_PER_RESAMPLED_VOXEL_SAMPLING``);
# - the model's grid, in the network (as measured before, about 30% above): the input, the
#   sliding-window output (one float32 per class), its weight map and the class index: 24 bytes a
#   voxel and 4 more per class, plus the network's activations for one window and the libraries'
#   working buffers, 160 MB;
# - the answer (``INFER_MARGIN`` above): the class map taken back to the image's grid by indexing
#   (``radiology.inverse``: 1 byte a voxel; MONAI's ``Invertd`` took 16 and refused a routine CT)
#   and its copy as the label is written, 3 bytes a voxel, beside the class map on the model's grid.
# On the 512 x 512 x 300 int16 CT the first phase peaked at 453 MB over the idle process (the cast
# to float32: 6 bytes a voxel), the network at 289 MB and the answer at 224 MB.
INFER_MARGIN = 1.3
INFER_FIXED_MB = 160
INFER_BYTES_PER_RESAMPLED_VOXEL = 24
INFER_BYTES_PER_RESAMPLED_VOXEL_AND_CLASS = 4
INFER_BYTES_PER_RESAMPLED_VOXEL_SAMPLING = 32
INFER_BYTES_PER_VOXEL_ANSWER = 3
# The dtypes the pre-processing keeps until the image is reoriented (``CompactDtyped``).
COMPACT_DTYPES = frozenset({"uint8", "int8", "int16", "float16", "float32"})


def bytes_per_voxel(dtype: np.dtype | str, *, scaled: bool = False) -> float:
    """Peak bytes a voxel of the image's own grid takes while an image stored as ``dtype`` (and
    ``scaled`` by a slope or intercept, decoded as float64 then) is read, reoriented and cast to
    float32, before ``INFER_MARGIN``."""
    stored = np.dtype(dtype)
    decoded = np.dtype(np.float64) if scaled else stored  # as nibabel scales
    reading = 2 * stored.itemsize + (decoded.itemsize if scaled else 0)  # file buffer, raw array, scaled
    compact = decoded if decoded.name in COMPACT_DTYPES else np.dtype(np.float32)
    cast = decoded.itemsize + 4  # the decoded (or compact) volume beside its float32 copy
    c = compact.itemsize
    finite = 2 * c + 1 if compact.kind == "f" else 2 * c  # NaN replaced: a copy and a mask; a flip: a copy
    return float(max(reading, cast, finite))


def infer_memory_mb(
    shape: tuple[int, ...],
    affine: np.ndarray,
    spacing: tuple[float, ...],
    classes: int,
    *,
    dtype: np.dtype | str = "float32",
    scaled: bool = False,
) -> float:
    """Peak memory (MB) one infer of a volume of ``shape`` with ``affine``, stored as ``dtype``
    (``scaled`` by a slope or intercept), takes for a model of ``classes`` classes (background
    included) resampling to ``spacing``; see ``INFER_MARGIN``."""
    original = float(np.prod(shape[:3], dtype=np.float64))
    resampled = float(np.prod(resampled_shape(shape, affine, spacing), dtype=np.float64))
    reading = max(
        original * bytes_per_voxel(dtype, scaled=scaled),
        original * 4 + resampled * INFER_BYTES_PER_RESAMPLED_VOXEL_SAMPLING,
    )
    answer = original * INFER_BYTES_PER_VOXEL_ANSWER + resampled * 8
    per_resampled = INFER_BYTES_PER_RESAMPLED_VOXEL + INFER_BYTES_PER_RESAMPLED_VOXEL_AND_CLASS * classes
    network = INFER_FIXED_MB + resampled * per_resampled / 2**20
    return max(INFER_MARGIN * max(reading, answer) / 2**20, network)


def check_infer_memory(
    img: nib.spatialimages.SpatialImage, spacing: tuple[float, ...], classes: int, budget_mb: int, what: str
) -> None:
    """Refuse (413) a volume one infer of which would take over ``budget_mb`` (``infer_memory_mb``),
    from its header: no voxel is decoded."""
    proxy = img.dataobj
    scaled = float(getattr(proxy, "slope", 1.0)) != 1.0 or float(getattr(proxy, "inter", 0.0)) != 0.0
    need = infer_memory_mb(img.shape, img.affine, spacing, classes, dtype=img.get_data_dtype(), scaled=scaled)
    if need > budget_mb:
        target = resampled_shape(img.shape, img.affine, spacing)
        raise too_large(
            f"{_grids(img.shape, img.affine, spacing, what)} {' x '.join(map(str, target))} voxels: segmenting it "
            f"would take about {need:,.0f} MB, over the {budget_mb:,} MB one infer may use (--conf infer_memory_mb). "
            "Crop the image to the region to segment or resample it to a coarser grid; or, on a server with the "
            "memory, raise infer_memory_mb"
        )


def check_segmentable(
    img: nib.spatialimages.SpatialImage,
    spacing: tuple[float, ...],
    what: str,
    *,
    classes: int | None = None,
    budget_mb: int | None = None,
) -> None:
    """What infer refuses by the header alone, for a model resampling to ``spacing``: not a 3D
    volume, complex or RGB voxels, an unusable affine or too large a grid once resampled (422),
    and with ``classes`` and ``budget_mb``, a volume that needs more memory than that (413)."""
    check_volume(img, what)
    check_resampled_size(img.shape, img.affine, spacing, what)
    if classes is not None and budget_mb is not None:
        check_infer_memory(img, spacing, classes, budget_mb, what)


def label_values(path: str | Path) -> frozenset[int]:
    """The values a stored label file holds (stored labels are integer volumes)."""
    return frozenset(int(v) for v in np.unique(np.asanyarray(nib.load(path).dataobj)))


LABEL_VALUE_TOLERANCE = 1e-3


def check_label_geometry(
    label: nib.spatialimages.SpatialImage, image: Geometry, *, atol_mm: float = AFFINE_ATOL_MM
) -> None:
    """Refuse (422) a label that is not a volume on ``image``'s grid (shape, then affine), from its header."""
    check_volume_shape(label.shape, "label")
    shape = tuple(int(n) for n in label.shape[:3])
    if shape != image.shape:
        raise unprocessable(f"Label shape {shape} does not match the image shape {image.shape}")
    if not np.allclose(np.asarray(label.affine), image.affine, atol=atol_mm):
        raise unprocessable(
            "Label geometry does not match the image: voxel-to-world affines differ "
            f"(label spacing {np.round(nib.affines.voxel_sizes(label.affine), 4).tolist()}, "
            f"image spacing {np.round(nib.affines.voxel_sizes(image.affine), 4).tolist()}; "
            f"label origin {np.round(label.affine[:3, 3], 3).tolist()}, "
            f"image origin {np.round(image.affine[:3, 3], 3).tolist()})"
        )


# Voxels of a label checked at a time: its values are converted and checked slab by slab, so a
# float64 copy of the whole volume is never made.
LABEL_SLAB_VOXELS = 2**22
# Wrong label values a refusal lists at most.
MAX_VALUES_LISTED = 20


def _stored_voxels(img: nib.spatialimages.SpatialImage, shape: tuple[int, ...]) -> tuple[np.ndarray, float, float]:
    """The voxels as stored (the file's own dtype, unscaled) in ``shape``, and the scaling to apply."""
    proxy = img.dataobj
    if hasattr(proxy, "get_unscaled"):
        raw = np.asanyarray(proxy.get_unscaled())
        slope, inter = float(proxy.slope), float(proxy.inter)
    else:  # an image made in memory
        raw, slope, inter = np.asanyarray(proxy), 1.0, 0.0
    return raw.reshape(shape), slope, inter


def _values(array: np.ndarray) -> set[int]:
    """The distinct values of an integer array (a label's): counted for bytes (no sort), else sorted."""
    if array.dtype == np.uint8:
        return {int(v) for v in np.flatnonzero(np.bincount(array.ravel(), minlength=1))}
    return {int(v) for v in np.unique(array)}


def validate_label_volume(
    label: nib.spatialimages.SpatialImage,
    image: Geometry,
    allowed: Collection[int],
    *,
    atol_mm: float = AFFINE_ATOL_MM,
) -> np.ndarray:
    """Check a label against its image and the allowed class values; return it as a uint8 array.

    The header is checked first (``check_label_geometry``), then the voxels are decoded in the
    file's own dtype and checked a slab of ``LABEL_SLAB_VOXELS`` at a time.

    Raises:
        RequestError: 422 with what was expected and what came, for a wrong shape, a different
            voxel grid (affine), non-integer values or values outside ``allowed``.
    """
    check_label_geometry(label, image, atol_mm=atol_mm)
    raw, slope, inter = _stored_voxels(label, image.shape)
    scaled = slope != 1.0 or inter != 0.0 or raw.dtype.kind == "f"
    out = np.empty(image.shape, dtype=np.uint8)
    allowed_set = {int(v) for v in allowed}
    extra: set[int] = set()
    step = max(1, LABEL_SLAB_VOXELS // max(1, image.shape[0] * image.shape[1]))
    for z in range(0, image.shape[2], step):
        slab = raw[:, :, z : z + step]
        if scaled:
            values = slab.astype(np.float64) * slope + inter
            if not np.all(np.isfinite(values)):
                raise unprocessable("Label contains NaN or infinite values")
            rounded = np.rint(values)
            # Stored scaling (int16 10, 20 with slope 0.1, say) reads as 1.0000000149: within 0.001 is an id.
            if np.abs(rounded - values).max(initial=0) > LABEL_VALUE_TOLERANCE:
                raise unprocessable("Label values must be integers (class ids); found fractional values")
            slab = rounded
        extra |= _values(slab) - allowed_set
        if len(extra) > MAX_VALUES_LISTED:
            break
        if extra:
            continue  # the other slabs are still read, so that the message lists each wrong value
        out[:, :, z : z + step] = slab
    if extra:
        listed = sorted(extra)[:MAX_VALUES_LISTED]
        more = " and more" if len(extra) > len(listed) else ""
        raise unprocessable(
            f"Label contains values {listed}{more} that are not class ids; allowed values: {sorted(allowed)}"
        )
    return out


__all__ = [
    "Geometry",
    "RequestError",
    "check_image_id",
    "check_affine",
    "check_infer_memory",
    "check_label_geometry",
    "check_upload_size",
    "check_voxel_stream",
    "infer_memory_mb",
    "load_nifti",
    "open_nifti",
    "validate_label_volume",
]

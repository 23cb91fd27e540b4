"""Checks at the boundary: image ids from requests and label volumes from uploads."""

from __future__ import annotations

import os
import re
import tempfile
import unicodedata
import zlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

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


class _Oversized(Exception):
    pass


def _gunzip(raw: bytes, limit: int | None) -> bytes:
    """Decompress a gzip upload, stopping past ``limit`` bytes instead of filling the memory."""
    z = zlib.decompressobj(wbits=31)
    out = z.decompress(raw, 0 if limit is None else limit + 1)
    if limit is not None and len(out) > limit:
        raise _Oversized
    return out


def _unreadable(what: str, e: Exception, path: str | Path) -> RequestError:
    """A 422 with nibabel's reason, naming the file by its name only (not the server's folders)."""
    reason = str(e).replace(str(path), Path(path).name)
    return unprocessable(f"The {what} is not a readable NIfTI file ({type(e).__name__}: {reason})")


def nifti_header(path: str | Path, what: str) -> nib.Nifti1Image:
    """Open a ``.nii``/``.nii.gz`` file reading its header only; a 422 that names ``what`` if it cannot."""
    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises many unrelated types for corrupt files
        raise _unreadable(what, e, path) from None


def load_nifti(path: str | Path, what: str, max_mb: int | None = None) -> nib.Nifti1Image:
    """Open and fully read a NIfTI file, turning any decoding error into a 422 that names ``what``.

    With ``max_mb``, voxel data over that size once decompressed is refused with a 413 before it is
    read: a small gzip file can hold gigabytes of zeros.
    """
    limit = None if max_mb is None else max_mb * 2**20
    too_big = f"The {what} holds over {max_mb} MB of voxel data once decompressed, the limit (--conf max_upload_mb)"
    if str(path).endswith((".nii", ".nii.gz")):
        img = nifti_header(path, what)  # the voxels are read below
    else:
        # Uploads may arrive in a temporary file without the client's extension.
        try:
            raw = Path(path).read_bytes()
            if raw[:2] == b"\x1f\x8b":
                raw = _gunzip(raw, None if limit is None else limit + 2**20)  # room for header and extensions
            img = nib.Nifti1Image.from_bytes(raw)
        except _Oversized:
            raise too_large(too_big) from None
        except Exception as e:
            raise _unreadable(what, e, path) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise unprocessable(f"The {what} must be NIfTI (.nii or .nii.gz), got {type(img).__name__}")
    if limit is not None and int(np.prod(img.shape, dtype=np.int64)) * img.get_data_dtype().itemsize > limit:
        raise too_large(too_big)
    check_scalar_voxels(img, what)
    try:
        img.get_fdata(dtype=np.float32)  # force a full read: a truncated gzip fails here, not later
    except Exception as e:
        raise _unreadable(what, e, path) from None
    return img


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
    """``check_volume_shape`` and ``check_scalar_voxels``."""
    check_volume_shape(img.shape, what)
    check_scalar_voxels(img, what)


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


def check_resampled_size(
    shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, ...], what: str, limit: int = MAX_RESAMPLED_VOXELS
) -> None:
    """Refuse (422) a volume whose grid at ``spacing`` (mm along the world's R, A, S axes, as a
    model resamples after reorienting) would exceed ``limit`` voxels or be a single voxel, naming
    both grids."""
    sizes = nib.affines.voxel_sizes(affine)
    world_axis = nib.orientations.io_orientation(affine)[:, 0]  # NaN for an axis with no direction
    target = []
    for n, size, axis in zip(shape[:3], sizes, world_axis, strict=False):
        step = spacing[int(axis)] if np.isfinite(axis) else min(spacing)
        target.append(max(1, round(n * float(size) / step)))
    grids = (
        f"The {what} is {' x '.join(map(str, shape[:3]))} voxels of "
        f"{' x '.join(f'{float(v):g}' for v in sizes)} mm; at the model's spacing "
        f"({' x '.join(f'{v:g}' for v in spacing)} mm) that is"
    )
    voxels = int(np.prod(target, dtype=np.float64))
    if voxels > limit:
        raise unprocessable(
            f"{grids} {' x '.join(map(str, target))} voxels, over the {limit:,} this server resamples for a "
            "model: crop the image, or check the voxel size in its header"
        )
    if voxels == 1:
        raise unprocessable(f"{grids} a single voxel: nothing to segment; check the voxel size in its header")


def check_segmentable(img: nib.spatialimages.SpatialImage, spacing: tuple[float, ...], what: str) -> None:
    """What infer refuses (422) by the header alone, for a model resampling to ``spacing``: not a
    3D volume, complex or RGB voxels, or too large a grid once resampled."""
    check_volume(img, what)
    check_resampled_size(img.shape, img.affine, spacing, what)


def _spatial_array(img: nib.spatialimages.SpatialImage, what: str) -> np.ndarray:
    check_volume_shape(img.shape, what)
    data = np.asanyarray(img.dataobj)
    return data[..., 0] if data.ndim == 4 else data


def label_values(path: str | Path) -> frozenset[int]:
    """The values a stored label file holds (stored labels are integer volumes)."""
    return frozenset(int(v) for v in np.unique(np.asanyarray(nib.load(path).dataobj)))


LABEL_VALUE_TOLERANCE = 1e-3


def validate_label_volume(
    label: nib.spatialimages.SpatialImage,
    image: Geometry,
    allowed: Collection[int],
    *,
    atol_mm: float = AFFINE_ATOL_MM,
) -> np.ndarray:
    """Check a label against its image and the allowed class values; return it as a uint8 array.

    Raises:
        RequestError: 422 with what was expected and what came, for a wrong shape, a different
            voxel grid (affine), non-integer values or values outside ``allowed``.
    """
    data = _spatial_array(label, "label")
    if tuple(data.shape) != image.shape:
        raise unprocessable(f"Label shape {tuple(data.shape)} does not match the image shape {image.shape}")
    if not np.allclose(np.asarray(label.affine), image.affine, atol=atol_mm):
        raise unprocessable(
            "Label geometry does not match the image: voxel-to-world affines differ "
            f"(label spacing {np.round(nib.affines.voxel_sizes(label.affine), 4).tolist()}, "
            f"image spacing {np.round(nib.affines.voxel_sizes(image.affine), 4).tolist()}; "
            f"label origin {np.round(label.affine[:3, 3], 3).tolist()}, "
            f"image origin {np.round(image.affine[:3, 3], 3).tolist()})"
        )
    if not np.all(np.isfinite(data)):
        raise unprocessable("Label contains NaN or infinite values")
    rounded = np.rint(data)
    # Stored scaling (int16 10, 20 with slope 0.1, say) reads as 1.0000000149: within 0.001 is an id.
    if np.abs(rounded - data).max(initial=0) > LABEL_VALUE_TOLERANCE:
        raise unprocessable("Label values must be integers (class ids); found fractional values")
    values = {int(v) for v in np.unique(rounded)}
    extra = sorted(values - set(allowed))
    if extra:
        raise unprocessable(f"Label contains values {extra} that are not class ids; allowed values: {sorted(allowed)}")
    return rounded.astype(np.uint8)


__all__ = [
    "Geometry",
    "RequestError",
    "check_image_id",
    "check_upload_size",
    "load_nifti",
    "validate_label_volume",
]

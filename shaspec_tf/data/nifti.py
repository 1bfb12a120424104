"""Reading one NIfTI volume safely: the header's declared size is checked against the file and a voxel limit before
any voxel is read, and every failure is a one-line :class:`NiftiError` naming the file.

A NIfTI header is a claim: a 100-byte file may declare a 1200^3 volume, and loading it would allocate gigabytes
before failing. Before any voxel is read, the declared size (shape x data type) is checked against the file: an
uncompressed file must be at least that large, and a compressed one (``.nii.gz``) is read through once, counting its
bytes without keeping them, and must hold them all. Whatever the file, a volume may hold at most
:func:`max_voxels_limit` voxels (default :data:`MAX_VOXELS`, 512^3; a ``max_voxels`` argument or the environment
variable ``SHASPEC_MAX_VOXELS`` change it).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

__all__ = ["MAX_VOXELS", "MAX_VOXELS_ENV", "NiftiError", "check_declared_size", "fail", "max_voxels_limit",
           "read_volume"]


class NiftiError(ValueError):
    """A NIfTI file (or a case made of them) that cannot be read as specified; the message names it, on one line."""


def fail(where, what) -> NiftiError:
    return NiftiError(f"{where}: {' '.join(str(what).split())}")


#: Default upper bound on the voxels of one volume, 512^3 (134 M). A BraTS volume has 240 x 240 x 155 = 8.9 M and
#: clinical 3D MRI rarely exceeds 512 x 512 x 400 (105 M), so real data passes with room to spare, while one case at
#: the limit (four float32 sequences, their stack and the float64 normalisation) already needs about 5 GB: a header
#: claiming more is far likelier a corrupt or hostile file than a scan. Raise it with ``max_voxels`` or
#: :data:`MAX_VOXELS_ENV`.
MAX_VOXELS = 512 ** 3
#: Environment variable overriding :data:`MAX_VOXELS` (a positive integer), e.g. for ``shaspec predict``.
MAX_VOXELS_ENV = "SHASPEC_MAX_VOXELS"
_STREAM_CHUNK = 1 << 22          # bytes per read when counting a compressed stream


def max_voxels_limit(max_voxels: Optional[int] = None) -> int:
    """The voxel limit per volume: ``max_voxels`` when given, else ``$SHASPEC_MAX_VOXELS`` when set, else
    :data:`MAX_VOXELS`. A one-line ``ValueError`` for anything but a positive integer."""
    source, value = "max_voxels", max_voxels
    if value is None:
        text = os.environ.get(MAX_VOXELS_ENV, "").strip()
        if not text:
            return MAX_VOXELS
        source, value = MAX_VOXELS_ENV, text
    try:
        limit = int(value)
        if isinstance(value, float) and value != limit:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be a positive integer (voxels per volume), got {value!r}") from None
    if limit < 1:
        raise ValueError(f"{source} must be a positive integer (voxels per volume), got {value!r}")
    return limit


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_declared_size(path, image, shape: Tuple[int, ...], limit: int) -> None:
    """Refuse, before any voxel data is read, a header whose declared size the file cannot back or that exceeds
    ``limit`` voxels (see the module docstring)."""
    if any(s < 1 for s in shape):
        raise fail(path, f"header declares an empty volume of shape {shape}")
    voxels = int(np.prod([int(s) for s in shape], dtype=object))
    try:
        dtype = np.dtype(image.get_data_dtype())
    except Exception as error:  # noqa: BLE001
        raise fail(path, f"cannot read NIfTI header (data type: {error})") from error
    nbytes = voxels * dtype.itemsize
    declared = f"header declares shape {shape} of {dtype.name}"
    proxy = image.dataobj
    source = getattr(proxy, "file_like", None)
    offset = getattr(proxy, "offset", None)
    readable = isinstance(source, (str, os.PathLike)) and isinstance(offset, (int, np.integer))
    compressed = readable and str(source).lower().endswith((".gz", ".bz2", ".zst", ".mgz"))
    if readable and not compressed:
        size = os.path.getsize(source)
        if size < int(offset) + nbytes:
            raise fail(path, f"{declared} ({_bytes(nbytes)} of voxel data), but the file "
                              f"holds {size} bytes: truncated, or not what its header says")
    if voxels > limit:
        raise fail(path, f"{declared} = {voxels:,} voxels, above the limit of {limit:,} per volume (set max_voxels, "
                          f"--max-voxels or {MAX_VOXELS_ENV} to allow more); the file holds "
                          f"{os.path.getsize(source) if readable else 'an unknown number of'} bytes")
    if compressed:
        from nibabel.openers import ImageOpener

        need, got = int(offset) + nbytes, 0
        try:
            with ImageOpener(str(source), "rb") as stream:
                while got < need:
                    chunk = stream.read(min(_STREAM_CHUNK, need - got))
                    if not chunk:
                        break
                    got += len(chunk)
        except Exception as error:  # noqa: BLE001 -- EOFError, zlib.error, OSError, ... for a broken stream
            raise fail(path, f"cannot read voxel data, truncated or corrupt file? ({type(error).__name__}: "
                              f"{error}; {declared})") from error
        if got < need:
            raise fail(path, f"{declared} ({_bytes(nbytes)} of voxel data), but the "
                              f"uncompressed stream holds {got} bytes: truncated, or not what its header says")


def read_volume(path, max_voxels: int = MAX_VOXELS):
    """``(float32 data (i, j, k), affine, zooms)`` as stored; every reading failure -> one-line error. The header's
    declared size is checked (:func:`check_declared_size`) before any voxel is read."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape = tuple(int(s) for s in image.shape)
    except Exception as error:  # noqa: BLE001 -- nibabel raises many kinds for corrupt files
        raise fail(path, f"cannot read NIfTI header ({type(error).__name__}: {error})") from error
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise fail(path, f"expected a 3D volume, got shape {shape}")
    check_declared_size(path, image, shape, max_voxels)
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except MemoryError:
        raise fail(path, f"not enough memory to load shape {shape} "
                          f"({_bytes(int(np.prod(shape, dtype=object)) * 4)} as float32)") from None
    except Exception as error:  # noqa: BLE001 -- truncated gzip: EOFError, zlib.error, OSError, ValueError
        raise fail(path, f"cannot read voxel data, truncated or corrupt file? ({type(error).__name__}: {error})"
                    ) from error
    data = data.reshape(shape[:3])
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise fail(path, f"{bad} voxels are NaN or Inf")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data, np.asarray(image.affine, dtype=np.float64), zooms

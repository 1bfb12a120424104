"""Reading one NIfTI volume safely: the header's declared size is checked against the file and a voxel limit before
any voxel is read, and every failure is a one-line :class:`NiftiError` naming the file.

A NIfTI header is a claim: a 100-byte file may declare a 1200^3 volume, and loading it would allocate gigabytes
before failing. Before any voxel is read, the declared size (shape x data type) is checked against the file: an
uncompressed file must be at least that large, and a compressed one (``.nii.gz``) is read through once, counting its
bytes without keeping them, and must hold them all. Whatever the file, a volume may hold at most
:func:`max_voxels_limit` voxels (default :data:`MAX_VOXELS`, 512^3; a ``max_voxels`` argument or the environment
variable ``SHASPEC_MAX_VOXELS`` change it).

A path may be a URI (``gs://bucket/case/case_flair.nii.gz``, through :mod:`shaspec_tf.fileio`): its header is read
from the start of the object's stream (decompressed on the fly for ``.gz`` / ``.bz2``), so the voxel limit is
checked before the rest is downloaded; then the object's size (uncompressed files) or one pass over its stream
(compressed files) backs the header exactly as for a local file, and only then are the voxels read.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np

from shaspec_tf import fileio

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
_COMPRESSED = (".gz", ".bz2", ".zst", ".mgz")


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


@dataclass
class _Stored:
    """How a NIfTI file is stored: its size in bytes as stored, where its voxel data start (in the uncompressed
    stream), whether it is compressed, and how to open its uncompressed stream again."""
    size: int
    offset: int
    compressed: bool
    open: Callable


def _stored_local(image) -> Optional[_Stored]:
    """:class:`_Stored` of an image nibabel loaded from a local file name (``None`` when it was not)."""
    proxy = image.dataobj
    source = getattr(proxy, "file_like", None)
    offset = getattr(proxy, "offset", None)
    if not (isinstance(source, (str, os.PathLike)) and isinstance(offset, (int, np.integer))):
        return None
    from nibabel.openers import ImageOpener

    return _Stored(fileio.size(os.fspath(source)), int(offset), str(source).lower().endswith(_COMPRESSED),
                   lambda: ImageOpener(str(source), "rb"))


def check_declared_size(path, image, shape: Tuple[int, ...], limit: int, stored: Optional[_Stored] = None) -> None:
    """Refuse, before any voxel data is read, a header whose declared size the file cannot back or that exceeds
    ``limit`` voxels (see the module docstring). ``stored`` says how the file is stored (default: from the local
    file name nibabel read ``image`` from)."""
    if any(s < 1 for s in shape):
        raise fail(path, f"header declares an empty volume of shape {shape}")
    voxels = int(np.prod([int(s) for s in shape], dtype=object))
    try:
        dtype = np.dtype(image.get_data_dtype())
    except Exception as error:  # noqa: BLE001
        raise fail(path, f"cannot read NIfTI header (data type: {error})") from error
    nbytes = voxels * dtype.itemsize
    declared = f"header declares shape {shape} of {dtype.name}"
    stored = stored if stored is not None else _stored_local(image)
    if stored is not None and not stored.compressed and stored.size < stored.offset + nbytes:
        raise fail(path, f"{declared} ({_bytes(nbytes)} of voxel data), but the file "
                          f"holds {stored.size} bytes: truncated, or not what its header says")
    if voxels > limit:
        raise fail(path, f"{declared} = {voxels:,} voxels, above the limit of {limit:,} per volume (set max_voxels, "
                          f"--max-voxels or {MAX_VOXELS_ENV} to allow more); the file holds "
                          f"{stored.size if stored is not None else 'an unknown number of'} bytes")
    if stored is not None and stored.compressed:
        need, got = stored.offset + nbytes, 0
        try:
            with stored.open() as stream:
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


@contextlib.contextmanager
def _uri_stream(path: str):
    """The uncompressed byte stream of the object ``path`` (``.gz`` / ``.bz2`` decompressed as it is read)."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(fileio.open_file(path, "rb"))
        name = path.lower()
        if name.endswith(".gz"):
            import gzip

            raw = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif name.endswith(".bz2"):
            import bz2

            raw = stack.enter_context(bz2.BZ2File(raw, mode="rb"))
        yield raw


def _header_class(stream):
    """``Nifti1Image`` or ``Nifti2Image`` by the header size the stream starts with (348 or 540, either byte
    order); ``None`` for anything else."""
    import nibabel as nib

    head = stream.read(4)
    stream.seek(0)
    if len(head) < 4:
        return None
    for order in ("<", ">"):
        size = int(np.frombuffer(head, f"{order}i4")[0])
        if size in (348, 540):
            return nib.Nifti1Image if size == 348 else nib.Nifti2Image
    return None


@contextlib.contextmanager
def _opened(path):
    """``(image, stored)`` for ``path``: nibabel's image (header read, voxels not yet) and how the file is stored
    (``None``: ask the image). A URI's header is read from the start of its stream; the stream stays open for the
    voxels until the context ends."""
    import nibabel as nib

    if not fileio.is_uri(path):
        yield nib.load(str(path)), None
        return
    path = str(path)
    with _uri_stream(path) as stream:
        try:
            size = fileio.size(path)
            klass = _header_class(stream)
            if klass is None:
                raise ValueError("not a NIfTI-1 or NIfTI-2 file (the header size is neither 348 nor 540)")
            image = klass.from_file_map(klass.make_file_map({"image": stream}), mmap=False)
            offset = int(image.dataobj.offset)
        except Exception as error:  # noqa: BLE001 -- same wording as a local file's
            raise fail(path, f"cannot read NIfTI header ({type(error).__name__}: {error})") from error
        compressed = path.lower().endswith((".gz", ".bz2"))
        yield image, _Stored(size, offset, compressed, lambda: _uri_stream(path))


def read_volume(path, max_voxels: int = MAX_VOXELS):
    """``(float32 data (i, j, k), affine, zooms)`` as stored; every reading failure -> one-line error. The header's
    declared size is checked (:func:`check_declared_size`) before any voxel is read. ``path`` may be a URI."""
    with contextlib.ExitStack() as stack:
        try:
            image, stored = stack.enter_context(_opened(path))
            shape = tuple(int(s) for s in image.shape)
        except NiftiError:
            raise
        except Exception as error:  # noqa: BLE001 -- nibabel raises many kinds for corrupt files
            raise fail(path, f"cannot read NIfTI header ({type(error).__name__}: {error})") from error
        if len(shape) < 3 or any(s != 1 for s in shape[3:]):
            raise fail(path, f"expected a 3D volume, got shape {shape}")
        check_declared_size(path, image, shape, max_voxels, stored)
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

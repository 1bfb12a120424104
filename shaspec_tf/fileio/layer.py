"""The file layer: every read and write of a user's path goes through these primitives. A path is a string that may
be a URI: ``gs://bucket/...`` goes through ``tf.io.gfile`` (TensorFlow imported only then, so the model code still
runs where TensorFlow is absent), a plain path through the operating system. Libraries that only take local file
names get one through :func:`atomic_path` (written locally, uploaded whole on success) or :func:`local_copy`.
Writes are atomic: beside the target under ``.NAME.partial-HOST-PID-RANDOM``, then renamed (:func:`clean_stale`
removes those of dead processes on this host)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import uuid
from typing import Iterator, Union

MARKER = ".shaspec-output.json"
MARKER_SCHEMA = "shaspec-output/1"
PARTIAL_MARK = ".partial-"
OLD_MARK = ".old-"


def is_uri(path: str) -> bool:
    return "://" in str(path)


# TensorFlow's modular GCS filesystem (tensorflow-io) crashes on its first use when it talks to an emulator
# (CLOUD_STORAGE_EMULATOR_ENDPOINT) and these are unset; the values are TensorFlow's own defaults, caches off.
_EMULATOR_DEFAULTS = {"GCS_READ_CACHE_BLOCK_SIZE_MB": "64", "GCS_READ_CACHE_MAX_SIZE_MB": "0",
                      "GCS_READ_CACHE_MAX_STALENESS": "0", "GCS_STAT_CACHE_MAX_AGE": "0",
                      "GCS_STAT_CACHE_MAX_ENTRIES": "0"}


def gfile_module():
    if os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        for key, value in _EMULATOR_DEFAULTS.items():
            os.environ.setdefault(key, value)
    import tensorflow as tf

    return tf.io.gfile


# -- the file layer ------------------------------------------------------------------------------------------------
def join(path: str, *parts: str) -> str:
    """``path/part/...``; URIs keep their ``scheme://`` and always use ``/``."""
    if is_uri(path):
        out = str(path)
        for part in parts:
            out = f"{out.rstrip('/')}/{str(part).lstrip('/')}"
        return out
    return os.path.join(str(path), *[str(p) for p in parts])


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_uri(path) else os.path.basename(str(path).rstrip(os.sep))


def dirname(path: str) -> str:
    if is_uri(path):
        head = str(path).rstrip("/").rsplit("/", 1)[0]
        return head if "://" in head and not head.endswith(":/") else str(path)
    return os.path.dirname(str(path))


def absolute(path: str) -> str:
    """The absolute spelling of a local path; URIs are returned as they are."""
    return str(path) if is_uri(path) else os.path.abspath(os.path.expanduser(str(path)))


def exists(path: str) -> bool:
    if is_uri(path):  # an object store's "folder" exists when objects lie under it
        gfile = gfile_module()
        return gfile.exists(path) or gfile.isdir(path)
    return os.path.exists(path)


def isdir(path: str) -> bool:
    return gfile_module().isdir(path) if is_uri(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    if is_uri(path):
        gfile = gfile_module()
        return gfile.exists(path) and not gfile.isdir(path)
    return os.path.isfile(path)


def listdir(path: str) -> list:
    """Names in the folder ``path``, sorted, without trailing slashes."""
    if is_uri(path):
        return sorted({name.rstrip("/") for name in gfile_module().listdir(path)})
    return sorted(os.listdir(path))


def walk(top: str) -> Iterator[tuple]:
    """``(root, dirs, files)`` like ``os.walk`` (top-down, sorted, links not followed); ``dirs`` may be pruned."""
    if is_uri(top):
        for root, dirs, files in gfile_module().walk(top):
            dirs[:] = sorted(d.rstrip("/") for d in dirs)
            yield root.rstrip("/"), dirs, sorted(files)
        return
    for root, dirs, files in os.walk(top):
        dirs.sort()
        yield root, dirs, sorted(files)


def glob(pattern: str) -> list:
    if is_uri(pattern):
        return sorted(gfile_module().glob(pattern))
    import glob as _glob

    return sorted(_glob.glob(pattern))


def makedirs(path: str) -> None:
    if is_uri(path):
        gfile_module().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Remove the file ``path``; absent is fine."""
    if is_uri(path):
        gfile = gfile_module()
        if gfile.exists(path):
            gfile.remove(path)
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def size(path: str) -> int:
    return int(gfile_module().stat(path).length) if is_uri(path) else os.stat(path).st_size


def stat(path: str) -> tuple:
    """``(size in bytes, modification time in ns)`` of a file: what a cache fingerprint needs."""
    if is_uri(path):
        info = gfile_module().stat(path)
        return int(info.length), int(info.mtime_nsec)
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


# tensorflow-io's gs:// reader (google-cloud-cpp 1.21) has crashed the process (SIGSEGV, corrupted heap) on reads of
# many megabytes at once or reaching past an object's end, as tf.io.gfile.copy and GFile.read() make them: URIs are
# read here in pieces of at most this many bytes, never past the end.
READ_CHUNK = 1 << 20


def _read_uri(path: str, writer=None) -> bytes:
    """The bytes of the object ``path``, read in bounded pieces; given ``writer``, streamed into it instead."""
    left = size(path)
    parts = []
    with gfile_module().GFile(path, "rb") as reader:
        while left > 0:
            data = reader.read(min(READ_CHUNK, left))
            if not data:
                raise OSError(f"{path} ended {left} bytes early while it was read")
            if writer is None:
                parts.append(data)
            else:
                writer.write(data)
            left -= len(data)
    return b"".join(parts)


def _download(src: str, local: str) -> None:
    with open(local, "wb") as writer:
        _read_uri(src, writer)


def open_file(path: str, mode: str = "rb"):
    """A file object for ``path`` (``open`` for local files, ``tf.io.gfile.GFile`` for URIs). Prefer
    :func:`atomic_write` / :func:`atomic_path` for writing outputs."""
    if is_uri(path):
        return gfile_module().GFile(path, mode)
    return open(path, mode)


def read_bytes(path: str) -> bytes:
    if is_uri(path):
        return _read_uri(path)
    with open(path, "rb") as f:
        return f.read()


def lexists(path: str) -> bool:
    """Whether anything stands at ``path``: a dangling symbolic link too, an object or a "folder" on a bucket."""
    return exists(path) if is_uri(path) else os.path.lexists(path)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def copy(src: str, dst: str, overwrite: bool = False) -> None:
    """Copy one file (between any two file systems), written aside and renamed."""
    if not overwrite and exists(dst):
        raise FileExistsError(f"{dst} exists; refusing to overwrite it")
    if not is_uri(src) and not is_uri(dst):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        return
    with atomic_path(dst) as tmp:  # tmp is always local (atomic_path stages a URI target locally)
        if is_uri(src):
            _download(src, tmp)
        else:
            shutil.copyfile(src, tmp)


@contextlib.contextmanager
def local_copy(path: str, suffix: str = "") -> Iterator[str]:
    """A local file name holding ``path``'s bytes, for libraries that read only local files; a local ``path`` is
    yielded as it is, a URI is downloaded to a temporary file removed afterwards."""
    if not is_uri(path):
        yield str(path)
        return
    import tempfile

    fd, tmp = tempfile.mkstemp(suffix=suffix or "-" + basename(path))
    os.close(fd)
    try:
        _download(path, tmp)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


@contextlib.contextmanager
def local_dir(target: str) -> Iterator[str]:
    """A local folder to build ``target`` in: ``target`` itself when it is local, else a temporary folder whose
    files are uploaded under ``target`` on success (the caller owns ownership checks)."""
    if not is_uri(target):
        makedirs(target)
        yield str(target)
        return
    import tempfile

    tmp = tempfile.mkdtemp(prefix="shaspec-upload-")
    try:
        yield tmp
        upload_tree(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_tree(src: str, dst: str) -> None:
    """Copy every file under the folder ``src`` to the same relative path under ``dst``, between any two file systems
    (a bucket is read in bounded pieces, :data:`READ_CHUNK`); the marker, when there is one, is copied last, so a
    folder cut short never looks whole."""
    if not isdir(src):
        raise FileNotFoundError(f"{src} is not a folder; nothing to copy")
    files = []
    for root, _, names in walk(src):
        for name in names:
            path = join(root, name)
            files.append(path[len(str(src).rstrip("/")) + 1:].replace(os.sep, "/"))
    files.sort(key=lambda rel: rel == MARKER)
    for rel in files:
        source, target = join(src, *rel.split("/")), join(dst, *rel.split("/"))
        makedirs(dirname(target))
        if is_uri(source) and is_uri(target):
            gfile_module().copy(source, target, overwrite=True)  # server-side copy: nothing is read here
        elif is_uri(source):
            _download(source, target)
        elif is_uri(target):
            gfile_module().copy(source, target, overwrite=True)  # an upload: local reads, no gs:// reader
        else:
            shutil.copyfile(source, target)


def host_name() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def process_tag() -> str:
    """``HOST-PID-RANDOM``: which process made a partial file, so stale ones can be told from live ones."""
    return f"{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def partial_name(target: str) -> str:
    """A hidden sibling of ``target`` to write into before renaming; :func:`clean_stale` knows its shape."""
    target = str(target).rstrip("/")
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}{PARTIAL_MARK}{process_tag()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(entry: str, marker: str) -> bool:
    """Whether the hidden ``entry`` (``.NAME<marker>HOST-PID-RANDOM[...]``) belongs to a dead process on this host."""
    rest = entry.split(marker, 1)[1]
    parts = rest.split("-")
    if len(parts) < 3:
        return False
    host, pid = parts[0], parts[1]
    return host == host_name() and pid.isdigit() and not _pid_alive(int(pid))


def clean_stale(target: str) -> list:
    """Remove ``.NAME.partial-*`` and ``.NAME.old-*`` siblings of ``target`` left by dead processes on this host;
    returns what was removed. Entries of live processes and of other hosts are left alone."""
    target = str(target).rstrip("/")
    parent, name = os.path.split(target)
    parent = parent or "."
    if is_uri(target) or not os.path.isdir(parent):
        return []
    removed = []
    for entry in os.listdir(parent):
        for marker in (PARTIAL_MARK, OLD_MARK):
            prefix = f".{name}{marker}"
            if entry.startswith(prefix) and _stale(entry, marker):
                path = os.path.join(parent, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                removed.append(path)
    return removed


def clean_stale_in(folder: str) -> list:
    """:func:`clean_stale` for every name in ``folder`` that has ``.NAME.partial-*`` or ``.NAME.old-*`` siblings:
    the leftovers of dead processes on this host, whatever they were writing; returns what was removed."""
    folder = str(folder)
    if is_uri(folder) or not os.path.isdir(folder):
        return []
    names = set()
    for entry in os.listdir(folder):
        for marker in (PARTIAL_MARK, OLD_MARK):
            if entry.startswith(".") and marker in entry:
                names.add(entry[1:].split(marker, 1)[0])
    return [path for name in sorted(names) if name for path in clean_stale(os.path.join(folder, name))]


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str, suffix: str = "") -> Iterator[str]:
    """Yield a hidden path beside ``target`` to write (``suffix`` kept, e.g. ``.nii.gz`` for writers that read the
    name); on success it is renamed onto ``target``, on any failure it is removed. The previous ``target`` stays
    whole until the rename."""
    target = str(target)
    if is_uri(target):  # an object store shows an object only once its upload completes: stage locally, upload
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=".shaspec-", suffix=suffix)
        os.close(fd)
        os.remove(tmp)
        try:
            yield tmp
            if os.path.isdir(tmp):
                upload_tree(tmp, target)
            else:
                gfile_module().copy(tmp, target, overwrite=True)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)
        return
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    clean_stale(target)
    tmp = partial_name(os.path.abspath(target)) + suffix
    try:
        yield tmp
        with contextlib.suppress(OSError):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp)
            else:
                os.remove(tmp)
        raise


def atomic_write(target: str, data: Union[str, bytes]) -> None:
    """Write ``data`` to ``target`` atomically (a reader sees the old file or the new one, never a part)."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)


def atomic_write_json(target: str, value, **kwargs) -> None:
    atomic_write(target, json.dumps(value, **{"indent": 2, **kwargs}) + "\n")


def read_json(path: str):
    """The JSON value stored in ``path``: ``FileNotFoundError`` when it is absent, a one-line ``ValueError`` naming
    the file when it is not UTF-8 JSON (a garbage or truncated file)."""
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({str(error).splitlines()[0]})") from error


def same_file(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name the same file (links and relative spellings included)."""
    if is_uri(a) or is_uri(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)



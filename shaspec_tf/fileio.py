"""Safe writes: what the project writes proves it is ours before anything replaces it, and nothing half-written ever
stands under a final name.

Three rules, one helper each:

* **Ownership.** A folder the project builds as a whole (prepared records, reports, a training run) carries a marker
  file, :data:`MARKER`, naming its ``kind`` and listing the files written into it. :func:`ensure_replaceable` lets a
  later run replace such a folder only when the marker is ours, of the same kind, and the folder holds nothing the
  marker does not list (a user's ``thesis.tex`` dropped into it makes it theirs again). Anything else is refused with
  a one-line ``FileExistsError``, and nothing is touched.
* **Atomic writes.** :func:`atomic_write` and :func:`atomic_path` write beside the target under a hidden
  ``.NAME.partial-HOST-PID-RANDOM`` name, then rename into place; on failure the partial file is removed.
  :func:`staging_dir` and :func:`replace_dir` do the same for a whole folder.
* **Litter.** A killed process cannot clean up after itself, so the partial names say which host and process made
  them: :func:`clean_stale` removes those of processes on this host that no longer run (and nothing else).

It is also the project's one file layer: every read and write of a user's path goes through the primitives below
(:func:`exists`, :func:`listdir`, :func:`walk`, :func:`glob`, :func:`open_file`, :func:`read_bytes`, :func:`copy`,
:func:`local_copy`, ...). A path is a string that may be a URI: a path with a scheme (``gs://bucket/...``) goes through
``tf.io.gfile`` (TensorFlow is imported only then, so the model code still runs where TensorFlow is absent), a plain
path through the operating system. Libraries that only take local file names (nibabel's writer, matplotlib, Keras'
``.keras`` files) get one through :func:`atomic_path` (written locally, uploaded whole on success) or
:func:`local_copy` (downloaded to a temporary file).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
import uuid
from typing import Callable, Dict, Iterator, Optional, Union

MARKER = ".shaspec-output.json"
MARKER_SCHEMA = "shaspec-output/1"
_PARTIAL = ".partial-"
_OLD = ".old-"


def is_uri(path: str) -> bool:
    return "://" in str(path)


# TensorFlow's modular GCS filesystem (tensorflow-io) crashes on its first use when it talks to an emulator
# (CLOUD_STORAGE_EMULATOR_ENDPOINT) and these are unset; the values are TensorFlow's own defaults, caches off.
_EMULATOR_DEFAULTS = {"GCS_READ_CACHE_BLOCK_SIZE_MB": "64", "GCS_READ_CACHE_MAX_SIZE_MB": "0",
                      "GCS_READ_CACHE_MAX_STALENESS": "0", "GCS_STAT_CACHE_MAX_AGE": "0",
                      "GCS_STAT_CACHE_MAX_ENTRIES": "0"}


def _gfile():
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
        gfile = _gfile()
        return gfile.exists(path) or gfile.isdir(path)
    return os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_uri(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    if is_uri(path):
        gfile = _gfile()
        return gfile.exists(path) and not gfile.isdir(path)
    return os.path.isfile(path)


def listdir(path: str) -> list:
    """Names in the folder ``path``, sorted, without trailing slashes."""
    if is_uri(path):
        return sorted({name.rstrip("/") for name in _gfile().listdir(path)})
    return sorted(os.listdir(path))


def walk(top: str) -> Iterator[tuple]:
    """``(root, dirs, files)`` like ``os.walk`` (top-down, sorted, links not followed); ``dirs`` may be pruned."""
    if is_uri(top):
        for root, dirs, files in _gfile().walk(top):
            dirs[:] = sorted(d.rstrip("/") for d in dirs)
            yield root.rstrip("/"), dirs, sorted(files)
        return
    for root, dirs, files in os.walk(top):
        dirs.sort()
        yield root, dirs, sorted(files)


def glob(pattern: str) -> list:
    if is_uri(pattern):
        return sorted(_gfile().glob(pattern))
    import glob as _glob

    return sorted(_glob.glob(pattern))


def makedirs(path: str) -> None:
    if is_uri(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Remove the file ``path``; absent is fine."""
    if is_uri(path):
        gfile = _gfile()
        if gfile.exists(path):
            gfile.remove(path)
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def size(path: str) -> int:
    return int(_gfile().stat(path).length) if is_uri(path) else os.stat(path).st_size


def stat(path: str) -> tuple:
    """``(size in bytes, modification time in ns)`` of a file: what a cache fingerprint needs."""
    if is_uri(path):
        info = _gfile().stat(path)
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
    with _gfile().GFile(path, "rb") as reader:
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
        return _gfile().GFile(path, mode)
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
            _gfile().copy(source, target, overwrite=True)  # server-side copy: nothing is read here
        elif is_uri(source):
            _download(source, target)
        elif is_uri(target):
            _gfile().copy(source, target, overwrite=True)  # an upload: local reads, no gs:// reader
        else:
            shutil.copyfile(source, target)


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def _tag() -> str:
    """``HOST-PID-RANDOM``: which process made a partial file, so stale ones can be told from live ones."""
    return f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def partial_name(target: str) -> str:
    """A hidden sibling of ``target`` to write into before renaming; :func:`clean_stale` knows its shape."""
    target = str(target).rstrip("/")
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}{_PARTIAL}{_tag()}")


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
    return host == _host() and pid.isdigit() and not _pid_alive(int(pid))


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
        for marker in (_PARTIAL, _OLD):
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
        for marker in (_PARTIAL, _OLD):
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
                _gfile().copy(tmp, target, overwrite=True)
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


# -- ownership -----------------------------------------------------------------------------------------------------
def list_files(folder: str) -> Dict[str, int]:
    """``{relative path: size}`` of every file under ``folder`` (the marker and our partial names excluded)."""
    out = {}
    if is_uri(folder):
        gfile = _gfile()
        for root, dirs, files in walk(folder):
            dirs[:] = [d for d in dirs if _PARTIAL not in d]
            for name in files:
                path = f"{root}/{name}"
                rel = path[len(folder.rstrip("/")) + 1:]
                if rel != MARKER and _PARTIAL not in name:
                    out[rel] = int(gfile.stat(path).length)
        return out
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if _PARTIAL not in d]  # a run's staging folder is not part of the output
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if rel != MARKER and _PARTIAL not in name:
                out[rel] = os.lstat(path).st_size
    return out


def write_marker(folder: str, kind: str, files: Optional[Dict[str, int]] = None, **extra) -> dict:
    """Mark ``folder`` as a ``kind`` output of this project, listing ``files`` (default: what it holds now)."""
    marker = {"schema": MARKER_SCHEMA, "kind": kind, "files": list_files(folder) if files is None else files,
              "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    atomic_write_json(f"{str(folder).rstrip('/')}/{MARKER}", marker, sort_keys=True)
    return marker


def read_marker(folder: str) -> Optional[dict]:
    """The marker of ``folder``, or ``None`` when it has none or it is not one of ours."""
    path = f"{str(folder).rstrip('/')}/{MARKER}"
    try:
        marker = json.loads(read_bytes(path).decode("utf-8"))
    except (OSError, ValueError):
        return None
    except Exception as error:  # tf.errors.NotFoundError on a URI
        if type(error).__name__ == "NotFoundError":
            return None
        raise
    if not isinstance(marker, dict) or marker.get("schema") != MARKER_SCHEMA or not isinstance(
            marker.get("files"), dict):
        return None
    return marker


def _exists(path: str) -> bool:
    return exists(path) if is_uri(path) else os.path.lexists(path)


def _isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_uri(path) else os.path.isdir(path) and not os.path.islink(path)


def _listdir(path: str) -> list:
    return _gfile().listdir(path) if is_uri(path) else os.listdir(path)


def ensure_replaceable(folder: str, kind: str, check_sizes: bool = True,
                       legacy: Optional[Callable[[str], bool]] = None) -> bool:
    """``False`` when ``folder`` is absent or empty (free to write), ``True`` when it is a ``kind`` output of ours
    holding exactly the files its marker lists (sizes too, with ``check_sizes``); otherwise a one-line
    ``FileExistsError`` that says why, and nothing is touched. ``legacy(folder)`` may vouch for an output written
    before markers existed."""
    folder = str(folder).rstrip("/")
    if not _exists(folder):
        return False
    if not _isdir(folder):
        raise FileExistsError(f"{folder} exists and is not a folder; refusing to replace it")
    if not _listdir(folder):
        return False
    marker = read_marker(folder)
    if marker is None:
        if legacy is not None and legacy(folder):
            return True
        raise FileExistsError(f"{folder} is not empty and was not written by shaspec (no {MARKER}); refusing to "
                              f"replace it: choose another folder or empty this one")
    if marker.get("kind") != kind:
        raise FileExistsError(f"{folder} holds a shaspec {marker.get('kind')!r} output, not a {kind!r} one; refusing "
                              f"to replace it")
    present, listed = list_files(folder), {k: int(v) for k, v in marker["files"].items()}
    foreign = sorted(set(present) - set(listed))
    if foreign:
        raise FileExistsError(f"{folder} holds files shaspec did not write ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); refusing to replace it")
    if check_sizes:
        changed = sorted(k for k in present if present[k] != listed[k])
        if changed:
            raise FileExistsError(f"{folder}: {changed[0]} changed since shaspec wrote it; refusing to replace it")
    return True


def staging_dir(target: str) -> str:
    """Create and return a hidden sibling folder of ``target`` to build into (stale ones of dead runs go first)."""
    target = str(target).rstrip("/")
    clean_stale(target)
    staging = partial_name(target if is_uri(target) else os.path.abspath(target))
    if is_uri(staging):
        _gfile().makedirs(staging)
    else:
        os.makedirs(os.path.dirname(staging), exist_ok=True)
        os.mkdir(staging)
    return staging


def remove_tree(path: str) -> None:
    if is_uri(path):
        with contextlib.suppress(Exception):
            _gfile().rmtree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(staging: str, target: str, kind: str, legacy: Optional[Callable[[str], bool]] = None) -> None:
    """Mark ``staging`` as a ``kind`` output and move it onto ``target``. An existing ``target`` must pass
    :func:`ensure_replaceable`; it is moved aside first and removed only once the new folder is in place (a kill in
    between leaves it as a stale ``.old-`` sibling that :func:`clean_stale` removes later). On any failure
    ``staging`` is removed and ``target`` is as it was."""
    target = str(target).rstrip("/")
    try:
        write_marker(staging, kind)
        had = ensure_replaceable(target, kind, legacy=legacy)
        old = None
        if _exists(target):
            if had:
                parent, name = os.path.split(target)
                old = os.path.join(parent, f".{name}{_OLD}{_tag()}")
                _rename(target, old)
            elif is_uri(target):  # an empty folder: rename cannot replace it everywhere
                remove_tree(target)
            else:
                os.rmdir(target)
        try:
            _rename(staging, target)
        except BaseException:
            if old is not None:
                _rename(old, target)
            raise
    except BaseException:
        remove_tree(staging)
        raise
    if old is not None:
        remove_tree(old)


def _rename(src: str, dst: str) -> None:
    if is_uri(src) or is_uri(dst):
        gfile = _gfile()
        if not gfile.isdir(src):
            gfile.rename(src, dst)
            return
        # an object store has no folder rename: copy every object (the marker last, so a copy cut short does not
        # look whole), then delete the source
        if gfile.exists(dst) and gfile.listdir(dst):
            raise FileExistsError(f"{dst} appeared while writing; refusing to replace it")
        upload_tree(src, dst)
        gfile.rmtree(src)
        return
    try:
        os.rename(src, dst)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(f"{dst} appeared while writing; refusing to replace it") from error
        raise

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

Paths are local files here; a path with a scheme (``gs://...``) goes through ``tf.io.gfile``.
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


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


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
    if is_uri(target):
        tmp = partial_name(target) + suffix
        try:
            yield tmp
            _gfile().rename(tmp, target, overwrite=True)
        except BaseException:
            with contextlib.suppress(Exception):
                _gfile().remove(tmp)
            raise
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
        if is_uri(tmp):
            with _gfile().GFile(tmp, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
        else:
            with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)


def atomic_write_json(target: str, value, **kwargs) -> None:
    atomic_write(target, json.dumps(value, **{"indent": 2, **kwargs}) + "\n")


def read_json(path: str):
    """The JSON value stored in ``path``: ``FileNotFoundError`` when it is absent, a one-line ``ValueError`` naming
    the file when it is not UTF-8 JSON (a garbage or truncated file)."""
    try:
        if is_uri(path):
            with _gfile().GFile(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
        return json.loads(data.decode("utf-8"))
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
        for root, _, files in gfile.walk(folder):
            for name in files:
                path = f"{root.rstrip('/')}/{name}"
                rel = path[len(folder.rstrip("/")) + 1:]
                if rel != MARKER:
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
        if is_uri(path):
            with _gfile().GFile(path) as f:
                marker = json.loads(f.read())
        else:
            with open(path) as f:
                marker = json.load(f)
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
    return _gfile().exists(path) if is_uri(path) else os.path.lexists(path)


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
        _gfile().rename(src, dst)
        return
    try:
        os.rename(src, dst)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(f"{dst} appeared while writing; refusing to replace it") from error
        raise

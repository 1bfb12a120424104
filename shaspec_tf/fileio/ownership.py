"""Ownership: a folder the project builds as a whole carries :data:`MARKER` (kind, files and sizes); only such a
folder, of the same kind and holding nothing else, is ever replaced (:func:`ensure_replaceable`,
:func:`replace_dir`)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from typing import Callable, Dict, Optional

from shaspec_tf.fileio.layer import (MARKER, MARKER_SCHEMA, OLD_MARK, PARTIAL_MARK, atomic_write_json, clean_stale,
                                     gfile_module, is_uri, lexists, listdir, partial_name, process_tag, read_bytes,
                                     upload_tree, walk)

# -- ownership -----------------------------------------------------------------------------------------------------
def list_files(folder: str) -> Dict[str, int]:
    """``{relative path: size}`` of every file under ``folder`` (the marker and our partial names excluded)."""
    out = {}
    if is_uri(folder):
        gfile = gfile_module()
        for root, dirs, files in walk(folder):
            dirs[:] = [d for d in dirs if PARTIAL_MARK not in d]
            for name in files:
                path = f"{root}/{name}"
                rel = path[len(folder.rstrip("/")) + 1:]
                if rel != MARKER and PARTIAL_MARK not in name:
                    out[rel] = int(gfile.stat(path).length)
        return out
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if PARTIAL_MARK not in d]  # a run's staging folder is not part of the output
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if rel != MARKER and PARTIAL_MARK not in name:
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


def _isdir(path: str) -> bool:
    return gfile_module().isdir(path) if is_uri(path) else os.path.isdir(path) and not os.path.islink(path)


def ensure_replaceable(folder: str, kind: str, check_sizes: bool = True,
                       legacy: Optional[Callable[[str], bool]] = None) -> bool:
    """``False`` when ``folder`` is absent or empty (free to write), ``True`` when it is a ``kind`` output of ours
    holding exactly the files its marker lists (sizes too, with ``check_sizes``); otherwise a one-line
    ``FileExistsError`` that says why, and nothing is touched. ``legacy(folder)`` may vouch for an output written
    before markers existed."""
    folder = str(folder).rstrip("/")
    if not lexists(folder):
        return False
    if not _isdir(folder):
        raise FileExistsError(f"{folder} exists and is not a folder; refusing to replace it")
    if not listdir(folder):
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
        gfile_module().makedirs(staging)
    else:
        os.makedirs(os.path.dirname(staging), exist_ok=True)
        os.mkdir(staging)
    return staging


def remove_tree(path: str) -> None:
    if is_uri(path):
        with contextlib.suppress(Exception):
            gfile_module().rmtree(path)
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
        if lexists(target):
            if had:
                parent, name = os.path.split(target)
                old = os.path.join(parent, f".{name}{OLD_MARK}{process_tag()}")
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
        gfile = gfile_module()
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

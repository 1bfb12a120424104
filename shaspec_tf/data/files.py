"""Where a prepared data set keeps the TFRecords of a split, and reading them whatever their compression.

Three layouts hold the same records:

| written by | layout |
|---|---|
| ``shaspec prepare brats`` | ``DATA/{split}/data-00000-of-0000N.tfrecord`` |
| ``shaspec prepare avmnist`` | ``DATA/{split}-00000-of-0000N.tfrecord`` |
| the TFX example gens (an ``Examples`` artifact) | ``DATA/Split-{split}/data-00000-of-0000N.gz`` (GZIP) |

so ``shaspec train`` / ``evaluate`` take an ``Examples`` artifact's folder as ``--data`` as readily as their own.
``DATA`` may be a URI (``gs://bucket/prepared``): files are found through :mod:`shaspec_tf.fileio` and read by
``tf.data``, which takes URIs as they are. :func:`input_fingerprint` digests the raw inputs of a data set (names,
sizes, modification times) for the TFX example gens' cache.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, List, Optional, Sequence


def split_patterns(data: str, split: str, task: str) -> List[str]:
    """The glob patterns tried, in order, for ``split`` of a ``task`` data set (the task's own layout, then the TFX
    ``Examples`` one; see :meth:`shaspec_tf.tasks.Task.record_patterns`)."""
    from shaspec_tf.taskspec.registry import get_task

    return get_task(task).record_patterns(data, split)


def split_files(data: str, split: Optional[str], task: str) -> List[str]:
    """The sorted TFRecord files of ``split`` (empty: the task's evaluation split); a one-line ``FileNotFoundError``
    naming the patterns when none."""
    from shaspec_tf import fileio
    from shaspec_tf.taskspec.registry import get_task

    task = get_task(task)
    split = task.split(split)
    patterns = task.record_patterns(data, split)
    for pattern in patterns:
        files = fileio.glob(pattern)
        if files:
            return files
    raise FileNotFoundError(f"no {split} TFRecords at {' or '.join(patterns)}; run 'shaspec prepare {task.name}' "
                            f"(or point at an Examples artifact's folder)")


def compression_of(files: Sequence[str]) -> str:
    """``"GZIP"`` when every file ends in ``.gz``, ``""`` when none does; mixing both is an error."""
    gz = [str(f).endswith(".gz") for f in files]
    if any(gz) and not all(gz):
        raise ValueError(f"TFRecord files mix GZIP (.gz) and uncompressed files: {list(files)[:4]}...")
    return "GZIP" if gz and all(gz) else ""


def record_dataset(files: Sequence[str], num_parallel_reads=None):
    """A ``tf.data.TFRecordDataset`` over ``files``, GZIP-decompressed when they are ``.gz``."""
    import tensorflow as tf

    files = sorted(str(f) for f in files)
    return tf.data.TFRecordDataset(files, compression_type=compression_of(files),
                                   num_parallel_reads=num_parallel_reads)


def check_records(files: Sequence[str]) -> int:
    """Read every record of every file (GZIP-decompressed when they are ``.gz``) and return how many there are; a
    one-line ``ValueError`` ``"FILE: corrupt TFRecord after N good records (REASON)"`` on the first bad one (a
    truncated file, a flipped bit: TFRecords carry CRCs), ``N`` counting that file's records."""
    import tensorflow as tf

    files = [str(f) for f in files]
    compression = compression_of(files)
    total = 0
    for file in files:
        dataset = tf.data.TFRecordDataset([file], compression_type=compression)
        try:
            total += int(dataset.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
            continue
        except tf.errors.NotFoundError as error:
            raise FileNotFoundError(f"{file}: no such file ({_reason(error)})") from None
        except tf.errors.OpError:
            pass  # read it again record by record to say where it goes wrong
        good = 0
        try:
            for _ in dataset:
                good += 1
        except tf.errors.OpError as error:
            raise ValueError(f"{file}: corrupt TFRecord after {good} good records ({_reason(error)})") from None
        total += good  # the failure did not recur (a transient read error)
    return total


def _reason(error) -> str:
    """``TypeName: message``, the message's first line without TensorFlow's ``{{function_node ...}}`` and
    ``[Op:...]`` wrapping."""
    import re

    text = (getattr(error, "message", None) or str(error)).strip()
    text = text.splitlines()[0] if text else ""
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def input_fingerprint(paths: Iterable[str]) -> str:
    """A digest of every file under ``paths`` (folders, files or URIs such as ``gs://bucket/BraTS2021``: each file's
    name relative to its root, size and modification time), for the TFX example gens' ``input_fingerprint``: it
    changes when an input file is added, removed, resized or rewritten (an object store stamps every upload), so
    that TFX's cache reuses an earlier run exactly when the inputs are unchanged. Names and stamps only: no file is
    read. A path that does not exist adds nothing."""
    from shaspec_tf import fileio

    digest = hashlib.sha256()
    for root in sorted(str(p) for p in paths):
        root = root.rstrip("/") if fileio.is_uri(root) else root
        if fileio.isfile(root):
            walk = [(fileio.dirname(root), [], [fileio.basename(root)])]
        else:
            walk = fileio.walk(root) if fileio.exists(root) else []
        for folder, _, files in walk:
            for name in files:
                path = fileio.join(folder, name)
                size, mtime_ns = fileio.stat(path)
                digest.update(f"{_relative(path, root)}\0{size}\0{mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _relative(path: str, root: str) -> str:
    """``path`` below ``root``, with ``/`` separators (``.`` for ``root`` itself, as ``os.path.relpath`` says)."""
    return path[len(root.rstrip("/\\")):].lstrip("/\\").replace("\\", "/") or "."

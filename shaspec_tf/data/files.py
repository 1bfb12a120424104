"""Where a prepared data set keeps the TFRecords of a split, and reading them whatever their compression.

Three layouts hold the same records:

| written by | layout |
|---|---|
| ``shaspec prepare brats`` | ``DATA/{split}/data-00000-of-0000N.tfrecord`` |
| ``shaspec prepare avmnist`` | ``DATA/{split}-00000-of-0000N.tfrecord`` |
| the TFX example gens (an ``Examples`` artifact) | ``DATA/Split-{split}/data-00000-of-0000N.gz`` (GZIP) |

so ``shaspec train`` / ``evaluate`` take an ``Examples`` artifact's folder as ``--data`` as readily as their own.
"""
from __future__ import annotations

from typing import List, Optional, Sequence


def split_patterns(data: str, split: str, task: str) -> List[str]:
    """The glob patterns tried, in order, for ``split`` of a ``task`` data set (the task's own layout, then the TFX
    ``Examples`` one; see :meth:`shaspec_tf.tasks.Task.record_patterns`)."""
    from shaspec_tf.taskspec.registry import get_task

    return get_task(task).record_patterns(data, split)


def split_files(data: str, split: Optional[str], task: str) -> List[str]:
    """The sorted TFRecord files of ``split`` (empty: the task's evaluation split); a one-line ``FileNotFoundError``
    naming the patterns when none."""
    import tensorflow as tf

    from shaspec_tf.taskspec.registry import get_task

    task = get_task(task)
    split = task.split(split)
    patterns = task.record_patterns(data, split)
    for pattern in patterns:
        files = sorted(tf.io.gfile.glob(pattern))
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

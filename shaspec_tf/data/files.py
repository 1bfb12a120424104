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

from typing import List, Sequence


def split_patterns(data: str, split: str, task: str) -> List[str]:
    """The glob patterns tried, in order, for ``split`` of a ``task`` (``brats`` or ``avmnist``) data set."""
    data = str(data).rstrip("/")
    own = f"{data}/{split}/*.tfrecord" if task == "brats" else f"{data}/{split}-*.tfrecord"
    return [own, f"{data}/Split-{split}/*"]


def split_files(data: str, split: str, task: str) -> List[str]:
    """The sorted TFRecord files of ``split``; a one-line ``FileNotFoundError`` naming the patterns when none."""
    import tensorflow as tf

    patterns = split_patterns(data, split, task)
    for pattern in patterns:
        files = sorted(tf.io.gfile.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no {split} TFRecords at {' or '.join(patterns)}; run 'shaspec prepare {task}' "
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

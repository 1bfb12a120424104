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
from shaspec_tf.fileio.layer import (MARKER, MARKER_SCHEMA, READ_CHUNK, host_name, absolute, atomic_path,
                                     atomic_write, atomic_write_json, basename, clean_stale, clean_stale_in, copy,
                                     dirname, exists, glob, is_uri, isdir, isfile, join, lexists, listdir, local_copy,
                                     local_dir, makedirs, open_file, partial_name, read_bytes, read_json, read_text,
                                     remove, same_file, size, stat, upload_tree, walk)
from shaspec_tf.fileio.ownership import (ensure_replaceable, list_files, read_marker, remove_tree,
                                         replace_dir, staging_dir, write_marker)

__all__ = ["MARKER", "MARKER_SCHEMA", "READ_CHUNK", "absolute", "atomic_path", "atomic_write", "atomic_write_json",
           "basename", "clean_stale", "clean_stale_in", "copy", "dirname", "ensure_replaceable", "exists", "glob",
           "host_name", "is_uri", "isdir", "isfile", "join", "lexists", "list_files", "listdir", "local_copy",
           "local_dir", "makedirs", "open_file", "partial_name", "read_bytes", "read_json", "read_marker", "read_text",
           "remove", "remove_tree", "replace_dir", "same_file", "size", "staging_dir", "stat", "upload_tree", "walk",
           "write_marker"]

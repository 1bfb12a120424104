"""Compilation paid once: a persistent cache of compiled XLA programs, shared by every process of the user.

:func:`enable_compile_cache` points both backends at one folder (``$SHASPEC_COMPILE_CACHE``, else
``$XDG_CACHE_HOME/shaspec_tf/xla``, else ``~/.cache/shaspec_tf/xla``; ``SHASPEC_COMPILE_CACHE=off`` turns it off):

* JAX (``<folder>/jax``): JAX's persistent compilation cache, with its thresholds lowered so that every program is
  kept (``jax_persistent_cache_min_compile_time_secs=0``, ``jax_persistent_cache_min_entry_size_bytes=-1``). A
  process that compiles a program an earlier process compiled (same computation, shapes, dtypes, jaxlib and
  device kind) loads the executable instead: the training step, the whole-volume window, the evaluator's program.
  Recent JAX versions keep their GPU autotuning results inside the same folder too. No size limit is set (JAX's
  LRU eviction, ``JAX_COMPILATION_CACHE_MAX_SIZE``, needs the ``filelock`` package).
* TensorFlow (``<folder>/tensorflow``): TensorFlow keeps the executables of XLA-compiled functions
  (``jit_compile=True``, e.g. Keras' train step compiled with XLA) with
  ``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=...``; the flag is read at the process' first XLA
  compilation, so it takes effect when set before that. Graphs that run without XLA (``tf.function``'s default,
  the TensorFlow sliding window, the exported serving signatures) are traced and optimised in every process:
  TensorFlow has no cross-process cache for them (on a GPU, only the CUDA driver's own cache of JIT-compiled PTX,
  ``~/.nv/ComputeCache``, outlives the process).

Both settings also go into the environment, so that child processes (Beam workers, benchmark workers) inherit
them, and JAX reads them when it is imported later. A folder set already (``JAX_COMPILATION_CACHE_DIR``, a
``--tf_xla_persistent_cache_directory`` in ``TF_XLA_FLAGS``, by the user or an earlier call) is kept unless a
folder is chosen explicitly (the ``path`` argument or ``$SHASPEC_COMPILE_CACHE``).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from shaspec_tf import fileio

__all__ = ["CACHE_ENV", "default_cache_dir", "enable_compile_cache"]

CACHE_ENV = "SHASPEC_COMPILE_CACHE"
_OFF = ("off", "none", "no", "false", "0")
_TF_FLAG = "--tf_xla_persistent_cache_directory"
# Every program is worth keeping: the defaults skip programs that compiled in under a second.
_JAX_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": -1}

logger = logging.getLogger(__name__)


def default_cache_dir() -> Optional[str]:
    """``$SHASPEC_COMPILE_CACHE`` (``None`` when it says ``off``/``none``/``no``/``false``/``0`` or is empty), else
    ``shaspec_tf/xla`` under the user's cache folder (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        value = value.strip()
        return None if not value or value.lower() in _OFF else os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "shaspec_tf", "xla")


def _enable_jax(folder: str, explicit: bool) -> str:
    """JAX's persistent cache in ``folder`` (or the user's own ``JAX_COMPILATION_CACHE_DIR``); the folder used."""
    jax = sys.modules.get("jax")
    own = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (
        getattr(jax.config, "jax_compilation_cache_dir", None) if jax is not None else None)
    if own and not explicit:
        folder = own
    settings = dict(_JAX_SETTINGS, jax_compilation_cache_dir=folder)
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)  # read when JAX is imported, here or in a child process
    if jax is not None:
        for name, value in settings.items():
            jax.config.update(name, value)
        try:  # a program compiled before this call initialised the cache without a folder: start it again
            from jax._src import compilation_cache

            compilation_cache.reset_cache()
        except (ImportError, AttributeError):  # pragma: no cover - other JAX versions
            pass
    return folder


def _enable_tensorflow(folder: str, explicit: bool) -> str:
    """TensorFlow's persistent cache of XLA executables in ``folder`` (through ``TF_XLA_FLAGS``)."""
    flags = [f for f in os.environ.get("TF_XLA_FLAGS", "").split() if f]
    own = [f for f in flags if f.startswith(_TF_FLAG + "=")]
    if own and not explicit:
        return own[-1].split("=", 1)[1]
    flags = [f for f in flags if not f.startswith(_TF_FLAG + "=")] + [f"{_TF_FLAG}={folder}"]
    os.environ["TF_XLA_FLAGS"] = " ".join(flags)
    return folder


def enable_compile_cache(path: Optional[str] = None) -> Optional[str]:
    """Keep compiled programs in ``path`` (default :func:`default_cache_dir`) for this process and the processes it
    starts; returns the folder, or ``None`` when the cache is off. Call it before the first compilation (the CLI,
    the trainer and the evaluator call it first thing); calling it again is harmless. Logs one line."""
    explicit = path is not None or CACHE_ENV in os.environ
    folder = str(path) if path is not None else default_cache_dir()
    if folder is None:
        logger.info("compilation cache: off (%s)", CACHE_ENV)
        return None
    if not fileio.is_uri(folder):
        folder = os.path.abspath(os.path.expanduser(folder))
    jax_dir = _enable_jax(fileio.join(folder, "jax"), explicit)
    tf_dir = _enable_tensorflow(fileio.join(folder, "tensorflow"), explicit)
    for sub in (jax_dir, tf_dir):
        if not fileio.is_uri(sub):
            fileio.makedirs(sub)
    logger.info("compilation cache: JAX programs in %s; TensorFlow XLA-compiled functions in %s (graphs that run "
                "without XLA are traced in every process)", jax_dir, tf_dir)
    return folder

"""Quiet logs by default for the command-line tools (``shaspec``, ``pipeline/local_runner.py``), all of it with
``--verbose``.

Quiet (the default) hides what a CPU run prints around its useful lines and that no user can act on:

* TensorFlow's C++ log (``TF_CPP_MIN_LOG_LEVEL=3``: the ``Unable to register cuDNN/cuFFT/cuBLAS factory`` errors,
  the oneDNN and CPU-feature notices, TF-TRT warnings). It is read once, when TensorFlow loads, so
  :func:`configure` must run before TensorFlow is imported; it is set in the environment, so that child processes
  (Apache Beam's DirectRunner workers) inherit it.
* google-api-core's warning that Python 3.10 is unsupported (a ``FutureWarning``), here and, through
  ``PYTHONWARNINGS``, in those workers.
* absl (TFX's log) and Apache Beam's and TFX's Python loggers below ERROR (e.g. ``ArtifactQuery.property_predicate
  is not supported``, the workers' ``No semi_persistent_directory`` and ``Discarding unparseable args``). A failure
  still raises, and errors are still shown.

In quiet mode a variable the user set in the environment is kept. Verbose shows what quiet hides: TensorFlow's C++
log at its default level (everything, its INFO notices included), warnings, and absl's, Beam's and TFX's records at
their default level (WARNING and above; their INFO logs run to thousands of lines per pipeline run).
"""
from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "SHASPEC_VERBOSE"  # 1: --verbose by default (for runs whose flags cannot be set, e.g. the TFX CLI)
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore::FutureWarning"}
QUIET_LOGGERS = {"absl": logging.ERROR, "apache_beam": logging.ERROR, "tfx": logging.ERROR}

_state = {"verbose": False}

__all__ = ["QUIET_ENVIRONMENT", "QUIET_LOGGERS", "VERBOSE_ENV", "configure", "verbose", "verbose_default"]


def verbose_default() -> bool:
    """The default of ``--verbose``: ``$SHASPEC_VERBOSE`` set to anything but ``""``/``0``/``false``/``no``."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def verbose() -> bool:
    """Whether the last :func:`configure` asked for verbose logs."""
    return _state["verbose"]


def configure(verbose: bool = False) -> None:
    """Quiet (default) or verbose logs for this process and the processes it starts; call it before TensorFlow is
    imported (afterwards the C++ log level no longer changes in this process, only in new child processes)."""
    _state["verbose"] = bool(verbose)
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        _absl_verbosity(logging.WARNING)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)  # back to the default: the root logger's level
        return
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.api_core")
    _absl_verbosity(QUIET_LOGGERS["absl"])
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def _absl_verbosity(level: int) -> None:
    """absl's own verbosity (it resets its logger's level to it). absl is imported here, before anything touches the
    ``absl`` logger, so that the logger is absl's own class."""
    try:
        from absl import logging as absl_logging
    except ImportError:  # no absl, so nothing logs through it
        return
    absl_logging.set_verbosity(absl_logging.ERROR if level >= logging.ERROR else absl_logging.WARNING)

"""Run the shaspec-tf pipeline on this machine: LocalDagRunner, SQLite metadata, Beam DirectRunner.

    python pipeline/local_runner.py [--root DIR|gs://...] [--tiny] [--tasks brats,avmnist] [--metadata FILE]
                                    [--no-cache] [--verbose]

or through the TFX command line (``SHASPEC_PIPELINE_ROOT``, ``SHASPEC_PIPELINE_SIZE=tiny``,
``SHASPEC_PIPELINE_TASKS`` and ``SHASPEC_VERBOSE=1`` choose what the flags do)::

    tfx pipeline create --engine local --pipeline_path pipeline/local_runner.py
    tfx run create --engine local --pipeline_name shaspec

The embedded default generates phantom BraTS cases into ROOT/data (once) and reads the real AV-MNIST from
``$SHASPEC_DATA`` or ``../shared/data``. A second run with unchanged inputs reuses every cached artifact. At the end
it prints where the pushed models and the evaluation reports are.

The log is quiet by default: TensorFlow's C++ log (the ``Unable to register cuDNN factory`` lines of a CPU run, in
this process and in Beam's workers), absl's and Beam's warnings and FutureWarnings are hidden (see
:mod:`shaspec_tf.logs`); ``--verbose`` shows them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a script or by the TFX CLI: make the repository importable
    sys.path.insert(0, REPO)
# The TFX app (pipeline/, components/) is not installed (setup.py): Beam's worker processes import the components'
# functions by module path, so they get the repository on their path too, wherever the run is started from.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)


def configure_logging(verbose: bool = False) -> None:
    """Quiet (default) or verbose logs for this run and Beam's worker processes (:func:`shaspec_tf.logs.configure`);
    quiet also hides the FutureWarnings of TFX, Beam and their dependencies. Call it before TensorFlow, TFX or Beam
    is imported: :func:`main` does so first."""
    from shaspec_tf import logs

    logs.configure(verbose)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)


def ensure_phantoms(config, size: str) -> None:
    """Generate the phantom BraTS cases the config points at, unless they are there already."""
    from pipeline.configs import PHANTOM_CASES, PHANTOM_SHAPE, phantom_dir
    from shaspec_tf import fileio
    from shaspec_tf.data.phantom import write_phantom_dataset

    for t in config.tasks:
        # The phantom folder of the root holds generated BraTS-layout cases, whichever branch reads it.
        if fileio.absolute(t.input_dir) == fileio.absolute(phantom_dir(config.root)):
            if not fileio.exists(fileio.join(t.input_dir, "phantoms.json")) or \
                    len([d for d in fileio.listdir(t.input_dir) if not d.startswith(".")]) <= PHANTOM_CASES[size]:
                write_phantom_dataset(t.input_dir, PHANTOM_CASES[size], shape=PHANTOM_SHAPE[size],
                                      skip_existing=True, progress=True)


def make_config(root=None, size: str = "embedded", tasks=None, metadata=None):
    """The pipeline of ``size`` under ``root`` (a folder or a URI such as ``gs://BUCKET/shaspec``). ML Metadata is a
    SQLite file, so it stays on this machine: ``metadata``, else ROOT/metadata.db for a local root and
    ./shaspec_pipeline_metadata/NAME.db for a URI root."""
    from pipeline import configs
    from shaspec_tf import fileio

    root = fileio.absolute(root or configs.default_root())
    config = configs.embedded_default(root) if size == "embedded" else configs.tiny(root)
    if metadata:
        config.metadata_path = os.path.abspath(metadata)
    elif fileio.is_uri(config.metadata_path):
        config.metadata_path = os.path.abspath(os.path.join("shaspec_pipeline_metadata", f"{config.name}.db"))
    if tasks:
        config.tasks = [t for t in config.tasks if t.task in tasks]
    return config


def _registering() -> bool:
    """True under ``tfx pipeline create``: the TFX CLI wraps ``LocalDagRunner.run`` to record the pipeline, and
    nothing runs."""
    from tfx import v1 as tfx

    return hasattr(tfx.orchestration.LocalDagRunner.run, "__wrapped__")


def run(config, size: str = "embedded") -> dict:
    from tfx import v1 as tfx

    from pipeline.pipeline import create_pipeline

    registering = _registering()
    if not registering:
        ensure_phantoms(config, size)
    start = time.time()
    tfx.orchestration.LocalDagRunner().run(create_pipeline(config))
    return None if registering else summary(config, time.time() - start)


def summary(config, seconds: float) -> dict:
    """Where the pushed models and the latest evaluation reports are (newest artifact of each)."""
    from shaspec_tf import fileio

    def newest_last(folder: str) -> list:
        # pushed versions are Unix times, artifact folders execution ids: both grow with time (an object store's
        # "folders" have no modification time, and its glob matches objects only)
        names = [n for n in fileio.listdir(folder) if not n.startswith(".")] if fileio.isdir(folder) else []
        return [fileio.join(folder, name) for name in sorted(names, key=lambda n: (int(n) if n.isdigit() else -1, n))]

    out = {"seconds": round(seconds, 1), "tasks": {}}
    for t in config.tasks:
        versions = newest_last(fileio.join(config.serving_dir, t.model_name))
        reports = newest_last(fileio.join(config.root, f"MissingModalityEvaluator.{t.task}", "evaluation"))
        out["tasks"][t.task] = {"pushed": versions[-1] if versions else None,
                                "report": reports[-1] if reports else None}
    return out


def main(argv=None) -> int:
    from shaspec_tf import logs

    argv = sys.argv[1:] if argv is None else list(argv)
    configure_logging("--verbose" in argv or logs.verbose_default())  # before anything imports TensorFlow
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="pipeline root (default: $SHASPEC_PIPELINE_ROOT or "
                                                     "./shaspec_pipeline)")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("SHASPEC_PIPELINE_SIZE") == "tiny",
                        help="test-size data and models")
    parser.add_argument("--tasks", default=os.environ.get("SHASPEC_PIPELINE_TASKS", "brats,avmnist"))
    parser.add_argument("--metadata", default=os.environ.get("SHASPEC_PIPELINE_METADATA"),
                        help="ML Metadata SQLite file (default: ROOT/metadata.db; with a gs:// root "
                             "./shaspec_pipeline_metadata/NAME.db, since SQLite needs a local file)")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--verbose", action="store_true", default=logs.verbose_default(),
                        help=f"show TensorFlow's C++ log and the warnings of absl (TFX), Beam and Python (default: "
                             f"quiet; ${logs.VERBOSE_ENV}=1 sets it)")
    args = parser.parse_args(argv)
    size = "tiny" if args.tiny else "embedded"
    config = make_config(args.root, size, [t for t in args.tasks.split(",") if t], args.metadata)
    config.enable_cache = not args.no_cache
    result = run(config, size)
    if result is None:
        return 0
    print(f"\npipeline {config.name} finished in {result['seconds']} s (root {config.root})")
    for task, where in result["tasks"].items():
        print(f"  {task}: pushed model  {where['pushed'] or 'none (not blessed; see the report)'}")
        print(f"  {task}: evaluation    {where['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Test set-up: quiet TensorFlow logs, deterministic seeds, and per-backend helpers.

The model tests run twice in ``make test``: under the TensorFlow backend and under ``KERAS_BACKEND=jax``
(``-m "not tensorflow"``), to keep ``shaspec_tf.layers`` / ``shaspec_tf.models`` backend-agnostic.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The compilation cache (shaspec_tf.compile_cache) is the user's, under ~/.cache: tests that call the CLI or train
# in-process would switch it on for the rest of the session and fill it. Off unless a test chooses a folder.
os.environ.setdefault("SHASPEC_COMPILE_CACHE", "off")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()


def pytest_collection_modifyitems(config, items):
    if BACKEND != "tensorflow":
        skip = pytest.mark.skip(reason=f"needs TensorFlow; this pass runs the {BACKEND} backend")
        for item in items:
            if "tensorflow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def gcs():
    """A Cloud Storage emulator on 127.0.0.1 for this test session (tests/gcs_emulator.py), started on first use and
    stopped at the end. TensorFlow's ``gs://`` filesystem is chosen when TensorFlow is imported, so code that must
    reach the emulator runs in a child process with ``gcs.env()`` in its environment."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from gcs_emulator import GcsEmulator

    emulator = GcsEmulator().start()
    try:
        yield emulator
    finally:
        emulator.stop()


def run_with_gcs(gcs, code: str, timeout: int = 300, args=None) -> dict:
    """Run Python ``code`` (which prints one JSON line last) in a child process pointed at the emulator, from the
    repository root; with ``args`` instead, run that command line. Returns the last JSON line it printed."""
    import json
    import subprocess
    import sys
    import textwrap

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-c", textwrap.dedent(code)] if args is None else list(args)
    result = subprocess.run(command, cwd=root, env={**os.environ, **gcs.env()}, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith(("{", "[")) else {"stdout": result.stdout}


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


def h5_arrays(path):
    """``{dataset path: array}`` of every dataset in an HDF5 file (a saved ``.weights.h5``)."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
    return out


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def gradients(model, inputs, loss_fn):
    """Gradients of ``loss_fn(outputs)`` with respect to ``model.trainable_variables`` (as NumPy arrays), on the
    active backend."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(model(inputs, training=True))
        return [None if g is None else to_numpy(g) for g in tape.gradient(loss, model.trainable_variables)]
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def objective(values):
            outputs, _ = model.stateless_call(values, non_trainable, inputs, training=True)
            return loss_fn(outputs)

        return [to_numpy(g) for g in jax.grad(objective)(trainable)]
    raise NotImplementedError(BACKEND)


@pytest.fixture(scope="module")
def brats_data(tmp_path_factory):
    """Three toy BraTS records (36x40x40, two with missing modalities) as a prepared ``train`` split, for training
    tests (TensorFlow)."""
    import tensorflow as tf

    from shaspec_tf.data.schema import BratsRecord, brats_example
    from shaspec_tf.data.toy import toy_case

    root = tmp_path_factory.mktemp("brats")
    os.makedirs(root / "train")
    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(root / "train" / "data-00000-of-00001.tfrecord")) as writer:
        for i, mask in enumerate(([1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0])):
            image, labels = toy_case(rng, (36, 40, 40))
            image = image * np.asarray(mask, np.float32)
            writer.write(brats_example(BratsRecord(f"c{i}", image, np.asarray(mask), labels)).SerializeToString())
    return str(root)

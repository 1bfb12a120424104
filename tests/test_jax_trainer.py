"""The TFX Trainer's ``run_fn`` under ``KERAS_BACKEND=jax``: it trains under JAX (its input a ``tf.data`` pipeline)
and still writes the TF Serving SavedModel (exported by a TensorFlow child process), whose signature gives the
JAX-trained model's own probabilities. The Trainer runs in a child process with ``KERAS_BACKEND=jax``; this test
process (TensorFlow) loads the SavedModel as TF Serving would."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

pytestmark = pytest.mark.tensorflow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs under KERAS_BACKEND=jax: the Trainer's run_fn, then the trained model's own output on fixed inputs, one
# sample at a time (eager JAX: the shapes of the training crops, whose compiled ops are cached; jitting a 3D
# forward pass takes XLA:CPU minutes).
TRAINER = """
import json, sys, types
import keras, numpy as np
from components.trainer_module import run_fn
from shaspec_tf.trained import load_trained

root, task = sys.argv[1], sys.argv[2]
config = json.loads(sys.argv[3])
run_fn(types.SimpleNamespace(train_files=[root + "/examples/Split-train/*"], model_run_dir=root + "/model_run",
                             serving_model_dir=root + "/model/Format-Serving", custom_config=config))
inputs = dict(np.load(root + "/inputs.npz"))
model = load_trained(root + "/model/Format-Shaspec")
logits = np.concatenate([np.asarray(model({k: v[i:i + 1] for k, v in inputs.items()}, training=False)["logits"],
                                     np.float64) for i in range(len(inputs["modality_mask"]))])
prob = 1 / (1 + np.exp(-logits)) if task == "brats" else np.exp(logits - logits.max(-1, keepdims=True))
if task != "brats":
    prob /= prob.sum(-1, keepdims=True)
np.save(root + "/jax_probabilities.npy", prob)
history = json.load(open(root + "/model_run/history.json"))
report = {"backend": keras.backend.backend(), "variables": type(model.weights[0].value).__module__,
          "loss": history["loss"], "train_config": json.load(open(root + "/model_run/train_config.json"))}
if task == "avmnist":  # the TensorFlow child's one-line errors come back with their type
    from shaspec_tf.backends import export_under_tensorflow
    try:
        export_under_tensorflow(root + "/no-such-run", root + "/exports", "m")
    except FileNotFoundError as error:
        report["error"] = str(error)
print(json.dumps(report))
"""


def _train_under_jax(root, task, config):
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(TRAINER), str(root), task, json.dumps(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _write_examples(root, examples):
    folder = root / "examples" / "Split-train"
    os.makedirs(folder)
    with tf.io.TFRecordWriter(str(folder / "data-00000-of-00001.gz"), "GZIP") as writer:
        for example in examples:
            writer.write(example.SerializeToString())


def _check_export(root, report, inputs, atol):
    """The run trained under JAX, and the SavedModel's probabilities are the JAX model's."""
    assert report["backend"] == "jax" and report["variables"].startswith("jax")
    assert report["train_config"]["jit_compile"] or report["train_config"]["run_eagerly"]
    assert report["loss"] and all(np.isfinite(report["loss"]))
    serving = root / "model" / "Format-Serving"
    manifest = json.loads((serving / "assets.extra" / "shaspec_export.json").read_text())
    assert manifest["version"] is None and manifest["source"].endswith("Format-Shaspec")
    assert not [n for n in os.listdir(root / "model") if n.startswith(".export-")]
    loaded = tf.saved_model.load(str(serving))
    out = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in inputs.items()})
    expected = np.load(root / "jax_probabilities.npy")
    got = out["probabilities"].numpy()
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
    return loaded, out, expected


@pytest.mark.slow
def test_the_trainer_under_jax_exports_the_classifiers_own_probabilities(tmp_path):
    from shaspec_tf.data.schema import avmnist_example

    rng = np.random.default_rng(3)
    _write_examples(tmp_path, [avmnist_example(f"s{i}", rng.random((28, 28)), rng.normal(size=(20, 20)),
                                               [1, int(i % 3 != 0)], i % 10, "x") for i in range(8)])
    inputs = {"image": rng.random((5, 28, 28, 1)).astype("float32"),
              "audio": rng.normal(size=(5, 20, 20, 1)).astype("float32"),
              "modality_mask": np.array([[1, 1], [1, 0], [0, 1], [1, 1], [1, 0]], "float32")}
    np.savez(tmp_path / "inputs.npz", **inputs)
    # the default of jit_compile under JAX: the compiled train step (Keras' jax.jit)
    report = _train_under_jax(tmp_path, "avmnist", {"task": "avmnist", "preset": "avmnist-tiny", "steps": 2,
                                                    "checkpoint_every": 1, "batch_size": 4})
    assert report["train_config"]["jit_compile"] is True
    loaded, out, expected = _check_export(tmp_path, report, inputs, atol=1e-5)
    np.testing.assert_array_equal(out["class"].numpy(), expected.argmax(-1))
    assert set(loaded.signatures) == {"serving_default"}
    assert report["error"].endswith("not found: --model must be a folder written by 'shaspec train'")
    assert "\n" not in report["error"] and not (tmp_path / "exports").exists()


@pytest.mark.slow
def test_the_trainer_under_jax_exports_the_segmenters_own_probabilities(tmp_path):
    from shaspec_tf.data.schema import BratsRecord, brats_example
    from shaspec_tf.data.toy import toy_case

    rng = np.random.default_rng(4)
    examples = []
    for i, mask in enumerate(([1, 1, 1, 1], [1, 0, 1, 1])):
        image, labels = toy_case(rng, (32, 32, 32))
        examples.append(brats_example(BratsRecord(f"c{i}", image * np.asarray(mask, np.float32), np.asarray(mask),
                                                  labels)))
    _write_examples(tmp_path, examples)
    inputs = {"image": rng.normal(size=(2, 32, 32, 32, 4)).astype("float32"),
              "modality_mask": np.array([[1, 0, 1, 1], [0, 1, 0, 0]], "float32")}
    np.savez(tmp_path / "inputs.npz", **inputs)
    # eager JAX steps: XLA:CPU takes minutes to compile a 3D train step, which is not what this test is about
    report = _train_under_jax(tmp_path, "brats", {"task": "brats", "preset": "tiny", "steps": 2, "checkpoint_every": 2,
                                                  "batch_size": 1, "crop_size": [32, 32, 32], "run_eagerly": True})
    # XLA's and oneDNN's 3D convolutions sum in different orders, and instance norm scales the difference up: up to
    # 2e-5 seen here on probabilities
    loaded, out, expected = _check_export(tmp_path, report, inputs, atol=5e-5)
    assert out["labels"].shape == (2, 32, 32, 32) and out["labels"].dtype == tf.uint8
    assert set(loaded.signatures) == {"serving_default", "segment_volume"}


def test_jax_defaults_of_the_trainer_compile_the_step_and_refuse_tensorflow_strategies(monkeypatch):
    from components.trainer_module import training_options

    monkeypatch.delenv("TF_CONFIG", raising=False)
    config = {"task": "brats", "steps": 2}
    assert training_options(config, "tensorflow") == config
    assert training_options(config, "jax") == dict(config, jit_compile=True)
    assert training_options(dict(config, run_eagerly=True), "jax") == dict(config, run_eagerly=True)
    assert training_options(dict(config, jit_compile=False), "jax") == dict(config, jit_compile=False)
    with pytest.raises(ValueError, match="strategy 'mirrored' is TensorFlow's"):
        training_options(dict(config, strategy="mirrored"), "jax")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    with pytest.raises(ValueError, match="a multi-worker TF_CONFIG is TensorFlow's"):
        training_options(config, "jax")


def test_the_export_child_runs_tensorflow_on_the_cpu_with_the_parents_import_path():
    from shaspec_tf.backends import child_environment

    env = child_environment({"KERAS_BACKEND": "jax", "PYTHONPATH": "/nonexistent", "OTHER": "kept"})
    assert env["KERAS_BACKEND"] == "tensorflow" and env["CUDA_VISIBLE_DEVICES"] == "" and env["OTHER"] == "kept"
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert REPO in paths and "/nonexistent" not in paths and len(paths) == len(set(paths))

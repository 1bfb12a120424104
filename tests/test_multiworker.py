"""Multi-worker training as Vertex AI runs it: two worker processes on this machine, a ``TF_CONFIG`` cluster of two
workers on free loopback ports, ``shaspec train`` (the library call) with its default strategy in each. The trainer
must notice the cluster and train under ``MultiWorkerMirroredStrategy`` with the same global batch: both workers end
with the same variables, bit for bit, only the chief writes the run folder, and the run follows a single-worker run
of the same options and seed."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.tensorflow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# dropout 0: a dropout mask is drawn per replica, so with dropout the two workers (each drawing for its half of the
# batch) and one worker (drawing for the whole batch) would compute different steps by design
# No random layer or mask: the head's dropout and the modality dropout (AV-MNIST's default since it was chosen by
# evidence) draw per element of each worker's stream, so two workers and one draw differently by design; what is
# compared here is the computation.
OPTIONS = dict(task="avmnist", preset="avmnist-tiny", steps=4, checkpoint_every=2, batch_size=8, drop_rate=0.0,
               model_options={"dropout": 0.0})

WORKER = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    from shaspec_tf.training.trainer import TrainConfig, train

    data, out, dump = sys.argv[1:4]

    class Dump(keras.callbacks.Callback):  # every variable of the model and of its optimiser, after the last step
        def on_train_end(self, logs=None):
            variables = list(self.model.variables) + list(self.model.optimizer.variables)
            np.savez(dump, **{f"{i:05d} {v.path}": np.asarray(v.numpy()) for i, v in enumerate(variables)})

    result = train(TrainConfig(data=data, out=out, **json.loads(sys.argv[4])), callbacks=[Dump()])
    print(json.dumps({"chief": result["chief"], "loss": result["history"]["loss"], "steps": result["steps"]}))
""")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """16 synthetic AV-MNIST samples in one file (fewer files than workers: the input is sharded by data)."""
    import tensorflow as tf

    from shaspec_tf.data.schema import avmnist_example

    root = tmp_path_factory.mktemp("avmnist")
    rng = np.random.default_rng(3)
    with tf.io.TFRecordWriter(str(root / "train-00000-of-00001.tfrecord")) as writer:
        for i in range(16):
            writer.write(avmnist_example(f"s{i}", rng.random((28, 28)), rng.normal(size=(20, 20)), [1, 1], i % 10,
                                         "x").SerializeToString())
    return str(root)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start(data, out, dump, tmp, tf_config=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO, TMPDIR=str(tmp))
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    os.makedirs(tmp, exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", WORKER, data, str(out), str(dump), json.dumps(OPTIONS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)


def _finish(process):
    try:
        out, err = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def test_two_workers_train_one_model_like_one_worker_with_the_same_global_batch(records, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    run = tmp_path / "run"
    processes = [_start(records, run, tmp_path / f"worker{i}.npz", tmp_path / f"tmp{i}",
                        {"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]
    processes.append(_start(records, tmp_path / "single", tmp_path / "single.npz", tmp_path / "tmp-single"))
    try:
        (chief, chief_err), (other, other_err), (single, _) = [_finish(p) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert "TF_CONFIG describes 2 workers: training with the multi_worker strategy" in chief_err
    assert chief["chief"] and not other["chief"]
    assert chief["steps"] == other["steps"] == single["steps"] == 4

    # both workers hold the same model and optimiser, bit for bit, every variable
    a, b = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    assert a.files == b.files and len(a.files) > 50
    assert [k for k in a.files if not np.array_equal(a[k], b[k])] == []
    assert chief["loss"] == other["loss"]

    # only the chief wrote the run folder; the other worker's private folder is gone
    from shaspec_tf import fileio
    from shaspec_tf.training import checkpoint

    marker = fileio.read_marker(str(run))
    assert marker["kind"] == "train-run" and marker["state"] == "complete"
    assert [step for step, _ in checkpoint.list_checkpoints(str(run / "checkpoints"))] == [4, 2]
    assert os.listdir(tmp_path / "tmp1") == [], "the non-chief worker's temporary run folder is removed"
    saved = checkpoint.read(checkpoint.list_checkpoints(str(run / "checkpoints"))[0][1])
    model_keys = a.files[:len(saved["meta"]["model_variables"])]  # the dump lists the model's variables first
    assert all(np.array_equal(saved[f"model/{i:05d}"], a[k]) for i, k in enumerate(model_keys))

    # the same computation as one worker with the whole batch: the same batches (the global batch split between
    # the workers), the mean loss's gradient (summed over replicas of losses scaled by 1/2). Only the order of
    # float32 sums differs (two half-batch means and an all-reduce, against one mean), about 1e-7 relative per step;
    # four Adam steps of lr 1e-3 keep the difference many orders below the tolerances here (seen: under 1e-6).
    s = np.load(tmp_path / "single.npz")
    assert s.files == a.files
    worst = max(float(np.max(np.abs(s[k].astype(np.float64) - a[k]))) if s[k].size else 0.0 for k in s.files)
    assert worst < 1e-4, worst
    np.testing.assert_allclose(chief["loss"], single["loss"], rtol=1e-4)


def test_workers_that_would_resume_from_different_steps_refuse_to_train(records, tmp_path):
    """Each worker reads the checkpoints of the run folder it is given: when they do not see the same folder (a
    local path on separate machines), they would train different models in lockstep. Here the other worker's
    folder holds a checkpoint of step 2 and the chief's none: both stop with a one-line error before any step."""
    import keras

    from shaspec_tf import fileio
    from shaspec_tf.tasks import get_task
    from shaspec_tf.training import checkpoint
    from shaspec_tf.training.schedules import make_optimizer, make_schedule
    from shaspec_tf.training.trainer import TrainConfig, run_options

    other = tmp_path / "other"
    c = TrainConfig(data=records, out=str(other), **OPTIONS).resolved()
    options = run_options(c)
    model = get_task(c.task).build_model(c.preset, variant=c.variant, **c.model_options)
    model.compile(optimizer=make_optimizer(c.optimizer, make_schedule(c.schedule, c.learning_rate, 4),
                                           c.weight_decay))
    model.optimizer.build(model.trainable_variables)
    checkpoint.save(str(other / "checkpoints"), model, 2, 1, dict(run=options, steps_per_epoch=2, total_steps=4,
                                                                  history={"loss": [1.0]}))
    fileio.write_marker(str(other), "train-run", run=options, state="running", steps=4, steps_per_epoch=2)
    keras.backend.clear_session()

    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    outs = [tmp_path / "chief-run", other]
    processes = [_start(records, outs[i], tmp_path / f"w{i}.npz", tmp_path / f"tmp{i}",
                        {"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]
    try:
        results = [p.communicate(timeout=400) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(processes, results):
        assert p.returncode != 0
        assert "ValueError: the workers disagree on the step to resume" in err, err[-2000:]
    assert not (tmp_path / "w0.npz").exists() and not (tmp_path / "w1.npz").exists(), "no step was trained"
    assert [step for step, _ in checkpoint.list_checkpoints(str(other / "checkpoints"))] == [2]
